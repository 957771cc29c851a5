"""The measurements of ``busd bench``; each returns one section of the report (a dict).

Every figure is events (or seconds) measured on the same stream content: a raw pull consumer
doing no work, a naive peer doing one DuckDB transaction per message, and busd itself (in a
child process, so its peak RSS is its own). Each section function takes the :class:`Ctx`;
adding one (``busd rebuild``, say) is one function and one line in ``bench.SECTIONS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from busd import source
from busd.bench.env import BenchEnv, PoolFile, StreamSpec
from busd.config import Settings
from busd.errors import BusdError, TimedOut

Tick = Callable[[str, float, float | None], None]
"""Progress: (description, advance, new total or None)."""


@dataclass
class Ctx:
    env: BenchEnv
    events: int
    runs: int
    quick: bool
    pool: list[PoolFile] = field(default_factory=list)
    stream: StreamSpec | None = None  # the catch-up stream, holding ``events`` events
    soak: int = 0  # events of the RSS soak (0: not run)
    samples_path: Path | None = None  # the soak's samples, a JSON line each as taken
    artifacts: int = 0  # artifacts of the partitioned-exports soak (0: not run)
    catchup_catalog: Path | None = None  # the catalog a catch-up run wrote (replays reuse it)
    only: list[str] | None = None  # the sections to run (None: all)
    tick: Tick = lambda description, advance, total: None


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(rates: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "status": "ok",
        "events_per_s": round(median(rates), 1),
        "runs_events_per_s": [round(r, 1) for r in rates],
        **extra,
    }


# ---- a lean pull consumer (raw limit and naive peer) --------------------------------------
class LeanPull:
    """One pull request per batch on an inbox subscription; status replies parsed here."""

    def __init__(self, nc: Any, stream: str, durable: str) -> None:
        self.nc = nc
        self.next_subject = f"{source.js_api_prefix(nc)}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.buf: list[Any] = []
        self.want = 0
        self.token = 0
        self.wake = asyncio.Event()
        self.sub: Any = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(
            f"{self.inbox}.*",
            cb=self._on_msg,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )

    async def stop(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()

    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            if headers["Status"] != "100" and msg.subject.endswith(f".{self.token}"):
                self.wake.set()  # 404/408/409: this request is over
            return
        self.buf.append(msg)
        if len(self.buf) >= self.want:
            self.wake.set()

    async def request(self, n: int, expires_s: float = 5.0) -> None:
        self.token += 1
        self.want = n
        self.wake.clear()
        body = json.dumps({"batch": n, "expires": int(expires_s * 1e9)}).encode()
        await self.nc.publish(self.next_subject, body, reply=f"{self.inbox}.{self.token}")

    async def take(self, timeout_s: float) -> list[Any]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout_s)
        msgs, self.buf = self.buf, []
        return msgs


Work = Callable[[Any], None]


async def pull_all(
    nc: Any,
    stream: str,
    durable: str,
    total: int,
    work: Work | None,
    tick: Callable[[int], None],
    *,
    batch: int = 500,
    timeout_s: float = 120.0,
) -> float:
    """Fetch ``total`` messages, ``work`` each, ack each, one flush a batch; events/s.

    The next pull request goes out as soon as a batch is in hand (as busd does)."""
    pull = LeanPull(nc, stream, durable)
    await pull.start()
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        got = 0
        await pull.request(min(batch, total))
        while got < total:
            msgs = await pull.take(5.0)
            if not msgs:
                if time.monotonic() > deadline:
                    raise TimedOut(f"{durable}: {got} of {total} messages in {timeout_s:.0f}s")
                await pull.request(min(batch, total - got))
                continue
            got += len(msgs)
            if got < total:
                await pull.request(min(batch, total - got))
            for m in msgs:
                if work is not None:
                    work(m)
                await nc.publish(m.reply, b"+ACK")
            await nc.flush(timeout=10)
            tick(len(msgs))
        return total / (time.perf_counter() - started)
    finally:
        await pull.stop()


async def _consumer(ctx: Ctx, durable: str) -> None:
    assert ctx.stream is not None
    _, s = ctx.env.config(f"consumer-{durable}", ctx.stream, durable)
    await source.ensure_consumer(ctx.env.nc, s)  # busd's consumer settings, another name


# ---- raw limit ----------------------------------------------------------------------------
async def measure_raw(ctx: Ctx) -> dict[str, Any]:
    """Fetch and ack with no work: the ceiling of one nats-py pull consumer here."""
    assert ctx.stream is not None
    rates = []
    for k in range(ctx.runs):
        durable = f"bench-raw-{k}"
        await _consumer(ctx, durable)
        ctx.tick(f"raw limit, run {k + 1}/{ctx.runs}", 0, ctx.events)
        rates.append(
            await pull_all(
                ctx.env.nc,
                ctx.stream.name,
                durable,
                ctx.events,
                None,
                lambda n: ctx.tick("", n, None),
                timeout_s=60 + ctx.events / 1000,
            )
        )
    return summary(rates, events=ctx.events, batch=500)


# ---- stock fetch ----------------------------------------------------------------------------
STOCK_BATCH = 500


async def stock_all(ctx: Ctx, durable: str, timeout_s: float) -> float:
    """nats-py's own pull consumer: ``fetch(batch)`` and ``ack()`` each message, no other
    work, one flush a batch; events/s."""
    assert ctx.stream is not None
    js = source.jetstream(ctx.env.nc)
    psub = await js.pull_subscribe_bind(durable=durable, stream=ctx.stream.name)
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        got = 0
        while got < ctx.events:
            try:
                msgs = await psub.fetch(min(STOCK_BATCH, ctx.events - got), timeout=5.0)
            except TimeoutError:  # nats-py's, a subclass: nothing came within the timeout
                msgs = []
            if not msgs and time.monotonic() > deadline:
                raise TimedOut(f"{durable}: {got} of {ctx.events} messages in {timeout_s:.0f}s")
            for m in msgs:
                await m.ack()
            await ctx.env.nc.flush(timeout=10)
            got += len(msgs)
            ctx.tick("", len(msgs), None)
        return ctx.events / (time.perf_counter() - started)
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


async def measure_stock(ctx: Ctx) -> dict[str, Any]:
    """A no-work consumer on nats-py's stock ``fetch``: what a replay is held against."""
    rates = []
    for k in range(ctx.runs):
        durable = f"bench-stock-{k}"
        await _consumer(ctx, durable)
        ctx.tick(f"stock fetch, run {k + 1}/{ctx.runs}", 0, ctx.events)
        rates.append(await stock_all(ctx, durable, 60 + ctx.events / 500))
    return summary(rates, events=ctx.events, batch=STOCK_BATCH)


