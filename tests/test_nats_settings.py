"""NATS the way NATS users configure clients (issue 14), against real nats-servers.

- The ecosystem's settings: ``NATS_URL``, ``NATS_CREDS``, ``NATS_NKEY``, ``NATS_CA`` /
  ``NATS_CERT`` / ``NATS_KEY`` and the nats CLI's contexts (``NATS_CONTEXT``, ``nats.context``,
  the context ``nats context select`` chose, under ``$XDG_CONFIG_HOME`` or ``~/.config``), with
  the documented precedence: defaults < context < busd.toml < NATS_* < BUSD_* < flags.
- The connection's name as the server's monitoring shows it (``/connz``), and busd's private
  inbox prefix on its subscriptions.
- A JetStream domain (and the same API as a prefix) on a server whose permissions allow only
  that domain's API: busd init, submit and serve work, so no request goes to ``$JS.API``.
- Bind-only: a missing stream or consumer is named, exit 1, nothing is created or updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from support import BUSD, Bus, wait_for

from busd import config, source
from busd.config import NatsSettings, Settings
from busd.embedded import EmbeddedServer, server_config
from busd.errors import ConfigError

HOST = socket.gethostname()


# ---- 1. precedence: defaults < context < busd.toml < NATS_* < BUSD_* < flags -----------------


def write_context(folder: Path, name: str, **keys: Any) -> Path:
    """A context file as `nats context save` writes it (``folder`` is the nats config dir)."""
    path = folder / "context" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "description": "",
                "url": "",
                "token": "",
                "user": "",
                "password": "",
                "creds": "",
                "nkey": "",
                "cert": "",
                "key": "",
                "ca": "",
                "nsc": "",
                "jetstream_domain": "",
                "jetstream_api_prefix": "",
                "jetstream_event_prefix": "",
                "inbox_prefix": "",
                "user_jwt": "",
                "color_scheme": "",
                "tls_first": False,
                **keys,
            }
        )
    )
    return path


def select(folder: Path, name: str) -> None:
    (folder / "context.txt").write_text(name)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME with a ~/.config/nats, and a working folder without busd.toml."""
    (tmp_path / "home" / ".config" / "nats").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "home"


def nats_dir(home: Path) -> Path:
    return home / ".config" / "nats"


