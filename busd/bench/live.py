"""``busd bench``: busd live (a real ``busd serve`` child while a publisher runs), export
refresh time on large catalogs.

Live latency (publish → ack) comes from busd's own ``busd_event_latency_seconds`` histogram,
scraped before and after each phase: quantiles are interpolated inside buckets the way
Prometheus' ``histogram_quantile`` does, so they are only as fine as the buckets, and the
maximum is the upper bound of the highest bucket that filled. The lag is read from the
consumer's info (what ``busd_consumer_pending_messages`` and the ack-pending gauge report,
without their one-second refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from busd import source
from busd.bench.env import StreamSpec, children_peak_rss_mb, event, peak_rss_mb, publish
from busd.bench.measure import Ctx, LeanPull, median
from busd.catalog import Catalog
from busd.config import Settings
from busd.errors import BusdError, TimedOut
from busd.exports import Exporter
from busd.model import Changed

LATENCY = "busd_event_latency_seconds"
FIXED_RATE = 1000.0


# ---- histogram arithmetic -----------------------------------------------------------------
@dataclass(frozen=True)
class Hist:
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending, ends at +Inf
    count: float
    total: float

    def minus(self, other: Hist) -> Hist:
        before = dict(other.buckets)
        return Hist(
            tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
            self.count - other.count,
            self.total - other.total,
        )

    def quantile(self, q: float) -> float | None:
        """Prometheus-style: linear inside the bucket holding the q-th observation."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank:
                if math.isinf(le):
                    return lower  # beyond the last finite bucket: its bound is all we know
                inside = cum - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cum
        return lower

    def max_bound(self) -> float | None:
        """Upper bound of the highest bucket with an observation (the max is at most this)."""
        for le, cum in self.buckets:
            if cum >= self.count > 0:
                return le
        return None


def scrape(port: int) -> Hist:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != LATENCY:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] = float(sample.value)
            elif sample.name.endswith("_count"):
                count = float(sample.value)
            elif sample.name.endswith("_sum"):
                total = float(sample.value)
    return Hist(tuple(sorted(buckets.items())), count, total)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return int(r.status) == 200
    except (OSError, urllib.error.URLError):
        return False


# ---- busd live ----------------------------------------------------------------------------
def _events(ctx: Ctx, prefix: str) -> Iterator[tuple[str, bytes]]:
    """Fresh runs naming the pool's files in turn (validation reads a real file each time)."""
    for i in itertools.count():
        yield event(f"{prefix}-{i:08d}", ctx.pool[i % len(ctx.pool)])


async def _lag(ctx: Ctx, s: Settings) -> int:
    pending, ack_pending = await source.consumer_state(ctx.env.nc, s)
    return pending + ack_pending


async def _phase(
    ctx: Ctx,
    s: Settings,
    stream: StreamSpec,
    port: int,
    label: str,
    rate: float | None,
    duration_s: float,
) -> dict[str, Any]:
    before = await asyncio.to_thread(scrape, port)
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            await asyncio.sleep(0.25)
            with contextlib.suppress(Exception):
                peak = max(peak, await _lag(ctx, s))

    ctx.tick(f"busd live: {label}", 0, duration_s * rate if rate else None)
    sampler = asyncio.create_task(sample())
    try:
        pub = await publish(
            ctx.env.nc,
            stream.subject,
            _events(ctx, f"live-{ctx.env.tag}-{label.split()[0]}"),
            rate=rate,
            duration_s=duration_s,
            window=4000,
            timeout_s=duration_s + 60,
            tick=lambda n: ctx.tick("", n, None),
        )
        lag_at_stop = await _lag(ctx, s)
        drain_limit_s = 60.0 if ctx.quick else 180.0
        ctx.tick(f"busd live: {label}, waiting for lag 0", 0, None)
        while (lag := await _lag(ctx, s)) > 0:
            peak = max(peak, lag)
            if time.monotonic() - pub.stored > drain_limit_s:
                raise TimedOut(f"{label}: lag still {lag} {drain_limit_s:.0f}s after publishing")
            await asyncio.sleep(0.02)
        lag_zero_s = time.monotonic() - pub.stored
    finally:
        sampler.cancel()
    deadline = time.monotonic() + 10
    while True:  # the histogram is observed just after the acks are sent
        after = await asyncio.to_thread(scrape, port)
        if after.count - before.count >= pub.count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    h = after.minus(before)
    return {
        "target_events_per_s": rate or "max",
        "published": pub.count,
        "publish_seconds": round(pub.seconds, 3),
        "publish_events_per_s": round(pub.rate, 1),
        "latency_observed": int(h.count),
        "latency_p50_s": _r(h.quantile(0.5)),
        "latency_p99_s": _r(h.quantile(0.99)),
        "latency_max_le_s": h.max_bound(),
        "latency_mean_s": _r(h.total / h.count if h.count else None),
        "lag_zero_after_stop_s": round(lag_zero_s, 3),
        "peak_lag": peak,
        "settled_while_publishing_per_s": round((pub.count - lag_at_stop) / pub.seconds, 1),
    }