# ---- naive peer ---------------------------------------------------------------------------
def naive_sample(ctx: Ctx) -> int:
    return min(ctx.events, 500 if ctx.quick else 2000)


async def measure_naive(ctx: Ctx) -> dict[str, Any]:
    """Per message: json.loads, os.stat each file, INSERT one row, COMMIT, ack."""
    assert ctx.stream is not None
    sample = naive_sample(ctx)
    rates = []
    for k in range(ctx.runs):
        durable = f"bench-naive-{k}"
        await _consumer(ctx, durable)
        path = ctx.env.root / f"naive-{k}.duckdb"
        con = duckdb.connect(str(path))
        con.execute(
            "CREATE TABLE artifacts (run_id VARCHAR, name VARCHAR, path VARCHAR, "
            "bytes BIGINT, seq UBIGINT, PRIMARY KEY (run_id, name))"
        )

        def work(msg: Any, con: duckdb.DuckDBPyConnection = con) -> None:
            body = json.loads(msg.data)
            seq = source.parse_ack_subject(msg.reply)[1]
            for a in body["artifacts"]:
                size = os.stat(a["path"]).st_size
                con.execute("BEGIN")
                con.execute(
                    "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
                    [body["run"]["run_id"], a["name"], a["path"], size, seq],
                )
                con.execute("COMMIT")

        ctx.tick(f"naive peer, run {k + 1}/{ctx.runs}", 0, sample)
        try:
            rates.append(
                await pull_all(
                    ctx.env.nc,
                    ctx.stream.name,
                    durable,
                    sample,
                    work,
                    lambda n: ctx.tick("", n, None),
                    timeout_s=60 + sample / 20,
                )
            )
        finally:
            con.close()
            path.unlink(missing_ok=True)
    return summary(rates, events=sample)


