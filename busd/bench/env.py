"""The world ``busd bench`` runs in: a temporary folder, a nats-server, artifacts, children.

Everything lives under one temporary folder removed on exit; the embedded ``nats-server``
listens on a free loopback port (``sync_interval: always``, as ``busd serve`` runs it). Every
child process is started in its own session, dies with the bench (``PR_SET_PDEATHSIG``), and
is ended by its pid in :meth:`BenchEnv.close`, which also runs on Ctrl-C. Streams get unique
names, so ``--nats-url`` never touches a user's own streams; they are deleted at the end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from busd import __version__, source
from busd.config import NatsSettings, Settings
from busd.config import load as load_config
from busd.embedded import EmbeddedServer
from busd.errors import BusdError, TimedOut

ROWS_PER_FILE = 3


# ---- machine and versions -----------------------------------------------------------------
def _proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return ""


def machine() -> dict[str, Any]:
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "ram_gb": round(int(mem_kb[0]) / 1024 / 1024, 1) if mem_kb else None,
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _dist(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def versions(server_version: str) -> dict[str, str]:
    import duckdb

    return {
        "busd": __version__,
        "nats-py": _dist("nats-py"),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "nats-server": server_version,
        "msgspec": _dist("msgspec"),
    }


def today() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---- artifacts and events -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolFile:
    path: str
    bytes: int
    rows: int
    sha256: str


def write_parquet(path: Path, i: int) -> PoolFile:
    """One small real Parquet file (3 rows, 2 columns), distinct content per ``i``."""
    table = pa.table(
        {
            "x": pa.array([i, i + 1, i + 2], pa.int64()),
            "y": pa.array([f"r{i}-{k}" for k in range(ROWS_PER_FILE)]),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none")
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    return PoolFile(str(path), len(data), ROWS_PER_FILE, hashlib.sha256(data).hexdigest())


def make_pool(
    root: Path, n: int, tick: Callable[[int], None], stop: threading.Event
) -> list[PoolFile]:
    """``n`` files under ``root``, 1,000 per folder, folders written by 4 threads (creating a
    file here costs 40-800 µs of mostly waiting); ``tick`` reports progress, ``stop`` ends
    it early (Ctrl-C)."""

    def folder(start: int) -> list[PoolFile]:
        where = root / f"{start // 1000:04d}"
        where.mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(start, min(start + 1000, n)):
            if stop.is_set():
                raise RuntimeError("stopped")
            files.append(write_parquet(where / f"run-{i:07d}.parquet", i))
        tick(len(files))
        return files

    with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="bench-files") as pool:
        return [f for chunk in pool.map(folder, range(0, n, 1000)) for f in chunk]


_encoder = msgspec.json.Encoder()


def event(run_id: str, f: PoolFile) -> tuple[str, bytes]:
    """(event_id, payload) of a one-artifact event with size, rows and sha256 given."""
    event_id = f"{run_id}:final"
    return event_id, _encoder.encode(
        {
            "schema_version": 1,
            "event_id": event_id,
            "run": {
                "run_id": run_id,
                "kind": "bench",
                "status": "succeeded",
                "params": {"strategy": "bench", "seed": 7},
                "code_version": "bench",
            },
            "artifacts": [
                {
                    "name": "fills",
                    "path": f.path,
                    "rows": f.rows,
                    "bytes": f.bytes,
                    "sha256": f.sha256,
                }
            ],
        }
    )


# ---- publishing ---------------------------------------------------------------------------
@dataclass
class Published:
    count: int = 0
    errors: int = 0
    started: float = 0.0
    stored: float = 0.0  # monotonic time the last PubAck arrived

    @property
    def seconds(self) -> float:
        return max(self.stored - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.count / self.seconds


async def publish(
    nc: Any,
    subject: str,
    events: Iterator[tuple[str, bytes]],
    *,
    rate: float | None = None,
    duration_s: float | None = None,
    window: int = 2000,
    timeout_s: float = 120.0,
    tick: Callable[[int], None] | None = None,
) -> Published:
    """Pipelined JetStream publishes with ``Nats-Msg-Id`` (up to ``window`` PubAcks pending).

    ``rate`` paces them (events/s); ``duration_s`` stops early. Returns when every PubAck
    arrived, so ``stored`` is when the last event was durable in the stream.
    """
    js = nc.jetstream(publish_async_max_pending=window)
    out = Published(started=time.monotonic())
    deadline = out.started + timeout_s
    done = 0

    def settled(fut: asyncio.Future[Any]) -> None:
        nonlocal done
        done += 1
        if fut.cancelled() or fut.exception() is not None:
            out.errors += 1

    for event_id, payload in events:
        now = time.monotonic()
        if duration_s is not None and now - out.started >= duration_s:
            break
        if now > deadline:
            raise TimedOut(f"publishing took over {timeout_s:.0f}s")
        if rate is not None:
            ahead = out.started + out.count / rate - now
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        fut = await js.publish_async(subject, payload, headers={"Nats-Msg-Id": event_id})
        fut.add_done_callback(settled)
        out.count += 1
        if tick is not None and out.count % 500 == 0:
            tick(500)
    while done < out.count:
        if time.monotonic() > deadline:
            raise TimedOut(f"{out.count - done} PubAcks missing after {timeout_s:.0f}s")
        await asyncio.sleep(0.002)
    out.stored = time.monotonic()
    if tick is not None:
        tick(out.count % 500)
    if out.errors:
        raise BusdError(f"{out.errors} of {out.count} publishes failed")
    return out


# ---- config files and children ------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            top.append(f"\n[{name}]")
            top.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(top) + "\n"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_env() -> dict[str, str]:
    """Our environment without ``BUSD_*`` (a user's overrides must not leak into the runs)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}


def memory_mb(pid: int, field: str = "VmHWM") -> float | None:
    """A memory field of a running process's status (VmHWM: peak RSS; VmRSS: now), in MiB."""
    text = _proc_field(f"/proc/{pid}/status", field).split()
    return round(int(text[0]) / 1024, 1) if text else None


def pss_mb(pid: int) -> float | None:
    """A running process's proportional set size in MiB: its resident pages, each page it
    shares with other processes (the libraries busd and its workers all map) divided among
    them, so that the PSS of a group adds up to the memory it occupies."""
    text = _proc_field(f"/proc/{pid}/smaps_rollup", "Pss").split()
    return round(int(text[0]) / 1024, 1) if text else None


def peak_rss_mb(pid: int) -> float | None:
    return memory_mb(pid)


def children(pid: int) -> list[int]:
    """A running process's children (busd's file-check workers)."""
    with contextlib.suppress(OSError):
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def children_peak_rss_mb(pid: int) -> float | None:
    """The largest VmHWM among a running process's children."""
    peaks = [p for p in map(memory_mb, children(pid)) if p is not None]
    return max(peaks) if peaks else None


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subject: str  # where events are published

    @property
    def subjects(self) -> list[str]:
        return [self.subject.rsplit(".", 1)[0] + ".>"]


@dataclass
class BenchEnv:
    """Temporary folder, nats-server, connection and children of one bench run."""

    nats_url: str | None = None
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="busd-bench-")))
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    server: EmbeddedServer | None = None
    url: str = ""
    nc: Any = None
    server_version: str = "?"
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def stream(self, kind: str) -> StreamSpec:
        return StreamSpec(
            f"BENCH_{self.tag}_{kind.upper()}", f"bench-{self.tag}-{kind.lower()}.bench"
        )

    async def start(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        if self.nats_url:
            self.url = self.nats_url
        else:
            self.server = EmbeddedServer("127.0.0.1", 0, self.root / "nats")
            self.url = await asyncio.to_thread(self.server.start)
        self.nc = await source.connect(NatsSettings(), self.url, name="busd-bench", reconnect=False)
        v = self.nc.connected_server_version
        self.server_version = f"{v.major}.{v.minor}.{v.patch}" + (f"-{v.dev}" if v.dev else "")

    def config(
        self,
        name: str,
        stream: StreamSpec,
        consumer: str,
        *,
        metrics: str = "",
        data_dir: Path | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[Path, Settings]:
        """Write ``<name>.toml`` for a busd on ``stream``; return it and its settings.
        ``extra``: further top-level settings."""
        data = {
            "data_dir": str(data_dir or self.root / name),
            "artifact_roots": [str(self.artifacts)],
            "log_format": "json",
            "nats": {
                "url": self.url,
                "stream": stream.name,
                "subjects": stream.subjects,
                "consumer": consumer,
            },
            "consumer": {"shutdown_grace_s": 10.0},
            "metrics": {"listen": metrics},
            **(extra or {}),
        }
        path = self.root / f"{name}.toml"
        path.write_text(to_toml(data))
        return path, load_config(str(path), env={})

    async def ensure_stream(self, stream: StreamSpec) -> Settings:
        _, s = self.config(f"stream-{stream.name}", stream, "busd")
        await source.ensure_stream(self.nc, s)
        if stream.name not in self.streams:
            self.streams.append(stream.name)
        return s

    def spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """A child in its own session (Ctrl-C is ours to handle); output to a log file."""
        with open(self.root / log_name, "ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=self.root,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.children.append(proc)
        return proc

    def log_tail(self, log_name: str, lines: int = 3) -> str:
        with contextlib.suppress(OSError):
            text = (self.root / log_name).read_text(errors="replace").strip().splitlines()
            return " | ".join(text[-lines:])
        return ""

    def end(self, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.children:
            self.children.remove(proc)
        return int(proc.returncode)

    async def aclose(self) -> None:
        """Async part of the cleanup: our streams on a user's server, the connection."""
        if self.nc is None:
            return
        if not self.embedded:
            js = self.nc.jetstream()
            for name in self.streams:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(js.delete_stream(name), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.close(), 5)
        self.nc = None

    def close(self) -> None:
        """Sync part, safe to call twice and after Ctrl-C: children, server, folder."""
        for proc in list(self.children):
            self.end(proc, 5.0)
        if self.server is not None:
            self.server.stop()
            self.server = None
        shutil.rmtree(self.root, ignore_errors=True)