async def _raw_max(ctx: Ctx, duration_s: float) -> dict[str, Any]:
    """The transport alone under the same load: a no-work pull consumer (fetch, ack) while
    the publisher runs as fast as it can; what it settles meanwhile, and when it is done."""
    env = ctx.env
    stream = env.stream("rawlive")
    await env.ensure_stream(stream)
    _, s = env.config("rawlive", stream, "bench-rawlive")
    await source.ensure_consumer(env.nc, s)
    nc = await source.connect(s.nats, env.url, name="busd-bench-raw", reconnect=False)
    pull = LeanPull(nc, stream.name, "bench-rawlive")
    await pull.start()
    got, stop = 0, False

    async def consume() -> None:
        nonlocal got
        await pull.request(500)
        while not stop:
            msgs = await pull.take(1.0)
            await pull.request(500)
            for m in msgs:
                await nc.publish(m.reply, b"+ACK")
            await nc.flush(timeout=10)
            got += len(msgs)

    ctx.tick("raw consumer @ max rate", 0, None)
    task = asyncio.create_task(consume())
    try:
        pub = await publish(
            env.nc,
            stream.subject,
            _events(ctx, f"raw-{env.tag}"),
            duration_s=duration_s,
            window=4000,
            timeout_s=duration_s + 60,
        )
        during = got
        while got < pub.count:
            if time.monotonic() - pub.stored > 60 or task.done():
                raise TimedOut(f"the raw consumer has {got} of {pub.count} after 60 s")
            await asyncio.sleep(0.01)
        caught_up_s = time.monotonic() - pub.stored
    finally:
        stop = True
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await pull.stop()
        with contextlib.suppress(Exception):
            await nc.close()
    return {
        "published": pub.count,
        "publish_events_per_s": round(pub.rate, 1),
        "settled_while_publishing_per_s": round(during / pub.seconds, 1),
        "lag_zero_after_stop_s": round(caught_up_s, 3),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


async def measure_live(ctx: Ctx) -> dict[str, Any]:
    """``busd serve`` (a child, metrics on a free port) while a publisher runs: at 1,000
    events/s, then as fast as it can; each for ~10 s (3 s with --quick). First, the same
    maximum-rate load against a no-work consumer: the transport's own share."""
    env = ctx.env
    seconds = 3.0 if ctx.quick else 10.0
    raw = await _raw_max(ctx, seconds)  # before busd starts: nothing else competes
    stream = env.stream("live")
    await env.ensure_stream(stream)
    port = free_port()
    config_path, s = env.config("live", stream, "busd", metrics=f"127.0.0.1:{port}")
    proc = env.spawn(
        [sys.executable, "-m", "busd", "serve", "--config", str(config_path)], "live.log"
    )
    try:
        ctx.tick("busd live: starting busd serve", 0, None)
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, port):
            if proc.poll() is not None:
                raise BusdError(f"busd serve exited {proc.returncode}: {env.log_tail('live.log')}")
            if time.monotonic() > deadline:
                raise TimedOut("busd serve was not ready within 60s")
            await asyncio.sleep(0.1)
        fixed = await _phase(ctx, s, stream, port, "fixed 1,000 ev/s", FIXED_RATE, seconds)
        fastest = await _phase(ctx, s, stream, port, "max rate", None, seconds)
        rss = peak_rss_mb(proc.pid)
        workers_rss = children_peak_rss_mb(proc.pid)
        final = await asyncio.to_thread(scrape, port)
    finally:
        code = env.end(proc, 30.0)
    return {
        "status": "ok",
        "fixed": fixed,
        "max": fastest,
        "raw_max": raw,
        "peak_rss_mb": rss,
        "workers_peak_rss_mb": workers_rss,
        "exit_code": code,
        "phase_seconds": seconds,
        "histogram_buckets_s": [le for le, _ in final.buckets if not math.isinf(le)],
    }