def load(
    home: Path,
    toml: str = "",
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    path = None
    if toml:
        path = home.parent / "busd.toml"
        path.write_text(toml)
    return config.load(
        str(path) if path else None, env={"HOME": str(home), **(env or {})}, overrides=overrides
    )


def test_defaults_without_any_context(home: Path) -> None:
    s = load(home)
    assert (s.nats.url, s.nats.context, s.nats.name) == ("", "", "")
    assert s.nats.inbox_prefix == "_INBOX_busd"
    assert (s.nats.js_domain, s.nats.js_api_prefix, s.nats.bind_only) == ("", "", False)


def test_the_selected_context_fills_what_nothing_else_sets(home: Path) -> None:
    folder = nats_dir(home)
    (home / "ops.creds").write_text(
        "-----BEGIN NATS USER JWT-----\nx\n-----BEGIN USER NKEY SEED-----\nSU\n"
    )
    write_context(
        folder,
        "prod",
        url="nats://prod.example:4222",
        creds="~/ops.creds",
        jetstream_domain="hub",
        inbox_prefix="_INBOX_ops",
        color_scheme="dark",
    )
    select(folder, "prod")
    s = load(home)
    assert s.nats.context == "prod"
    assert s.nats.url == "nats://prod.example:4222"
    assert s.nats.creds == str(home / "ops.creds")  # ~ expanded, as the nats CLI does
    assert (s.nats.js_domain, s.nats.inbox_prefix) == ("hub", "_INBOX_ops")


def test_precedence_layer_by_layer(home: Path) -> None:
    folder = nats_dir(home)
    write_context(folder, "prod", url="nats://context:4222")
    select(folder, "prod")
    toml = '[nats]\nurl = "nats://toml:4222"\n'
    assert load(home).nats.url == "nats://context:4222"
    assert load(home, toml).nats.url == "nats://toml:4222"
    env = {"NATS_URL": "nats://nats-env:4222"}
    assert load(home, toml, env=env).nats.url == "nats://nats-env:4222"
    env["BUSD_NATS_URL"] = "nats://busd-env:4222"
    assert load(home, toml, env=env).nats.url == "nats://busd-env:4222"
    flags = {"nats": {"url": "nats://flag:4222"}}
    assert load(home, toml, env=env, overrides=flags).nats.url == "nats://flag:4222"
    # the context still gives what no layer above it sets
    write_context(folder, "prod", url="nats://context:4222", jetstream_domain="hub")
    assert load(home, toml, env=env, overrides=flags).nats.js_domain == "hub"


def test_which_context(home: Path, tmp_path: Path) -> None:
    folder = nats_dir(home)
    for name in ("selected", "by-env", "by-toml", "by-busd-env", "by-flag"):
        write_context(folder, name, url=f"nats://{name}:4222")
    select(folder, "selected")
    assert load(home).nats.url == "nats://selected:4222"
    toml = '[nats]\ncontext = "by-toml"\n'
    assert load(home, toml).nats.url == "nats://by-toml:4222"
    env = {"NATS_CONTEXT": "by-env"}
    assert load(home, toml, env=env).nats.url == "nats://by-env:4222"
    env["BUSD_NATS_CONTEXT"] = "by-busd-env"
    assert load(home, toml, env=env).nats.url == "nats://by-busd-env:4222"
    s = load(home, toml, env=env, overrides={"nats": {"context": "by-flag"}})
    assert (s.nats.context, s.nats.url) == ("by-flag", "nats://by-flag:4222")
    # XDG_CONFIG_HOME moves the nats CLI's folder
    xdg = tmp_path / "xdg"
    write_context(xdg / "nats", "elsewhere", url="nats://xdg:4222")
    select(xdg / "nats", "elsewhere")
    assert load(home, env={"XDG_CONFIG_HOME": str(xdg)}).nats.url == "nats://xdg:4222"


def test_a_missing_or_broken_context_is_named(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"nats context 'nope'.*no such context"):
        load(home, env={"NATS_CONTEXT": "nope"})
    select(nats_dir(home), "gone")
    with pytest.raises(ConfigError, match=r"nats context 'gone'.*context.txt.*no such context"):
        load(home)
    (nats_dir(home) / "context").mkdir()
    (nats_dir(home) / "context" / "gone.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"nats context 'gone'.*not JSON"):
        load(home)
    with pytest.raises(ConfigError, match="not a context name"):
        load(home, env={"NATS_CONTEXT": "../../etc/passwd"})


def test_a_higher_layer_s_way_of_authenticating_replaces_the_context_s(home: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    seed_file = home / "busd.nk"
    seed_file.write_text(seed + "\n")
    write_context(nats_dir(home), "prod", url="nats://context:4222", token="ctx-token")
    select(nats_dir(home), "prod")
    assert load(home).nats.token == "ctx-token"
    s = load(home, '[nats]\nuser = "busd"\n', env={"BUSD_NATS_PASSWORD": "pw"})
    assert (s.nats.user, s.nats.password, s.nats.token) == ("busd", "pw", "")
    s = load(home, '[nats]\nuser = "busd"\npassword = "pw"\n', env={"NATS_NKEY": str(seed_file)})
    assert (s.nats.nkey_seed, s.nats.user, s.nats.password) == (str(seed_file), "", "")


def test_nats_variables_as_the_nats_cli_reads_them(home: Path) -> None:
    files = {name: home / name for name in ("busd.creds", "ca.pem", "cert.pem", "key.pem")}
    files["busd.creds"].write_text(
        "-----BEGIN NATS USER JWT-----\nx\n-----BEGIN USER NKEY SEED-----\nSU\n"
    )
    for name in ("ca.pem", "cert.pem", "key.pem"):
        files[name].write_text("pem")
    s = load(
        home,
        env={
            "NATS_URL": "nats://a:4222,nats://b:4222",
            "NATS_CREDS": str(files["busd.creds"]),
            "NATS_CA": str(files["ca.pem"]),
            "NATS_CERT": str(files["cert.pem"]),
            "NATS_KEY": str(files["key.pem"]),
        },
    )
    assert s.nats.url == "nats://a:4222,nats://b:4222"
    assert s.nats.creds == str(files["busd.creds"])
    assert (s.nats.tls_ca, s.nats.tls_cert, s.nats.tls_key) == (
        str(files["ca.pem"]),
        str(files["cert.pem"]),
        str(files["key.pem"]),
    )
    with pytest.raises(ConfigError, match=r"bad value for nats\.url"):
        load(home, env={"NATS_URL": "http://nope"})


def test_nats_token_as_the_nats_cli_reads_it(home: Path) -> None:
    """NATS_TOKEN (the nats CLI's --token) sets nats.token: a way of authenticating that
    replaces the file's user and password, and that BUSD_NATS_TOKEN overrides."""
    s = load(home, '[nats]\nuser = "busd"\npassword = "pw"\n', env={"NATS_TOKEN": "t-1"})
    assert (s.nats.token, s.nats.user, s.nats.password) == ("t-1", "", "")
    s = load(home, env={"NATS_TOKEN": "t-1", "BUSD_NATS_TOKEN": "t-2"})
    assert s.nats.token == "t-2"
    # there is no NATS_INBOX_PREFIX in the nats CLI: the prefix comes from busd's own keys
    assert load(home, env={"NATS_INBOX_PREFIX": "_INBOX_x"}).nats.inbox_prefix == "_INBOX_busd"


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"inbox_prefix": "_INBOX.>"}, "nats.inbox_prefix"),
        ({"inbox_prefix": ""}, "nats.inbox_prefix"),
        ({"js_domain": "a.b"}, "nats.js_domain"),
        ({"js_api_prefix": "$JS.*.API"}, "nats.js_api_prefix"),
        ({"js_domain": "hub", "js_api_prefix": "$JS.hub.API"}, "nats.js_api_prefix"),
        ({"name": "busd\n"}, "nats.name"),
    ],
)
def test_bad_values_name_the_key(home: Path, keys: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=f"bad value for {named}"):
        load(home, overrides={"nats": keys})


