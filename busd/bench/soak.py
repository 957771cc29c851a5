"""``busd bench --soak N``: does busd's memory stay flat over a long run?

N events (1,000,000 for the performance target) are published first, each a new run whose
one artifact is a file of the bench's pool (reused, so the disk holds only the pool; every
file is still opened, parsed and hashed). Then a real ``busd serve --drain`` consumes them
while the bench samples, once a second (more often in a short soak), its resident memory
(VmRSS), that of its file-check workers and DuckDB's own accounting (the ``memory`` verb of
the request API), with the progress read from the consumer (events settled). The report
keeps one sample per tenth of the run and the growth from the first tenth to the end: the
catalog's indexes and DuckDB's cache grow with the data, busd's own state should not grow
with the event count.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from typing import Any

from busd import model, source
from busd.bench.env import children, event, memory_mb, publish
from busd.bench.measure import Ctx
from busd.errors import BusdError, TimedOut

POOL_FILES = 1000  # distinct files the soak's events name


async def measure_soak(ctx: Ctx) -> dict[str, Any]:
    if not ctx.soak:
        return {"status": "skipped", "why": "run with --soak N (1000000 for the RSS target)"}
    env, n = ctx.env, ctx.soak
    pool = ctx.pool[:POOL_FILES]
    if not pool:
        raise BusdError("no Parquet files to name")
    stream = env.stream("soak")
    await env.ensure_stream(stream)
    ctx.tick(f"soak: publishing {n:,} events", 0, n)
    events = (
        event(f"soak-{env.tag}-{i:09d}", f)
        for i, f in zip(range(n), itertools.cycle(pool), strict=False)
    )
    pub = await publish(
        env.nc,
        stream.subject,
        events,
        window=4000,
        timeout_s=120 + n / 500,
        tick=lambda k: ctx.tick("", k, None),
    )
    if pub.count != n or pub.errors:
        raise BusdError(f"published {pub.count} of {n} events, {pub.errors} errors")
    config_path, s = env.config("soak", stream, "busd-soak")
    ctx.tick(f"soak: busd serve --drain over {n:,} events", 0, n)
    proc = env.spawn(
        [sys.executable, "-m", "busd", "serve", "--drain", "--config", str(config_path)], "soak.log"
    )
    samples: list[tuple[int, float, float, float, float | None]] = []
    # (settled, seconds, rss, worker rss, DuckDB's own accounting), all memory in MiB
    started = time.monotonic()
    deadline = started + 120 + n / 1000
    done = 0
    every_s = min(1.0, max(0.1, n / 1_000_000))  # a short soak is sampled more often
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimedOut(f"the soak did not finish within {deadline - started:.0f}s")
            await asyncio.sleep(every_s)
            rss = memory_mb(proc.pid, "VmRSS")
            workers = [
                r for r in (memory_mb(k, "VmRSS") for k in children(proc.pid)) if r is not None
            ]
            try:
                pending, ack_pending = await source.consumer_state(env.nc, s)
            except Exception:  # noqa: BLE001 - not declared yet: nothing settled
                pending, ack_pending = n, 0
            now_done = max(0, n - pending - ack_pending)
            ctx.tick("", now_done - done, None)
            done = now_done
            duck = await _duckdb_mb(env.nc, s.nats.consumer)
            if rss is not None:
                samples.append(
                    (done, time.monotonic() - started, rss, max(workers, default=0), duck)
                )
    finally:
        code = env.end(proc, 30.0)
    seconds = time.monotonic() - started
    if code != 0:
        raise BusdError(f"busd serve --drain exited {code}: {env.log_tail('soak.log')}")
    return summarize(samples, n, seconds)


async def _duckdb_mb(nc: Any, consumer: str) -> float | None:
    """DuckDB's own memory accounting inside the running busd (its request API)."""
    try:
        reply = await nc.request(model.subject(consumer, "memory"), b"{}", timeout=2.0)
        answer = model.decode(reply.data)
    except Exception:  # noqa: BLE001 - not up yet, or busy: no figure this time
        return None
    if not isinstance(answer, dict) or "error" in answer:
        return None
    return round(sum(answer.values()) / 2**20, 1)


def _less(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


def summarize(
    samples: list[tuple[int, float, float, float, float | None]], n: int, seconds: float
) -> dict[str, Any]:
    """One sample per tenth of the run, and RSS growth from the first tenth to the end."""
    if not samples:
        raise BusdError("no RSS sample was taken")
    kept: list[dict[str, Any]] = []
    for tenth in range(1, 11):
        at = next((x for x in samples if x[0] >= n * tenth / 10), samples[-1])
        kept.append(
            {
                "events": at[0],
                "seconds": round(at[1], 1),
                "rss_mb": at[2],
                "worker_rss_mb": at[3],
                "duckdb_mb": at[4],
            }
        )
    first, last = kept[0], kept[-1]
    return {
        "status": "ok",
        "events": n,
        "seconds": round(seconds, 1),
        "events_per_s": round(n / seconds, 1),
        "samples": kept,
        "peak_rss_mb": max(x[2] for x in samples),
        "peak_worker_rss_mb": max(x[3] for x in samples),
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "duckdb_growth_mb": _less(last["duckdb_mb"], first["duckdb_mb"]),
        "rss_less_duckdb_growth_mb": _less(
            _less(last["rss_mb"], last["duckdb_mb"]), _less(first["rss_mb"], first["duckdb_mb"])
        ),
        "worker_rss_growth_mb": round(last["worker_rss_mb"] - first["worker_rss_mb"], 1),
    }
