"""Settings: built once from a nats context < TOML < NATS_* < BUSD_* < flags, frozen, passed
explicitly.

This is the only module that reads ``os.environ`` for configuration. Unknown or misspelt keys
are errors that name the key, never silently ignored.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from busd.config_nats import context_layer, layered, nats_env, read_secret, selected_context
from busd.errors import ConfigError

_IDENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NatsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = ""
    embedded_listen: str = "127.0.0.1:4222"
    stream: str = "ARTIFACTS"
    subjects: tuple[str, ...] = ("artifacts.>",)
    consumer: str = "busd"
    stream_replicas: int = 1  # 3 on a JetStream cluster
    creds: str = ""
    nkey_seed: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    connect_timeout_s: float = 5.0
    context: str = ""  # a nats CLI context; "" uses the one `nats context select` chose, if any
    name: str = ""  # the connection's name in server monitoring; "" is busd@<host>
    inbox_prefix: str = "_INBOX_busd"  # busd's private inboxes: deliveries, replies, PubAcks
    js_domain: str = ""  # JetStream domain (leafnodes): its API is $JS.<domain>.API
    js_api_prefix: str = ""  # JetStream API prefix of an account import; "" is the server's own
    bind_only: bool = False  # use a stream and consumer managed elsewhere; never create/update


class ConsumerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_max: int = 500
    batch_wait_ms: int = 200
    commit_max: int = 5000  # batches delivered during a commit join the next one, up to this
    ack_wait_s: float = 60.0
    max_deliver: int = 10
    max_ack_pending: int = 20_000
    stall_s: float = 120.0
    shutdown_grace_s: float = 30.0


class VerifySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    checksum: Literal["always", "if_given", "never"] = "if_given"
    file_wait_s: float = 60.0
    settle_s: float = 2.0  # a content verdict is final once the file is unchanged this long
    check_timeout_s: float = 30.0  # a file check with no progress this long is retried later
    processes: int = 2  # worker processes checking files; 0: threads in busd's own process
    threads: int = 2  # with processes = 0; file checks hold the GIL most of the time


class CatalogSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # DuckDB's memory for the catalog (cached blocks, query state) in MiB: past it DuckDB evicts
    # or spills to <data_dir>/catalog.duckdb.tmp, so busd's memory does not grow with the
    # catalog. 0: DuckDB's own default (80 % of the machine's memory).
    memory_limit_mb: int = 128


class MetricsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str = "127.0.0.1:9464"


class HaSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = False  # hot standby: a lease in a NATS KV bucket picks the active busd
    lease_ttl_s: float = 10.0
    bucket: str = "busd_leases"


class LineageSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str = ""  # an HTTP endpoint taking OpenLineage events (POST); "" with subject "": off
    subject: str = ""  # or a NATS subject, published on busd's own connection
    namespace: str = "busd"  # the OpenLineage namespace of busd's jobs and runs
    api_key: str = ""  # sent to url as `Authorization: Bearer <api_key>`
    timeout_s: float = 5.0  # one HTTP request, at most
    queue_max: int = 10_000  # events waiting to be sent; beyond, a batch's are dropped


class ExportSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    sql: str
    depends_on: tuple[str, ...] = ()


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = "data"
    artifact_roots: tuple[str, ...] = ("data",)
    nats: NatsSettings = NatsSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    verify: VerifySettings = VerifySettings()
    catalog: CatalogSettings = CatalogSettings()
    metrics: MetricsSettings = MetricsSettings()
    ha: HaSettings = HaSettings()
    lineage: LineageSettings = LineageSettings()
    exports: tuple[ExportSettings, ...] = ()
    # runs and artifacts exports as folders of part files, one per this many stream sequences
    # (of each row's first commit); only changed parts are rewritten. 0: one file each.
    export_partition_seqs: int = 0
    log_format: Literal["auto", "json", "console"] = "auto"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).absolute()

    @property
    def catalog_path(self) -> Path:
        return self.data_path / "catalog.duckdb"

    @property
    def exports_path(self) -> Path:
        return self.data_path / "exports"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Artifact roots, absolute and resolved (symlinks followed)."""
        return tuple(Path(r).resolve() for r in self.artifact_roots)


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "nats": NatsSettings,
    "consumer": ConsumerSettings,
    "verify": VerifySettings,
    "catalog": CatalogSettings,
    "metrics": MetricsSettings,
    "ha": HaSettings,
    "lineage": LineageSettings,
}
_TOP_LEVEL = ("data_dir", "artifact_roots", "log_format", "export_partition_seqs")