# ---- 2. the connection's name and busd's inbox prefix, as the server sees them ---------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connz(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/connz?subs=1", timeout=5) as reply:
        conns: list[dict[str, Any]] = json.load(reply)["connections"]
    return conns


def test_connection_names_and_private_inboxes_in_server_monitoring(tmp_path: Path) -> None:
    monitor = free_port()
    server = EmbeddedServer(
        "127.0.0.1", 0, tmp_path / "nats", extra_config=f'http: "127.0.0.1:{monitor}"\n'
    )
    server.start()
    s = config.load(env={}, overrides={"nats": {"url": server.url}})
    named = config.load(env={}, overrides={"nats": {"url": server.url, "name": "busd-a"}})

    async def go() -> dict[str, list[str]]:
        conns = [
            await source.connect(s.nats, server.url),  # the daemon's
            await source.connect(named.nats, server.url),
            await source.connect(s.nats, server.url, reconnect=False),  # a CLI command's
            await source.connect(s.nats, server.url, name="busd-submit", reconnect=False),
        ]
        try:
            await source.ensure_stream(conns[0], s)
            await source.ensure_consumer(conns[0], s)
            pull = source.PullSource(conns[0], s.nats.stream, s.nats.consumer)
            await pull.start()
            await source.request(conns[0], "$JS.API.INFO", b"", timeout_s=5)
            await conns[0].flush()
            return {c["name"]: list(c.get("subscriptions_list") or []) for c in connz(monitor)}
        finally:
            for nc in conns:
                await nc.close()

    try:
        seen = asyncio.run(go())
    finally:
        server.stop()
    assert set(seen) == {f"busd@{HOST}", "busd-a", f"busd-cli@{HOST}", f"busd-submit@{HOST}"}
    subs = seen[f"busd@{HOST}"]
    assert subs and all(sub.startswith("_INBOX_busd.") for sub in subs), subs


# ---- 3. a JetStream domain across a leafnode: the stream lives in the hub ------------------