# ---- busd catch-up ------------------------------------------------------------------------
def catchup_child() -> None:  # pragma: no cover - runs in the child process
    """``python -c 'from busd.bench.measure import catchup_child; catchup_child()' CONFIG OUT``:
    time ``serve(settings, drain=True)`` from start to drained, in a process of its own."""
    from busd import config, log
    from busd.daemon import serve

    config_path, out_path = sys.argv[1], sys.argv[2]
    s = config.load(config_path, env={})
    log.configure(s.log_format)
    started = time.perf_counter()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    stats = asyncio.run(serve(s, drain=True))
    elapsed = time.perf_counter() - started
    ru = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the file-check workers, now reaped
    Path(out_path).write_text(
        json.dumps(
            {
                "seconds": elapsed,
                "peak_rss_kb": ru.ru_maxrss,
                "workers_peak_rss_kb": kids.ru_maxrss,
                "cpu_s": ru.ru_utime + ru.ru_stime - cpu.ru_utime - cpu.ru_stime,
                "workers_cpu_s": kids.ru_utime + kids.ru_stime,
                "outcomes": dict(stats.outcomes),
                "batches": stats.batches,
                "exports": stats.exports,
            }
        )
    )


CHILD_CODE = "from busd.bench.measure import catchup_child; catchup_child()"


async def settled(nc: Any, s: Settings, n: int) -> int:
    """How many of the ``n`` events on the stream the consumer has settled (none before it
    is declared)."""
    try:
        pending, ack_pending = await source.consumer_state(nc, s)
    except Exception:  # noqa: BLE001 - not declared yet: nothing settled
        return 0
    return max(0, n - pending - ack_pending)


async def wait_exit(env: BenchEnv, proc: Any, timeout_s: float, what: str) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            env.end(proc, 5.0)
            raise TimedOut(f"{what} did not finish within {timeout_s:.0f}s")
        await asyncio.sleep(0.05)
    return int(proc.returncode)


async def measure_catchup(ctx: Ctx) -> dict[str, Any]:
    """``serve(drain=True)`` over the pre-loaded stream, full validation, one process a run."""
    assert ctx.stream is not None
    env = ctx.env
    runs: list[dict[str, Any]] = []
    for k in range(ctx.runs):
        name = f"catchup-{k}"
        config_path, s = env.config(name, ctx.stream, f"busd-catchup-{k}")
        out = env.root / f"{name}.json"
        ctx.tick(f"busd catch-up, run {k + 1}/{ctx.runs}", 0, 1)
        began = time.perf_counter()
        proc = env.spawn(
            [sys.executable, "-c", CHILD_CODE, str(config_path), str(out)], f"{name}.log"
        )
        code = await wait_exit(env, proc, 60 + ctx.events / 200, "busd catch-up")
        wall = time.perf_counter() - began
        if code != 0 or not out.exists():
            raise BusdError(f"busd catch-up exited {code}: {env.log_tail(f'{name}.log')}")
        result = json.loads(out.read_text())
        committed = result["outcomes"].get("committed", 0)
        if committed != ctx.events:
            raise BusdError(
                f"busd committed {committed} of {ctx.events} events: {result['outcomes']}"
            )
        result["process_wall_s"] = wall
        runs.append(result)
        ctx.tick("", 1, None)
        if k == ctx.runs - 1:  # the replay sections reuse the checks it recorded
            ctx.catchup_catalog = env.root / "catchup-catalog.duckdb"
            shutil.move(s.catalog_path, ctx.catchup_catalog)
        shutil.rmtree(s.data_path, ignore_errors=True)  # catalogs of finished runs
    rates = [ctx.events / r["seconds"] for r in runs]
    return summary(
        rates,
        events=ctx.events,
        checksum="if_given (sha256 given in every event)",
        seconds=round(median([r["seconds"] for r in runs]), 3),
        process_wall_s=round(median([r["process_wall_s"] for r in runs]), 3),
        cpu_us_per_event=round(median([r["cpu_s"] for r in runs]) / ctx.events * 1e6, 1),
        workers_cpu_us_per_event=round(
            median([r["workers_cpu_s"] for r in runs]) / ctx.events * 1e6, 1
        ),
        peak_rss_mb=round(max(r["peak_rss_kb"] for r in runs) / 1024, 1),
        workers_peak_rss_mb=round(max(r["workers_peak_rss_kb"] for r in runs) / 1024, 1),
        batches=int(median([r["batches"] for r in runs])),
        export_refreshes=int(median([r["exports"] for r in runs])),
    )