# ---- export refresh -----------------------------------------------------------------------
SIZES = (10_000, 100_000, 1_000_000)
PARTITION_SEQS = 100_000  # sequences per part file in the partitioned measurement
BATCH_RUNS = 2_500  # runs (5,000 artifacts) a batch adds in the partitioned measurement
QUICK_SIZES = (10_000, 100_000)
ARTIFACTS_PER_RUN = 2

_TS = "TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(r::BIGINT)"
_GROW_RUNS = f"""
INSERT INTO catalog.runs_d (run_id, kind, producer, status, started_at, finished_at, params,
    code_version, parent_run_id, n_artifacts, first_seq, last_seq, first_published_at,
    last_published_at, event_id)
SELECT printf('run-%08d', r), 'simulation', 'lab.simulation', 'succeeded',
       {_TS} - INTERVAL 5 MINUTE, {_TS}, '{{"strategy":"meanrev","seed":' || r || '}}',
       'a1b2c3d', NULL, {ARTIFACTS_PER_RUN}, r + 1, r + 1, {_TS}, {_TS},
       printf('run-%08d:final', r)
FROM (SELECT range AS r FROM range(?, ?))"""
_GROW_ARTIFACTS = f"""
INSERT INTO catalog.artifacts_f (run_id, name, path, format, rows, bytes, sha256, columns,
    schema_hash, meta, event_id, seq, version, published_at, committed_at, first_seq)
SELECT printf('run-%08d', r), name, printf('runs/run-%08d/%s.parquet', r, name), 'parquet',
       1000 + r % 977, 50000 + r % 7919, sha256(name || r), '[{{"name":"ts","type":"timestamp"}},'
       || '{{"name":"qty","type":"int64"}},{{"name":"px","type":"double"}}]', 'c0ffee0123456789',
       NULL, printf('run-%08d:final', r), r + 1, 1, {_TS}, {_TS}, r + 1
FROM (SELECT range AS r FROM range(?, ?)),
     (SELECT unnest(['fills', 'positions', 'orders', 'pnl'][1:{ARTIFACTS_PER_RUN}]) AS name)"""
_GROW_EVENTS = f"""
INSERT INTO catalog.events_f (seq, event_id, payload_sha256, subject, producer, run_id,
    outcome, reason, n_artifacts, published_at, committed_at)
SELECT r + 1, printf('run-%08d:final', r), sha256('p' || r),
       'artifacts.lab.simulation', 'lab.simulation', printf('run-%08d', r), 'committed', NULL,
       {ARTIFACTS_PER_RUN}, {_TS}, {_TS}
FROM (SELECT range AS r FROM range(?, ?))"""


