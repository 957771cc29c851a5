"""Test support: a real nats-server per test, real DuckDB files, real Parquet; no mocks.

Each test gets a free loopback port and its own store. The helpers live here; the fixtures
that use them (``nats_server``, ``bus``, ...) and the pytest hooks are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import nats
import pyarrow as pa
import pyarrow.parquet as pq

from busd import config, source
from busd.daemon import Stats, serve
from busd.embedded import EmbeddedServer
from busd.model import Batch

BUSD = [sys.executable, "-m", "busd"]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    for name, items in arrays:
        for item in items:
            lines.append(f"\n[[{name}]]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both else v
    return out


@dataclass
class Bus:
    """One test's world: a nats-server, a data dir, an artifact root, helpers."""

    root: Path
    server: EmbeddedServer
    overrides: dict[str, Any] = field(default_factory=dict)

    cluster_url: str | None = None  # "nats://a,nats://b,..." when testing a cluster
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.cluster_url or self.server.url

    @property
    def servers(self) -> list[str]:
        return self.url.split(",")

    @property
    def data(self) -> Path:
        return Path(self.overrides.get("data_dir", self.root / "data"))

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def config_dict(self, **over: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "data_dir": str(self.data),
            "artifact_roots": [str(self.artifacts)],
            "log_format": "json",
            "nats": {"url": self.url},
            "consumer": {
                "batch_wait_ms": 50,
                "ack_wait_s": 2,
                "stall_s": 120,
                "shutdown_grace_s": 10,
            },
            "verify": {"file_wait_s": 0, "checksum": "if_given"},
            "metrics": {"listen": ""},
        }
        return deep_merge(deep_merge(base, self.overrides), over)

    def settings(self, **over: Any) -> config.Settings:
        return config.load(env={}, overrides=self.config_dict(**over))

    def write_config(self, **over: Any) -> Path:
        path = self.root / "busd.toml"
        path.write_text(to_toml(self.config_dict(**over)))
        return path

    def ha_active(self, lease_ttl_s: float = 30) -> subprocess.Popen[str]:
        """HA on (for every config written after), and an active on data dir ``a``, ready;
        its log is ``a.log``."""
        self.overrides["ha"] = {"enabled": True, "lease_ttl_s": lease_ttl_s}
        cfg = self.root / "a.toml"
        cfg.write_text(to_toml(self.config_dict(data_dir=str(self.root / "a"))))
        active = self.spawn("serve", "--config", str(cfg), log="a.log")
        wait_for(lambda: "busd ready" in self.log("a.log") or active.poll(), 60, "the active")
        assert active.poll() is None, self.log("a.log")[-3000:]
        return active

    def second_config(self, data_dir: Path | None = None, **over: Any) -> Path:
        """``b.toml``: a second instance's config, on data dir ``b`` unless given."""
        cfg = self.root / "b.toml"
        cfg.write_text(to_toml(self.config_dict(data_dir=str(data_dir or self.root / "b"), **over)))
        return cfg

    def parquet(self, rel: str, rows: int = 3, **columns: list[Any]) -> Path:
        path = self.artifacts / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table(columns or {"x": list(range(rows)), "y": [f"v{i}" for i in range(rows)]})
        pq.write_table(table, path)
        return path

    def event(
        self, run_id: str = "run-1", artifacts: list[dict[str, Any]] | None = None, **top: Any
    ) -> dict[str, Any]:
        if artifacts is None:
            artifacts = [{"name": "fills", "path": str(self.parquet(f"{run_id}/fills.parquet"))}]
        body: dict[str, Any] = {
            "schema_version": 1,
            "run": {"run_id": run_id, "kind": "simulation", "status": "succeeded"},
            "artifacts": artifacts,
        }
        body.update(top)
        return body

    def publish(
        self,
        payloads: list[bytes | dict[str, Any]],
        subject: str = "artifacts.lab.sim",
        *,
        js: bool = True,
        headers: list[dict[str, str] | None] | None = None,
    ) -> list[int]:
        """Publish payloads; ``js=False`` is a plain core publish, like ``nats pub``."""

        async def go() -> list[int]:
            nc = await nats.connect(servers=self.servers)
            seqs: list[int] = []
            try:
                for i, p in enumerate(payloads):
                    data = p if isinstance(p, bytes) else json.dumps(p).encode()
                    hdr = headers[i] if headers else None
                    if js:
                        ack = await nc.jetstream().publish(subject, data, headers=hdr)
                        seqs.append(ack.seq)
                    else:
                        await nc.publish(subject, data, headers=hdr)
                await nc.flush()
            finally:
                await nc.close()
            return seqs

        return asyncio.run(go())

    def init(self, **over: Any) -> None:
        """Declare the stream and the durable consumer, as `busd init` does."""

        async def go() -> None:
            s = self.settings(**over)
            nc = await source.connect(s.nats, self.url, reconnect=False)
            try:
                await source.ensure_stream(nc, s)
                await source.ensure_consumer(nc, s)
            finally:
                await nc.close()

        asyncio.run(go())

    def drain(self, **over: Any) -> Stats:
        """Run the real daemon in-process until the stream is fully consumed."""
        return asyncio.run(asyncio.wait_for(serve(self.settings(**over), drain=True), 120))

    def sql(self, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH '{self.data / 'catalog.duckdb'}' AS busd (READ_ONLY)")
            con.execute("USE busd")
            return con.execute(query, params or []).fetchall()
        finally:
            con.close()

    def export(self, name: str) -> pa.Table:
        return pq.read_table(self.data / "exports" / f"{name}.parquet")

    def cli(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [*BUSD, *args],
            cwd=self.root,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=None if input is None else input.decode(),
        )

    def spawn(
        self, *args: str, env: dict[str, str] | None = None, log: str = "serve.log"
    ) -> subprocess.Popen[str]:
        """Start busd as a real process; its output goes to ``root/log`` (never a pipe that
        could fill up and block it)."""
        full_env = {**os.environ, **(env or {})}
        with open(self.root / log, "a") as out:
            proc = subprocess.Popen(
                [*BUSD, *args],
                cwd=self.root,
                env=full_env,
                text=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        """Kill what a failed or timed-out test left running: no busd outlives its test."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

    def log(self, name: str = "serve.log") -> str:
        path = self.root / name
        return path.read_text() if path.exists() else ""

    def while_alive(
        self,
        proc: subprocess.Popen[str],
        predicate: Callable[[], Any],
        timeout: float,
        what: str,
        log: str = "serve.log",
    ) -> None:
        """Wait for ``predicate`` while ``proc`` runs; fail with its log's tail if it exits."""
        wait_for(lambda: proc.poll() is not None or predicate(), timeout, what)
        assert proc.poll() is None, self.log(log)[-3000:]


# a configured export whose refresh takes seconds (acks wait for it): a window for faults
SLOW_EXPORT_SQL = "SELECT i, md5(i::VARCHAR) AS h FROM range(600000000) t(i) WHERE i % 1000 = 0"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


T = TypeVar("T")


def on_jetstream(servers: str | list[str], action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(js)`` on a connection of its own, as an operator's tool would."""

    async def go() -> T:
        nc = await nats.connect(servers=servers)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


def ack_floor(bus: Bus) -> int:
    """The stream sequence through which busd's durable consumer has acked everything."""
    info = on_jetstream(bus.servers, lambda js: js.consumer_info("ARTIFACTS", "busd"))
    return int(info.ack_floor.stream_seq or 0)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def committed_batch(seq: int, run_id: str) -> Batch:
    """The rows one committed event of ``run_id`` at ``seq`` gives (one artifact, fills)."""
    now = dt.datetime.now(dt.UTC)
    event_id = f"{run_id}:{seq}"
    batch = Batch()
    batch.events.append(
        (
            seq,
            event_id,
            "0" * 64,
            "artifacts.lab",
            "lab",
            run_id,
            "committed",
            None,
            1,
            now,
            now,
            None,
        )
    )
    batch.artifacts.append(
        (
            run_id,
            "fills",
            seq,
            f"/a/{seq}.parquet",
            "parquet",
            3,
            100,
            None,
            "[]",
            "0" * 16,
            None,
            event_id,
            now,
            now,
            None,
            None,
            None,
            None,
            False,
        )
    )
    batch.runs.append(
        (seq, run_id, "sim", "lab", "succeeded", None, None, None, None, None, now, event_id, None)
    )
    return batch


class FakeSystemd:
    """Binds the notification socket and reads what the service sends."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def receive(self) -> list[str]:
        data = self.sock.recv(4096)
        return data.decode("utf-8").split("\n")

    def nothing_waiting(self) -> bool:
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(timeout)
        return False


@contextlib.contextmanager
def notify_socket(timeout_s: float) -> Iterator[FakeSystemd]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, reads bounded by
    ``timeout_s``."""
    # A short directory: socket paths are limited to ~108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="busd-notify-") as folder:
        path = str(Path(folder) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(timeout_s)
            yield FakeSystemd(sock, path)
