"""The NATS ecosystem's own settings, as busd's ``[nats]`` keys: the ``NATS_*`` variables the
``nats`` CLI reads and its context files (docs/nats-clients.md). Part of the configuration:
it reads only the environment mapping it is given, never ``os.environ``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from busd.errors import ConfigError


def read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{what}: cannot read {path}: {why}") from None


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ---- the NATS ecosystem's own settings: NATS_* variables and nats CLI contexts ------------
# Precedence, lowest first: defaults < nats context < busd.toml < NATS_* < systemd credentials
# < BUSD_* < flags (docs/reference/configuration.md says why).
NATS_ENV: dict[str, str] = {  # the variables the nats CLI reads, as busd keys
    "NATS_URL": "url",
    "NATS_CREDS": "creds",
    "NATS_NKEY": "nkey_seed",
    "NATS_USER": "user",
    "NATS_PASSWORD": "password",
    "NATS_TOKEN": "token",  # the nats CLI's --token (2025); --user may also carry a token
    "NATS_CA": "tls_ca",
    "NATS_CERT": "tls_cert",
    "NATS_KEY": "tls_key",
    "NATS_CONTEXT": "context",
}  # no NATS_* for the JetStream domain: the nats CLI reads none (only --js-domain)
CONTEXT_KEYS: dict[str, str] = {  # a nats CLI context file's keys, as busd keys
    "url": "url",
    "creds": "creds",
    "nkey": "nkey_seed",
    "user": "user",
    "password": "password",
    "token": "token",
    "ca": "tls_ca",
    "cert": "tls_cert",
    "key": "tls_key",
    "jetstream_domain": "js_domain",
    "jetstream_api_prefix": "js_api_prefix",
    "inbox_prefix": "inbox_prefix",
}
_FILE_KEYS = frozenset({"creds", "nkey_seed", "tls_ca", "tls_cert", "tls_key"})
# One way of authenticating per layer: a layer that names one replaces a lower layer's other.
_AUTH_METHODS = ({"creds"}, {"nkey_seed"}, {"user", "password"}, {"token"})
_CONTEXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


def nats_env(env: Mapping[str, str]) -> dict[str, Any]:
    nats = {key: env[name] for name, key in NATS_ENV.items() if env.get(name)}
    return {"nats": nats} if nats else {}


def _home(env: Mapping[str, str]) -> Path | None:
    return Path(env["HOME"]) if env.get("HOME") else None


def nats_config_dir(env: Mapping[str, str]) -> Path | None:
    """Where the nats CLI keeps its contexts: ``$XDG_CONFIG_HOME/nats``, else
    ``~/.config/nats``."""
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / "nats"
    home = _home(env)
    return home / ".config" / "nats" if home else None


def selected_context(env: Mapping[str, str]) -> tuple[str, str]:
    """(name, where it was chosen) of the context ``nats context select`` chose, or ("", "")."""
    folder = nats_config_dir(env)
    chosen = folder / "context.txt" if folder else None
    if chosen is None or not chosen.is_file():
        return "", ""
    return read_secret(chosen, "nats context").strip(), str(chosen)


def context_layer(name: str, chosen_by: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The [nats] keys a nats CLI context file gives (its unknown keys are the CLI's own)."""
    what = f"nats context {name!r} ({chosen_by})"
    if not _CONTEXT_NAME.match(name) or ".." in name:
        raise ConfigError(f"{what}: not a context name")
    folder = nats_config_dir(env)
    path = folder / "context" / f"{name}.json" if folder else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"{what}: no such context" + (f" ({path} does not exist)" if path else " (no HOME)")
        )
    try:
        data = json.loads(read_secret(path, what))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} is not a JSON object")
    out: dict[str, Any] = {}
    for ctx_key, key in CONTEXT_KEYS.items():
        value = data.get(ctx_key)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{what}: {ctx_key} in {path} must be a string")
        home = _home(env)
        if key in _FILE_KEYS and value.startswith("~/") and home is not None:
            value = str(home / value[2:])  # the nats CLI expands ~ in a context's paths
        out[key] = value
    return out


def layered(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; a [nats] way of authenticating in ``over`` drops the
    other ways ``base`` had (a context's creds must not meet busd.toml's user and password)."""
    given = over.get("nats")
    if isinstance(given, Mapping) and isinstance(base.get("nats"), dict):
        for method in _AUTH_METHODS:
            if method & set(given):
                others = set().union(*(m for m in _AUTH_METHODS if m is not method))
                base = {**base, "nats": {k: v for k, v in base["nats"].items() if k not in others}}
    return merge(base, over)
