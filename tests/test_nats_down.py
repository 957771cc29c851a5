"""NATS unreachable (docs/reference/daemon.md): real processes against a port where nothing
listens and against a listener that accepts connections but never speaks.

Every command but ``serve`` fails within ``nats.connect_timeout_s`` with one line naming the
URL; ``submit --outbox`` keeps the event and exits 0; ``serve`` waits, says so, and starts
once a server answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from support import BUSD, Bus, wait_for

from busd import config, source
from busd.embedded import EmbeddedServer, server_binary

CONNECT_TIMEOUT_S = 1.0
# a command that waits out the client's reconnect attempts hangs until its subprocess timeout;
# one that gives up after the connect timeout returns within seconds, plus its own start (a
# replay opens the catalog and starts its file-check workers first), which a loaded machine
# stretches several-fold: the bound tells the two apart without timing busd itself
SETTLES_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["refused", "silent"])
def dead_nats(request: pytest.FixtureRequest) -> Iterator[str]:
    """A NATS URL that does not answer: nothing listening, or a socket whose backlog takes
    the TCP handshake but that never accepts, so no INFO ever comes."""
    if request.param == "refused":
        yield f"nats://127.0.0.1:{free_port()}"
        return
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"nats://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture(scope="module")
def startup_s() -> float:
    """What starting the interpreter and importing busd costs on this machine now, so the
    bound below is on the command's wait for NATS, not on a loaded CI runner."""
    began = time.monotonic()
    subprocess.run([*BUSD, "schema"], capture_output=True, check=True, timeout=60)
    return time.monotonic() - began