def run_busd(
    bus: Bus, *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """The real busd, nothing from this process's BUSD_* or NATS_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BUSD_", "NATS_"))}
    return subprocess.run(
        [*BUSD, *args],
        cwd=bus.root,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def commits(bus: Bus, run_id: str, *config_args: str, env: dict[str, str] | None = None) -> None:
    """`busd init`, `busd submit`, `busd serve --drain`: the event is committed."""
    init = run_busd(bus, "init", *config_args, env=env)
    assert init.returncode == 0, init.stderr
    fills = bus.parquet(f"{run_id}/fills.parquet")
    submit = run_busd(
        bus,
        "submit",
        *config_args,
        "--run-id",
        run_id,
        "--kind",
        "simulation",
        f"fills={fills}",
        env=env,
    )
    assert submit.returncode == 0, submit.stderr
    serve = run_busd(bus, "serve", "--drain", *config_args, env=env)
    assert serve.returncode == 0, serve.stderr
    assert (run_id, "committed") in bus.sql("SELECT run_id, outcome FROM catalog.events_f")


def streams_on(url: str) -> list[str]:
    """The streams of a server's own JetStream (its local API, not busd's settings)."""

    async def go() -> list[str]:
        nc = await source.connect(NatsSettings(), url, reconnect=False)
        try:
            return sorted(str(i.config.name) for i in await source.jetstream(nc).streams_info())
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.parametrize("how", [{"js_domain": "hub"}, {"js_api_prefix": "$JS.hub.API"}])
def test_jetstream_domain_and_api_prefix(tmp_path: Path, how: dict[str, str]) -> None:
    """busd connects to a leaf server with JetStream of its own (domain leaf) and uses the
    hub's (domain hub): had any request gone to the local $JS.API, the leaf would hold a
    stream or a consumer."""
    leaf_port = free_port()
    hub = EmbeddedServer(
        "127.0.0.1",
        0,
        tmp_path / "hub",
        extra_config=f'server_name: hub\nleafnodes {{ listen: "127.0.0.1:{leaf_port}" }}\n',
        jetstream_config="  domain: hub\n",
    )
    leaf = EmbeddedServer(
        "127.0.0.1",
        0,
        tmp_path / "leaf",
        extra_config="server_name: leaf\nleafnodes { remotes: [ { url: "
        f'"nats-leaf://127.0.0.1:{leaf_port}" }} ] }}\n',
        jetstream_config="  domain: leaf\n",
    )
    hub.start()
    try:
        leaf.start()
        bus = Bus(tmp_path, leaf)
        bus.artifacts.mkdir(parents=True, exist_ok=True)
        bus.write_config(nats=how, ha={"enabled": True, "lease_ttl_s": 5})
        commits(bus, "domain-1", "--config", str(bus.root / "busd.toml"))
        s = bus.settings(nats=how)

        async def in_process() -> tuple[int, int, float, bytes]:
            nc = await source.connect(s.nats, bus.url, reconnect=False)
            try:
                pending, ack_pending = await source.consumer_state(nc, s)
                age = await source.lag_age_s(nc, s)
                bucket = await source.Bucket.open(nc, "busd_test", 5.0)
                await bucket.create("k", b"v")
                return pending, ack_pending, age, (await bucket.get("k"))[1]
            finally:
                await nc.close()

        assert asyncio.run(in_process()) == (0, 0, 0.0, b"v")
        assert streams_on(hub.url) == ["ARTIFACTS", "KV_busd_leases", "KV_busd_test"]
        assert streams_on(leaf.url) == []
    finally:
        leaf.stop()
        hub.stop()


# ---- 4. the README's tour with NATS_URL alone ------------------------------------------------


def test_nats_url_alone(bus: Bus) -> None:
    (bus.root / "busd.toml").unlink(missing_ok=True)
    bus.artifacts.mkdir(parents=True, exist_ok=True)
    env = {
        "NATS_URL": bus.url,
        "BUSD_ARTIFACT_ROOTS": str(bus.artifacts),
        "BUSD_METRICS_LISTEN": "",
        "BUSD_CONSUMER_BATCH_WAIT_MS": "50",
    }
    commits(bus, "nats-url-1", env=env)
    # on that server, not on an embedded one busd would start without a URL
    assert not (bus.data / "nats").exists()
    assert streams_on(bus.url) == ["ARTIFACTS"]

    async def stored() -> int:
        nc = await source.connect(NatsSettings(), bus.url, reconnect=False)
        try:
            return int((await source.jetstream(nc).stream_info("ARTIFACTS")).state.messages)
        finally:
            await nc.close()

    assert asyncio.run(stored()) == 1


# ---- 5. bind-only: a stream and consumer managed elsewhere -----------------------------------


def stream_names(bus: Bus, s: Settings) -> tuple[list[str], list[str]]:
    async def go() -> tuple[list[str], list[str]]:
        nc = await source.connect(s.nats, bus.url, reconnect=False)
        try:
            js = source.jetstream(nc)
            streams = [i.config.name for i in await js.streams_info()]
            consumers = (
                [i.name for i in await js.consumers_info(s.nats.stream)]
                if s.nats.stream in streams
                else []
            )
            return [str(n) for n in streams], [str(n) for n in consumers]
        finally:
            await nc.close()

    return asyncio.run(go())


def one_busd_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "bind_only" in line]
    assert lines, result.stderr
    return lines[0]


def bare_bus(tmp_path: Path, server: EmbeddedServer) -> Bus:
    """A world on a server where nothing was declared yet (the ``bus`` fixture inits)."""
    bus = Bus(tmp_path, server)
    bus.artifacts.mkdir(parents=True, exist_ok=True)
    return bus


def test_bind_only(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    bus = bare_bus(tmp_path, nats_server)
    conf = str(bus.write_config(nats={"bind_only": True}))
    s = bus.settings(nats={"bind_only": True})
    for command in (("init",), ("serve", "--drain")):
        missing = run_busd(bus, *command, "--config", conf, timeout=60)
        assert missing.returncode == 1, missing.stderr
        assert "stream ARTIFACTS not found" in one_busd_line(missing)
    assert stream_names(bus, s) == ([], [])  # nothing was created

    # the stream managed elsewhere, not yet the consumer
    managed = bus.settings()

    async def declare(consumer: bool) -> None:
        nc = await source.connect(managed.nats, bus.url, reconnect=False)
        try:
            await source.ensure_stream(nc, managed)
            if consumer:  # its own settings: busd must not "fix" them
                cfg = source.consumer_config(managed)
                cfg.max_ack_pending = 12_345
                cfg.description = "managed by terraform"
                await source.jetstream(nc).add_consumer(managed.nats.stream, cfg)
        finally:
            await nc.close()

    asyncio.run(declare(consumer=False))
    for command in (("init",), ("serve", "--drain")):
        missing = run_busd(bus, *command, "--config", conf, timeout=60)
        assert missing.returncode == 1, missing.stderr
        assert "consumer busd on stream ARTIFACTS not found" in one_busd_line(missing)
    assert stream_names(bus, s) == (["ARTIFACTS"], [])

    asyncio.run(declare(consumer=True))
    commits(bus, "bind-1", "--config", conf)

    async def managed_settings() -> tuple[int, str]:
        nc = await source.connect(s.nats, bus.url, reconnect=False)
        try:
            info = await source.ensure_consumer(nc, s)
            return int(info.config.max_ack_pending or 0), str(info.config.description)
        finally:
            await nc.close()

    # neither init nor serve updated it to busd's settings
    assert asyncio.run(managed_settings()) == (12_345, "managed by terraform")


def test_bind_only_ensure_functions_in_process(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    bus = bare_bus(tmp_path, nats_server)
    s = bus.settings(nats={"bind_only": True})

    async def go() -> None:
        nc = await source.connect(s.nats, bus.url, reconnect=False)
        try:
            with pytest.raises(source.BindOnlyMissing, match="stream ARTIFACTS"):
                await source.ensure_stream(nc, s)
            with pytest.raises(source.BindOnlyMissing, match="stream ARTIFACTS"):
                await source.ensure_consumer(nc, s)
        finally:
            await nc.close()

    asyncio.run(go())


def test_nats_settings_defaults_are_the_documented_ones() -> None:
    n = NatsSettings()
    assert (n.name, n.inbox_prefix, n.bind_only) == ("", "_INBOX_busd", False)
    assert source.api_prefix(n) == "$JS.API"
    assert source.api_prefix(NatsSettings(js_domain="hub")) == "$JS.hub.API"
    assert source.api_prefix(NatsSettings(js_api_prefix="JS.acc.API")) == "JS.acc.API"


# ---- 6. `busd --context NAME`: the flag picks the context, as in the nats CLI ----------------


def test_context_flag(tmp_path: Path, nats_server: EmbeddedServer) -> None:
    bus = bare_bus(tmp_path, nats_server)
    home = tmp_path / "home"
    write_context(home / ".config" / "nats", "lab", url=bus.url, inbox_prefix="_INBOX_lab")
    write_context(home / ".config" / "nats", "elsewhere", url="nats://127.0.0.1:1")
    select(home / ".config" / "nats", "elsewhere")
    env = {"HOME": str(home), "BUSD_ARTIFACT_ROOTS": str(bus.artifacts), "BUSD_METRICS_LISTEN": ""}
    init = run_busd(bus, "--context", "lab", "init", env=env, timeout=60)
    assert init.returncode == 0, init.stderr
    assert streams_on(bus.url) == ["ARTIFACTS"]
    missing = run_busd(bus, "--context", "nope", "init", env=env, timeout=60)
    assert missing.returncode == 2, missing.stderr
    assert "nats context 'nope'" in missing.stderr
    assert "no such context" in missing.stderr


@contextlib.contextmanager
def restricted(tmp_path: Path, user: str, deny: str) -> Iterator[tuple[Bus, dict[str, str]]]:
    """A server with an ``admin`` and a ``user`` who may not publish to ``deny``; the bus
    initialised as admin, and the restricted user's ``nats`` settings."""
    extra = (
        "accounts { A { jetstream: enabled, users: [\n"
        "  {user: admin, password: admin}\n"
        f"  {{user: {user}, password: {user}, permissions: "
        f'{{publish: {{allow: [">"], deny: [{deny}]}}}}}}\n'
        "] } }\n"
    )
    server = EmbeddedServer("127.0.0.1", 0, tmp_path / "nats", extra_config=extra)
    server.start()
    try:
        bus = Bus(tmp_path, server)
        bus.artifacts.mkdir(parents=True, exist_ok=True)
        bus.cluster_url = server.url.replace("nats://", "nats://admin:admin@")
        bus.init()  # the stream and the consumer, as admin
        yield bus, {"url": server.url, "user": user, "password": user}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("denied", "seen"),
    [('"$JS.ACK.>"', "$JS.ACK"), ('"$JS.API.CONSUMER.>"', "$JS.API.CONSUMER")],
    ids=["acks", "consumer-api"],
)
def test_a_permissions_violation_is_named(tmp_path: Path, denied: str, seen: str) -> None:
    """busd's user may not publish where busd must (its acks, or the consumer API): the
    server says so only in an -ERR that nats-py passes to the error callback, the publish
    itself succeeding. busd logs it at error level naming the subject, and names it in the
    waits it causes. Before: acks silently dropped (events redelivered and acked again as
    duplicates forever), or 'NATS does not answer; retrying' with nothing about
    permissions (2 of 2 runs each of a reviewer helper's script)."""
    with restricted(tmp_path, "busd", denied) as (bus, user):
        bus.publish([bus.event("r-1")])
        cfg = bus.write_config(nats=user, consumer={"stall_s": 30})
        proc = bus.spawn("serve", "--config", str(cfg))
        try:
            wait_for(
                lambda: (
                    "check its credentials and permissions" in bus.log() or proc.poll() is not None
                ),
                60,
                "the violation named",
            )
            lines = [
                line
                for line in bus.log().splitlines()
                if "check its credentials and permissions" in line
            ]
            assert lines and seen.lower() in lines[0].lower(), bus.log()[-3000:]  # nats-py
            assert json.loads(lines[0])["level"] == "error"  # lowercases the server's -ERR
            if seen == "$JS.API.CONSUMER":  # busd's start waits for the consumer: why, said
                wait_for(lambda: "nats_refused" in bus.log(), 60, "the wait's cause named")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def test_a_denied_submit_names_the_refusal(tmp_path: Path) -> None:
    """A producer whose user may not publish events: `busd submit` fails naming the
    server's refusal, not only the timeout it sees (a reviewer helper's finding: the
    refusal went unsaid outside the daemon)."""
    with restricted(tmp_path, "lab", '"artifacts.>"') as (bus, user):
        cfg = bus.write_config(nats=user)
        path = bus.parquet("job/fills.parquet")
        out = bus.cli(
            "submit", "--config", str(cfg), "--run-id", "r", "--kind", "k", f"fills={path}"
        )
        assert out.returncode != 0, out.stdout
        assert "NATS refused" in out.stderr and "artifacts." in out.stderr, out.stderr