def _exports_sync(ctx: Ctx) -> dict[str, Any]:
    folder = ctx.env.root / "exports-bench"
    catalog = Catalog(folder / "catalog.duckdb")
    try:
        exporter = Exporter(catalog.cursor(), folder / "exports", ())
        out: dict[str, Any] = {}
        runs_have = 0
        for n in QUICK_SIZES if ctx.quick else SIZES:
            ctx.tick(f"export refresh: building a {n:,}-artifact catalog", 0, None)
            runs_want = n // ARTIFACTS_PER_RUN
            started = time.perf_counter()
            con = catalog.con
            con.execute("BEGIN")
            for sql in (_GROW_RUNS, _GROW_ARTIFACTS, _GROW_EVENTS):
                con.execute(sql, [runs_have, runs_want])
            con.execute("COMMIT")
            build_s = time.perf_counter() - started
            runs_have = runs_want
            ctx.tick(f"export refresh: {n:,} artifacts", 0, ctx.runs)
            times: list[float] = []
            each: dict[str, list[float]] = {}
            files: dict[str, dict[str, int]] = {}
            for _ in range(ctx.runs):
                started = time.perf_counter()
                results, _seq = exporter.refresh(["runs", "artifacts"])
                times.append(time.perf_counter() - started)
                for r in results:
                    each.setdefault(r.name, []).append(r.duration_s)
                    files[r.name] = {"rows": r.rows, "bytes": r.bytes}
                ctx.tick("", 1, None)
            out[str(n)] = {
                "artifacts": n,
                "runs": runs_want,
                "seconds": round(median(times), 4),
                "runs_seconds": [round(t, 4) for t in times],
                "build_seconds": round(build_s, 3),
                "exports": {
                    name: {**files[name], "seconds": round(median(v), 4)}
                    for name, v in each.items()
                },
                "partitioned": _partitioned(ctx, catalog, folder, n, runs_have),
            }
            runs_have += BATCH_RUNS * ctx.runs
        return out
    finally:
        catalog.close()


def _partitioned(
    ctx: Ctx, catalog: Catalog, folder: Path, n: int, runs_have: int
) -> dict[str, Any]:
    """``export_partition_seqs``: a whole refresh, then one after a batch of new artifacts."""
    ctx.tick(f"export refresh: {n:,} artifacts, partitioned", 0, ctx.runs)
    exporter = Exporter(
        catalog.cursor(), folder / f"exports-parts-{n}", (), partition_seqs=PARTITION_SEQS
    )
    started = time.perf_counter()
    exporter.refresh(["runs", "artifacts"])
    whole_s = time.perf_counter() - started
    times: list[float] = []
    parts = 0
    for _ in range(ctx.runs):  # each run adds one batch of new runs, then refreshes
        con = catalog.con
        con.execute("BEGIN")
        for sql in (_GROW_RUNS, _GROW_ARTIFACTS, _GROW_EVENTS):
            con.execute(sql, [runs_have, runs_have + BATCH_RUNS])
        con.execute("COMMIT")
        seqs = set(range(runs_have + 1, runs_have + BATCH_RUNS + 1))  # their first_seq
        runs_have += BATCH_RUNS
        started = time.perf_counter()
        results, _ = exporter.refresh(["runs", "artifacts"], Changed(seqs, set(seqs)))
        times.append(time.perf_counter() - started)
        parts = sum(r.parts for r in results)
        ctx.tick("", 1, None)
    return {
        "partition_seqs": PARTITION_SEQS,
        "whole_seconds": round(whole_s, 4),
        "after_batch_seconds": round(median(times), 4),
        "batch_artifacts": BATCH_RUNS * ARTIFACTS_PER_RUN,
        "parts_rewritten": parts,
    }


async def measure_exports(ctx: Ctx) -> dict[str, Any]:
    """``Exporter.refresh(["runs", "artifacts"])`` on catalogs of 10k, 100k and 1M artifacts
    (two per run), built directly with INSERT … SELECT FROM range()."""
    return {
        "status": "ok",
        "artifacts_per_run": ARTIFACTS_PER_RUN,
        "sizes": await asyncio.to_thread(_exports_sync, ctx),
    }