def timed(bus: Bus, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    out = bus.cli(*args, timeout=90)
    return time.monotonic() - began, out


COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("init",),
    ("rejections", "list"),
    ("rejections", "show", "1"),
    ("rejections", "retry", "1"),
    ("rebuild",),
    ("verify",),
    ("export",),
    ("outbox", "flush", "OUTBOX"),
    ("submit", "--run-id", "r1", "--kind", "k", "fills=FILE"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(c[:2]))
def test_commands_fail_fast_naming_the_url(
    bus: Bus, dead_nats: str, startup_s: float, command: tuple[str, ...]
) -> None:
    cfg = bus.write_config(nats={"url": dead_nats, "connect_timeout_s": CONNECT_TIMEOUT_S})
    outbox = bus.root / "outbox"
    outbox.mkdir(exist_ok=True)
    (outbox / "00000000000000000001-e.json").write_text(
        json.dumps({"subject": "artifacts.lab", "headers": {}, "payload": "{}"})
    )
    file = bus.parquet("r1/fills.parquet")
    args = [a.replace("OUTBOX", str(outbox)).replace("FILE", str(file)) for a in command]
    elapsed, out = timed(bus, *args, "--config", str(cfg))
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert dead_nats in lines[0] and "Traceback" not in out.stderr
    assert elapsed < CONNECT_TIMEOUT_S + SETTLES_S + startup_s, f"{elapsed:.1f}s: {lines[0]}"
    # nothing was lost: the outbox still holds its event
    assert len(list(outbox.glob("*.json"))) == 1


def test_submit_outbox_keeps_the_event_and_flush_commits_it_once(
    bus: Bus, dead_nats: str, startup_s: float
) -> None:
    down = bus.write_config(nats={"url": dead_nats, "connect_timeout_s": CONNECT_TIMEOUT_S})
    outbox = bus.root / "outbox"
    path = bus.parquet("job/fills.parquet", rows=5)
    elapsed, out = timed(
        bus,
        "submit",
        "--config",
        str(down),
        "--run-id",
        "job-1",
        "--kind",
        "backtest",
        "--producer",
        "lab.backtest",
        "--outbox",
        str(outbox),
        f"fills={path}",
    )
    assert out.returncode == 0, out.stderr
    assert elapsed < CONNECT_TIMEOUT_S + SETTLES_S + startup_s, f"{elapsed:.1f}s"
    result = json.loads(out.stdout)
    assert result["state"] == "outbox"
    kept = list(outbox.glob("*.json"))
    assert len(kept) == 1
    entry = json.loads(kept[0].read_text())
    assert set(entry) == {"subject", "headers", "payload"}
    assert entry["subject"] == "artifacts.lab.backtest"
    assert entry["headers"] == {"Nats-Msg-Id": result["event_id"]}

    up = bus.write_config()
    flushed = bus.cli("outbox", "flush", "--config", str(up), str(outbox))
    assert flushed.returncode == 0, flushed.stderr
    assert json.loads(flushed.stdout)["sent"] == 1
    assert not list(outbox.glob("*.json"))
    bus.drain()
    assert bus.sql("SELECT run_id, outcome FROM catalog.events_f") == [("job-1", "committed")]
    assert bus.sql("SELECT run_id, name, rows FROM catalog.artifacts_f") == [("job-1", "fills", 5)]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_serve_waits_for_nats_then_commits(bus: Bus, tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    metrics = free_port()
    cfg = bus.write_config(
        nats={"url": url, "connect_timeout_s": CONNECT_TIMEOUT_S},
        metrics={"listen": f"127.0.0.1:{metrics}"},
    )
    base = f"http://127.0.0.1:{metrics}"
    with (
        tempfile.TemporaryDirectory(prefix="busd-notify-") as folder,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd,
    ):
        address = str(Path(folder) / "notify.sock")
        systemd.bind(address)
        systemd.settimeout(10)
        daemon = bus.spawn("serve", "--config", str(cfg), env={"NOTIFY_SOCKET": address})
        server = EmbeddedServer("127.0.0.1", port, tmp_path / "late-nats")
        try:
            wait_for(lambda: f"waiting for NATS at {url}" in bus.log(), 15, "waiting line")
            assert daemon.poll() is None
            status: list[str] = []
            while not any(a.startswith("STATUS=waiting for NATS at") for a in status):
                status += systemd.recv(4096).decode().split("\n")
            assert f"STATUS=waiting for NATS at {url}" in status
            assert any(a.startswith("EXTEND_TIMEOUT_USEC=") for a in status)  # not hung
            assert _get(base + "/healthz") == 200
            assert _get(base + "/readyz") == 503

            server.start()
            wait_for(lambda: _get(base + "/readyz") == 200, 30, "ready once NATS is up")
            event = bus.event("late-1")
            _publish(url, event)
            wait_for(
                lambda: (
                    (bus.data / "exports" / "runs.parquet").exists()
                    and "late-1" in bus.export("runs").column("run_id").to_pylist()
                ),
                30,
                "the event committed and exported",
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
            server.stop()
        assert code == 0, bus.log()


def test_serve_stops_cleanly_while_waiting(bus: Bus, dead_nats: str) -> None:
    cfg = bus.write_config(nats={"url": dead_nats, "connect_timeout_s": CONNECT_TIMEOUT_S})
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: f"waiting for NATS at {dead_nats}" in bus.log(), 15, "waiting line")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    assert code == 0, bus.log()


def _publish(url: str, event: dict[str, object]) -> None:
    async def go() -> None:
        nc = await nats.connect(servers=[url])
        try:
            await nc.jetstream().publish("artifacts.lab.sim", json.dumps(event).encode())
        finally:
            await nc.close()

    asyncio.run(go())


def test_a_silent_server_of_a_cluster_leaves_time_for_the_others(
    bus: Bus, startup_s: float
) -> None:
    """nats-py tries the servers of a URL list in random order: whichever comes first, the
    silent one must not take the whole deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        silent = f"nats://127.0.0.1:{listener.getsockname()[1]}"
        cfg = bus.write_config(nats={"url": f"{silent},{bus.url}", "connect_timeout_s": 2})
        for _ in range(4):
            elapsed, out = timed(bus, "status", "--json", "--config", str(cfg))
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["nats"]["connected"] is True
            assert elapsed < 2 + 2 + startup_s


def test_a_nats_without_jetstream_is_named_not_waited_for(bus: Bus) -> None:
    """A nats-server without JetStream answers, and every JetStream request gets no
    responders: a mistake of the setup, not an outage. busd retries for ten connect timeouts
    (JetStream may be restarting), then exits 1 naming it, instead of 'NATS does not answer'
    forever."""
    port = free_port()
    plain = subprocess.Popen(
        [server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        wait_for(lambda: _listening(port), 30, "the plain nats-server")
        cfg = bus.write_config(nats={"url": url, "connect_timeout_s": 1})
        proc = bus.spawn("serve", "--config", str(cfg))
        assert proc.wait(SETTLES_S + 10) == 1, bus.log()[-3000:]
    finally:
        plain.terminate()
        plain.wait(30)
        bus.reap()
    assert "JetStream does not answer (waiting to declare the stream, 10s)" in bus.log()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def without_jetstream(bus: Bus) -> Iterator[None]:
    """The bus's nats-server replaced, on its port, by one without JetStream."""
    port = bus.server.port
    bus.server.kill()
    plain = subprocess.Popen(
        [server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 30, "the plain nats-server")
        yield
    finally:
        plain.terminate()
        plain.wait(30)


def test_jetstream_gone_while_serving_is_named_not_waited_for(bus: Bus) -> None:
    """NATS comes back without JetStream while busd serves: its pull requests get no
    responders, and so does the consumer's declaration. busd exits 1 after ten connect
    timeouts naming JetStream, as it does at a start. Before: it declared the consumer
    again forever, every try counted as progress by the stall check (a reviewer helper's
    finding, 2 of 2 runs)."""
    bus.publish([bus.event("r-1")])
    cfg = bus.write_config(nats={"connect_timeout_s": 1}, consumer={"stall_s": 10})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        bus.while_alive(proc, lambda: '"committed": 1' in bus.log(), 60, "the first commit")
        with without_jetstream(bus):
            assert proc.wait(SETTLES_S + 30) == 1, bus.log()[-3000:]
    finally:
        bus.reap()
    assert "JetStream does not answer (waiting to declare the consumer again" in bus.log()


def test_jetstream_gone_under_a_standby_is_named_not_an_unexpected_error(bus: Bus) -> None:
    """The same under a hot standby: its tries of the lease (a JetStream publish nobody
    answers) and of its reader are waited for, each said at most every 30 s, then it exits
    1 naming JetStream. Before: 'unexpected error: NoStreamResponseError' within 10 s, and
    the reader's warning once a second (a reviewer helper's findings, 2 of 2 runs)."""
    active = bus.ha_active(lease_ttl_s=6)
    cfg_b = bus.second_config(nats={"connect_timeout_s": 1})
    standby = bus.spawn("serve", "--config", str(cfg_b), log="b.log")
    try:
        wait_for(
            lambda: "standby: following" in bus.log("b.log") or standby.poll() is not None,
            60,
            "the standby to follow",
        )
        with without_jetstream(bus):
            rc = standby.wait(SETTLES_S + 30)
            assert rc == 1, bus.log("b.log")[-3000:]
    finally:
        for proc in (active, standby):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        bus.reap()
    log = bus.log("b.log")
    assert "JetStream does not answer" in log, log[-3000:]
    assert "unexpected error" not in log
    assert log.count("NATS does not answer") <= 6, log[-3000:]


def test_a_backfill_whose_reader_cannot_be_created_names_jetstream(tmp_path: Path) -> None:
    """A new active's backfill lost its reader (a NATS restart) and NATS now has no
    JetStream: each try of the reader is an unanswered request, not an answer, so the
    patience runs out and busd exits naming JetStream. Before: the backfill took the
    failed try for an answer, said so at every try and waited forever (a reviewer helper's
    finding, 2 of 2 runs)."""
    from busd.catalog import Catalog
    from busd.checker import Checker
    from busd.errors import BusdError
    from busd.ha.backfill import Backfill
    from busd.ha.follower import Follower
    from busd.replay import ReplayStore

    port = free_port()
    plain = subprocess.Popen(
        [server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"nats://127.0.0.1:{port}"
    s = config.load(
        env={},
        overrides={
            "data_dir": str(tmp_path / "data"),
            "artifact_roots": [str(tmp_path)],
            "nats": {"url": url, "connect_timeout_s": 1},
        },
    )
    catalog = Catalog(tmp_path / "catalog.duckdb")

    async def go() -> str:
        nc = await source.connect(s.nats, url)
        try:
            checker = Checker(s.roots, "never", processes=0, threads=1)
            store = ReplayStore(catalog, nc, "ARTIFACTS")
            follower = Follower(s, nc, store, _no_commit, checker)
            follower.pull = source.PullSource(nc, "ARTIFACTS", follower.name)
            follower.reader_lost = True  # as after a ConsumerGone at a NATS restart
            backfill = Backfill(follower, 1, 100, lambda touched: None)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                if backfill.due():
                    try:
                        await backfill.step()
                    except BusdError as exc:
                        return str(exc)
                await asyncio.sleep(0.05)
            return "still waiting"
        finally:
            await nc.close()

    try:
        wait_for(lambda: _listening(port), 30, "the plain nats-server")
        said = asyncio.run(go())
    finally:
        catalog.close()
        plain.terminate()
        plain.wait(30)
    assert said.startswith("JetStream does not answer (waiting to create the standby's reader")


async def _no_commit(rows: Any) -> None:
    raise AssertionError("nothing to commit here")