@pytest.mark.parametrize("how", ["restart", "reload"])
def test_credentials_refused_while_reconnecting_end_busd_naming_them(
    tmp_path: Path, how: str
) -> None:
    """busd is connected, then nats-server restarts with busd's password changed (nats-py
    tries to reconnect forever, and no try will be let in; busd logs the refusal), or
    reloads its config with it (SIGHUP: nats-py closes the connection for good). busd exits
    1 once stall_s passes without a reconnect, as a start with those credentials would.
    Before: only 'nats disconnected', no exit and the watchdog pinged on (reviewer
    helpers' scripts, 2 of 2 and 3 of 3 runs)."""

    def users(password: str) -> str:
        return (
            "accounts { A { jetstream: enabled, users: [\n  {user: admin, password: admin}\n"
            f"  {{user: busd, password: {password}}}\n] }} }}\n"
        )

    server = EmbeddedServer("127.0.0.1", 0, tmp_path / "nats", extra_config=users("old"))
    server.start()
    try:
        bus = Bus(tmp_path, server)
        bus.artifacts.mkdir(parents=True, exist_ok=True)
        bus.cluster_url = server.url.replace("nats://", "nats://admin:admin@")
        bus.init()
        user = {"url": server.url, "user": "busd", "password": "old"}
        cfg = bus.write_config(nats=user, consumer={"stall_s": 3})
        proc = bus.spawn("serve", "--config", str(cfg))
        try:
            bus.while_alive(proc, lambda: "busd ready" in bus.log(), 30, "ready")
            server.extra_config = users("rotated")
            if how == "restart":
                server.kill()
                server.start()
            else:
                conf = server.store_dir / "nats-server.conf"
                conf.write_text(
                    server_config(server.host, server.port, server.store_dir, users("rotated"))
                )
                assert server.proc is not None
                server.proc.send_signal(signal.SIGHUP)
            assert proc.wait(60) == 1, bus.log()[-3000:]
        finally:
            proc.kill()
            proc.wait(10)
        log = bus.log()
        if how == "restart":
            assert "check its credentials and permissions" in log, log[-3000:]
        assert "NATS has refused busd's reconnects for 3s: credentials refused" in log, log[-3000:]
    finally:
        server.stop()