# Keys whose value is the path of a file busd reads itself: a systemd credential gives its
# path, not its content, and a ``_FILE`` variable would be a file naming a file.
_PATH_KEYS = frozenset({"nats.creds", "nats.tls_ca", "nats.tls_cert", "nats.tls_key"})


def _key_type(rest: str) -> tuple[str, Any] | None:
    """``nats_password`` → ("nats.password", str); None for no such key."""
    for section, struct in _SECTIONS.items():
        if rest.startswith(section + "_"):
            fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
            key = rest[len(section) + 1 :]
            return (f"{section}.{key}", fields[key]) if key in fields else None
    if rest in _TOP_LEVEL:
        fields = {f.name: f.type for f in msgspec.structs.fields(Settings)}
        return rest, fields[rest]
    return None


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    (out.setdefault(section, {}) if section else out)[name] = value


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``BUSD_<SECTION>_<KEY>`` and ``BUSD_<KEY>`` for top-level keys, as a nested dict;
    ``..._FILE`` variants read the value from a file."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # key → the variable that set it
    for name, raw in sorted(env.items()):
        if not name.startswith("BUSD_") or name == "BUSD_CONFIG" or name.startswith("BUSD_TEST_"):
            continue
        rest = name[len("BUSD_") :].lower()
        found = _key_type(rest)
        from_file = found is None and rest.endswith("_file")
        if from_file:
            found = _key_type(rest.removesuffix("_file"))
        if found is None:
            unknown = rest.removesuffix("_file") if from_file else rest
            for section in _SECTIONS:
                if unknown.startswith(section + "_"):
                    unknown = f"{section}.{unknown[len(section) + 1 :]}"
                    break
            raise ConfigError(f"environment variable {name}: unknown key {unknown}")
        key, kind = found
        if key in given:
            raise ConfigError(
                f"environment variables {given[key]} and {name} both set {key}: use one"
            )
        given[key] = name
        if from_file:
            if key in _PATH_KEYS:
                raise ConfigError(
                    f"environment variable {name}: {key} is already a file's "
                    f"path; set {name.removesuffix('_FILE')} to it"
                )
            raw = read_secret(Path(raw), f"environment variable {name}")
        _put(out, key, _env_value(raw, kind, name))
    return out


def _credentials(env: Mapping[str, str]) -> dict[str, Any]:
    """systemd's ``LoadCredential=nats.password:...``: a file named after a key in
    ``$CREDENTIALS_DIRECTORY`` gives its value (a path key gets the file's path). Files not
    named after a key are the unit's other credentials, not busd's business."""
    folder = env.get("CREDENTIALS_DIRECTORY", "")
    if not folder:
        return {}
    try:
        names = sorted(p.name for p in Path(folder).iterdir())
    except OSError as exc:
        raise ConfigError(
            f"CREDENTIALS_DIRECTORY={folder}: cannot list it: {exc.strerror or exc}"
        ) from None
    out: dict[str, Any] = {}
    for file_name in names:
        found = _key_type(file_name.replace(".", "_", 1)) if file_name.count(".") <= 1 else None
        if found is None or found[0] != file_name:
            continue
        key, kind = found
        path = Path(folder) / file_name
        raw = str(path) if key in _PATH_KEYS else read_secret(path, f"credential {file_name}")
        _put(out, key, _env_value(raw, kind, f"credential {file_name}"))
    return out