def test_a_message_larger_than_a_pull_requests_byte_limit_is_still_delivered(
    tmp_path: Path,
) -> None:
    """A pull request asks for at most 16 MiB. On a stream busd did not create, on a server
    that takes larger payloads, a 17 MiB message came to no request: the server answered
    each with 409 "Message Size Exceeds MaxBytes" and busd stalled before it, silently (a
    reviewer's script). busd now asks without the limit, and says so."""
    server = EmbeddedServer(
        "127.0.0.1", 0, tmp_path / "store", extra_config="max_payload: 32MB\nmax_pending: 128MB\n"
    )
    server.start()

    async def go() -> list[list[int]]:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="BIG", subjects=["big.>"], max_msg_size=-1)
            await js.publish("big.a", b"x" * (17 << 20))
            await js.publish("big.b", b"small")
            await source.add_reader(nc, "BIG", "reader", 1, idle_s=60.0)
            pull = source.PullSource(nc, "BIG", "reader")
            await pull.start()
            got: list[list[int]] = []
            for _ in range(6):  # bounded: the first fetch meets the 409, the next asks again
                got.append([len(d.data) for d in await pull.fetch(10, 500)])
                if sum(len(g) for g in got) == 2:
                    break
            await pull.stop()
            return got
        finally:
            await nc.close()

    try:
        got = asyncio.run(go())
    finally:
        server.stop()
    assert [n for batch in got for n in batch] == [17 << 20, 5]