def _env_value(raw: str, kind: Any, name: str) -> Any:
    """A value as the type of its key reads it: a list key takes a JSON array
    (``["a", "b"]``) or comma-separated values (``a,b``, one value alone is a list of one);
    every other key takes the text as it is (msgspec converts numbers and booleans), so a
    secret holding a comma or a bracket stays the secret."""
    if getattr(kind, "__origin__", None) is not tuple:
        return raw
    text = raw.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{_named(name)}: not a JSON array: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{_named(name)}: expected a JSON array of strings")
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _named(name: str) -> str:
    return name if name.startswith("credential ") else f"environment variable {name}"


def _key_from_error(message: str) -> str:
    found = re.search(r"at `\$\.?([^`]*)`", message)
    if not found:
        return ""
    return re.sub(r"\[(\d+)\]", r"[\1]", found.group(1))


def find_config(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """``--config``, then ``$BUSD_CONFIG``, then ``./busd.toml``; None runs on the defaults."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return path
    if env.get("BUSD_CONFIG"):
        path = Path(env["BUSD_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"BUSD_CONFIG={path}: no such file")
        return path
    local = Path("busd.toml")
    return local if local.is_file() else None


def load(
    explicit: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the frozen settings; every failure is a :class:`ConfigError` naming the key."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = find_config(explicit, env)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    for over in (nats_env(env), _credentials(env), _env_overrides(env), overrides or {}):
        data = layered(data, over)
    nats = data.get("nats")
    name = str(nats.get("context", "")) if isinstance(nats, dict) else ""
    chosen_by = "nats.context"
    if not name:
        name, chosen_by = selected_context(env)
    if name:  # the context is the lowest layer: every other setting overrides it
        data = layered({"nats": {**context_layer(name, chosen_by, env), "context": name}}, data)
    where = f"{path}: " if path else ""
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        key = _key_from_error(text)
        if "unknown field" in text.lower():
            field = re.search(r"`([^`]+)`", text)
            name = field.group(1) if field else "?"
            prefix = f"{key}." if key else ""
            raise ConfigError(f"{where}unknown key {prefix}{name}") from None
        why = text.split(" - at")[0]
        raise ConfigError(f"{where}bad value for {key or 'config'}: {why}") from None
    _check(settings, where)
    return settings


def _check(s: Settings, where: str) -> None:  # noqa: C901 - one flat check per key
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}bad value for {key}: {why}")

    if not s.data_dir:
        raise bad("data_dir", "must not be empty")
    if not s.artifact_roots:
        raise bad("artifact_roots", "needs at least one root")
    c = s.consumer
    if not 1 <= c.batch_max <= 10_000:
        raise bad("consumer.batch_max", "must be between 1 and 10000")
    if not c.batch_max <= c.commit_max <= 100_000:
        raise bad("consumer.commit_max", "must be between consumer.batch_max and 100000")
    if not 1 <= c.batch_wait_ms <= 60_000:
        raise bad("consumer.batch_wait_ms", "must be between 1 and 60000")
    if c.ack_wait_s < 1:
        raise bad("consumer.ack_wait_s", "must be at least 1")
    if not 3 <= c.max_deliver <= 100:
        raise bad("consumer.max_deliver", "must be between 3 and 100")
    if c.max_ack_pending < c.commit_max + c.batch_max:
        raise bad(
            "consumer.max_ack_pending", "must be at least consumer.commit_max + consumer.batch_max"
        )
    if c.stall_s <= 0:
        raise bad("consumer.stall_s", "must be positive")
    if c.shutdown_grace_s <= 0:
        raise bad("consumer.shutdown_grace_s", "must be positive")
    if s.verify.file_wait_s < 0:
        raise bad("verify.file_wait_s", "must not be negative")
    if s.verify.settle_s < 0:
        raise bad("verify.settle_s", "must not be negative")
    if not 0.1 <= s.verify.check_timeout_s <= 3600:
        raise bad("verify.check_timeout_s", "must be between 0.1 and 3600")
    if s.export_partition_seqs and not 1000 <= s.export_partition_seqs <= 10**12:
        raise bad("export_partition_seqs", "must be 0 or between 1000 and 10^12")
    if not 0 <= s.verify.processes <= 64:
        raise bad("verify.processes", "must be between 0 and 64")
    if not 1 <= s.verify.threads <= 64:
        raise bad("verify.threads", "must be between 1 and 64")
    if s.catalog.memory_limit_mb and not 64 <= s.catalog.memory_limit_mb <= 2**24:
        raise bad("catalog.memory_limit_mb", "must be 0 or between 64 and 16777216")
    if s.metrics.listen:
        parse_hostport(s.metrics.listen, "metrics.listen")
    parse_hostport(s.nats.embedded_listen, "nats.embedded_listen")
    if not _IDENT.match(s.nats.stream):
        raise bad("nats.stream", "letters, digits, _ and - only")
    if not _IDENT.match(s.nats.consumer):
        raise bad("nats.consumer", "letters, digits, _ and - only")
    if s.ha.lease_ttl_s < 1:
        raise bad("ha.lease_ttl_s", "must be at least 1")
    if not _IDENT.match(s.ha.bucket):
        raise bad("ha.bucket", "letters, digits, _ and - only")
    if s.nats.stream_replicas not in (1, 3, 5):
        raise bad("nats.stream_replicas", "must be 1, 3 or 5")
    if not s.nats.subjects:
        raise bad("nats.subjects", "needs at least one subject")
    if not 0 < s.nats.connect_timeout_s <= 3600:
        raise bad("nats.connect_timeout_s", "must be more than 0 and at most 3600")
    if s.nats.url:
        for url in s.nats.url.split(","):
            if not re.match(r"^(nats|tls|ws|wss)://[^\s/]+$", url.strip()):
                raise bad("nats.url", f"{url.strip()!r} is not a nats:// URL")
    _check_nats_auth(s.nats, bad)
    _check_nats_names(s.nats, bad)
    _check_lineage(s, bad)
    names: set[str] = set()
    for i, export in enumerate(s.exports):
        if not _IDENT.match(export.name) or export.name.startswith("_"):
            raise bad(f"exports[{i}].name", f"{export.name!r}: letters, digits, _ and - only")
        if export.name in names or export.name in ("runs", "artifacts"):
            raise bad(f"exports[{i}].name", f"{export.name!r} is used twice or reserved")
        names.add(export.name)
        if not export.sql.strip():
            raise bad(f"exports[{i}].sql", "must not be empty")


_SEED = re.compile(r"^S[A-Z2-7]{57}$")  # an nkey seed: 58 base32 characters


def is_nkey_seed(value: str) -> bool:
    """``nats.nkey_seed`` holds the seed itself (``SU...``) or else the path of a file with it."""
    return bool(_SEED.match(value.strip()))


def _check_nats_auth(  # noqa: C901 - one flat check per auth option
    n: NatsSettings, bad: Callable[[str, str], ConfigError]
) -> None:
    """Files the credentials name must be readable now, not at the first connect; secrets are
    never echoed in the messages, paths are."""

    def readable(key: str, path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise bad(key, f"cannot read {path}: {exc.strerror or exc}") from None

    if n.creds and n.nkey_seed:
        raise bad("nats.nkey_seed", "set nats.creds or nats.nkey_seed, not both")
    if n.password and not n.user:
        raise bad("nats.password", "needs nats.user")
    if n.user and n.token:
        raise bad("nats.token", "set nats.user/nats.password or nats.token, not both")
    if (n.creds or n.nkey_seed) and importlib.util.find_spec("nkeys") is None:
        key = "nats.creds" if n.creds else "nats.nkey_seed"
        raise bad(key, "needs the nkeys package: pip install 'nats-py[nkeys]'")
    if n.creds:
        text = readable("nats.creds", n.creds)
        # nats-py reads a file without these markers forever instead of failing.
        if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
            raise bad(
                "nats.creds",
                f"{n.creds} is not a NATS credentials file (a user JWT and its nkey seed)",
            )
    if n.nkey_seed:
        value = n.nkey_seed.strip()
        if is_nkey_seed(value):
            seed = value
        elif re.match(r"^S[A-Z0-9]+$", value) and not Path(value).exists():
            # a mistyped seed, perhaps: say so without echoing it
            raise bad("nats.nkey_seed", "neither an nkey seed (SU...) nor an existing file")
        else:
            seed = readable("nats.nkey_seed", n.nkey_seed).strip()
            if not is_nkey_seed(seed):
                raise bad("nats.nkey_seed", f"{n.nkey_seed} does not hold an nkey seed")
        if not seed.startswith("SU"):
            raise bad("nats.nkey_seed", "must be a user nkey seed (SU...), not another kind")
    if n.tls_key and not n.tls_cert:
        raise bad("nats.tls_key", "needs nats.tls_cert")
    for key, path in (
        ("nats.tls_ca", n.tls_ca),
        ("nats.tls_cert", n.tls_cert),
        ("nats.tls_key", n.tls_key),
    ):
        if path:
            readable(key, path)


_SUBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")  # no wildcards


def _check_nats_names(n: NatsSettings, bad: Callable[[str, str], ConfigError]) -> None:
    if not _SUBJECT_PREFIX.match(n.inbox_prefix):
        raise bad(
            "nats.inbox_prefix",
            f"{n.inbox_prefix!r} is not a subject prefix "
            "(tokens of letters, digits, _, - and $, no wildcards)",
        )
    if n.js_domain and not re.match(r"^[A-Za-z0-9_-]{1,64}$", n.js_domain):
        raise bad("nats.js_domain", f"{n.js_domain!r}: letters, digits, _ and - only")
    if n.js_api_prefix and not _SUBJECT_PREFIX.match(n.js_api_prefix):
        raise bad("nats.js_api_prefix", f"{n.js_api_prefix!r} is not a subject prefix")
    if n.js_domain and n.js_api_prefix:
        raise bad("nats.js_api_prefix", "set nats.js_domain or nats.js_api_prefix, not both")
    if len(n.name) > 200 or any(not c.isprintable() for c in n.name):
        raise bad("nats.name", "at most 200 printable characters")


def _check_lineage(s: Settings, bad: Callable[[str, str], ConfigError]) -> None:
    n = s.lineage
    if n.url and n.subject:
        raise bad("lineage.subject", "set lineage.url or lineage.subject, not both")
    if n.url and not re.match(r"^https?://[^\s/]+(/\S*)?$", n.url):
        raise bad("lineage.url", f"{n.url!r} is not an http:// or https:// URL")
    if n.subject:
        if not _SUBJECT_PREFIX.match(n.subject):
            raise bad("lineage.subject", f"{n.subject!r} is not a subject (no wildcards)")
        caught = [f for f in s.nats.subjects if subject_matches(f, n.subject)]
        if caught:  # busd would consume its own lineage events as artifact events
            raise bad("lineage.subject", f"{n.subject!r} is inside the stream's {caught[0]!r}")
    if not n.namespace or len(n.namespace) > 200 or not n.namespace.isprintable():
        raise bad("lineage.namespace", "1 to 200 printable characters")
    if not 0 < n.timeout_s <= 300:
        raise bad("lineage.timeout_s", "must be more than 0 and at most 300")
    if not 1 <= n.queue_max <= 1_000_000:
        raise bad("lineage.queue_max", "must be between 1 and 1000000")


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(want) == len(got)


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); a ConfigError naming ``key`` otherwise."""
    match = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(
        r"^([^:\[\]]+):(\d+)$", text
    )
    if not match:
        raise ConfigError(f"bad value for {key}: {text!r} is not host:port")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad value for {key}: port {port} out of range")
    return match.group(1), port
