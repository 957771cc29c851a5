"""``busd bench --soak N``: does busd's memory stay flat over a long run?

N events (1,000,000 for the performance target) are published first, each a new run whose
one artifact is a file of the bench's pool (reused, so the disk holds only the pool; every
file is still opened, parsed and hashed). Then a real ``busd serve --drain`` consumes them
while the bench samples, once a second (more often in a short soak), its resident memory
(VmRSS), that of its file-check workers and DuckDB's own accounting (the ``memory`` verb of
the request API), with the progress read from the consumer (events settled). The report
keeps one sample per tenth of the run, the growth from the first tenth to the end, and what
the target asks (issue 15): busd with all its workers flat within 10 % from 1,000,000 events
to the end (5,000,000) and under 400 MiB — medians of the samples around each point, since
one sample catches a refresh's buffers or not.

A long soak keeps what it measured: with ``--json PATH`` every sample is appended to
``PATH.soak.jsonl`` as it is taken, and a soak that runs out of time ends busd and reports
the events it reached (``stopped_early``) instead of nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

from busd import model
from busd.bench.env import children, event, memory_mb, pss_mb, publish
from busd.bench.measure import Ctx, settled
from busd.errors import BusdError, TimedOut

POOL_FILES = 1000  # distinct files the soak's events name
FLAT_FROM = 1_000_000  # the target: RSS flat within 10 % from here to the end (5,000,000)
FLAT_PCT = 10.0
TOTAL_MB = 400.0  # ... and busd with its workers under this


class Sample(NamedTuple):
    """One look at the running busd; memory in MiB."""

    settled: int  # events settled so far
    seconds: float
    rss: float  # busd's VmRSS
    worker_rss: float  # the largest file-check worker's
    duckdb: float | None  # DuckDB's own accounting inside busd
    total: float  # busd and all its workers
    workers: int  # how many workers were running
    pss_total: float | None = None  # busd and its workers, shared pages counted once


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
    samples: list[Sample] = []
    started = time.monotonic()
    deadline = started + 120 + n / 200  # a loaded machine drains at 500 events/s
    done = 0
    every_s = min(1.0, max(0.1, n / 1_000_000))  # a short soak is sampled more often
    stopped_early = None
    with _samples_file(ctx.samples_path) as out:
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    stopped_early = (
                        f"ran out of its {deadline - started:.0f}s at {done:,} of {n:,} events"
                    )
                    break
                await asyncio.sleep(every_s)
                rss = memory_mb(proc.pid, "VmRSS")
                kids = children(proc.pid)
                workers = [r for r in (memory_mb(k, "VmRSS") for k in kids) if r is not None]
                pss = [pss_mb(k) for k in (proc.pid, *kids)]
                now_done = await settled(env.nc, s, n)
                ctx.tick("", now_done - done, None)
                done = now_done
                duck = await _duckdb_mb(env.nc, s.nats.consumer)
                if rss is not None:
                    sample = Sample(
                        done,
                        time.monotonic() - started,
                        rss,
                        max(workers, default=0),
                        duck,
                        rss + sum(workers),
                        len(workers),
                        None if None in pss else round(sum(p or 0.0 for p in pss), 1),
                    )
                    samples.append(sample)
                    if out is not None:
                        out.write(json.dumps(sample._asdict()) + "\n")
                        out.flush()
        finally:
            code = env.end(proc, 30.0)
    seconds = time.monotonic() - started
    if stopped_early is not None:
        return cut_short(samples, n, seconds, stopped_early)
    if code != 0:
        raise BusdError(f"busd serve --drain exited {code}: {env.log_tail('soak.log')}")
    return summarize(samples, n, seconds)


def cut_short(samples: list[Sample], n: int, seconds: float, why: str) -> dict[str, Any]:
    """The summary of a soak that ran out of time, over the events it reached; an error when
    it reached under a tenth of them (too little to say anything)."""
    done = samples[-1].settled if samples else 0
    if done < n / 10:
        raise TimedOut(f"the soak {why}")
    summary = summarize(samples, done, seconds)
    summary["stopped_early"] = why
    return summary


@contextlib.contextmanager
def _samples_file(path: Path | None) -> Iterator[IO[str] | None]:
    """Where each sample goes as it is taken (None: nowhere)."""
    if path is None:
        yield None
        return
    with open(path, "w", encoding="utf-8") as out:
        yield out


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


def _median_total(samples: list[Sample], lo: float, hi: float) -> float | None:
    """The median of busd + workers over the samples settled between ``lo`` and ``hi``
    (one sample is noise: a refresh's buffers come and go), or the one nearest when none
    settled there; all workers running (not while busd starts them or stops them at the end)."""
    if not samples:
        return None
    most = max(x.workers for x in samples)
    running = [x for x in samples if x.workers == most]
    totals = sorted(x.total for x in running if lo <= x.settled <= hi)
    if not totals:  # a short soak settles in a few batches: the sample nearest the range
        near = min(running, key=lambda x: max(lo - x.settled, x.settled - hi))
        totals = [near.total]
    return totals[len(totals) // 2]


def flatness(samples: list[Sample], n: int) -> dict[str, Any]:
    """RSS of busd + workers around ``FLAT_FROM`` events (± a tenth of the run) against the
    last tenth of the run, medians of each; a soak too short for that range starts at its
    fifth instead, and says so (``flat_from_events``)."""
    start = FLAT_FROM if n >= 2 * FLAT_FROM else n // 5
    base = _median_total(samples, start - n / 10, start + n / 10)
    end = _median_total(samples, n * 0.9, n)
    pct = None if base is None or end is None else round(100 * (end - base) / base, 1)
    return {
        "flat_from_events": start,
        "flat_base_mb": base,
        "flat_end_mb": end,
        "flat_growth_pct": pct,
        "flat_target_pct": FLAT_PCT,
        "total_target_mb": TOTAL_MB,
    }


def summarize(samples: list[Sample], n: int, seconds: float) -> dict[str, Any]:
    """One sample per tenth of the run, RSS growth from the first tenth to the end, and the
    flatness the target asks for (:func:`flatness`)."""
    if not samples:
        raise BusdError("no RSS sample was taken")
    kept: list[dict[str, Any]] = []
    for tenth in range(1, 11):
        at = next((x for x in samples if x.settled >= n * tenth / 10), samples[-1])
        kept.append(
            {
                "events": at.settled,
                "seconds": round(at.seconds, 1),
                "rss_mb": at.rss,
                "worker_rss_mb": at.worker_rss,
                "duckdb_mb": at.duckdb,
                "total_mb": round(at.total, 1),
            }
        )
    first, last = kept[0], kept[-1]
    return {
        "status": "ok",
        "events": n,
        "seconds": round(seconds, 1),
        "events_per_s": round(n / seconds, 1),
        "samples": kept,
        "peak_rss_mb": max(x.rss for x in samples),
        "peak_worker_rss_mb": max(x.worker_rss for x in samples),
        "peak_total_mb": round(max(x.total for x in samples), 1),
        # the same group's proportional set size: the memory it occupies (RSS counts the
        # libraries busd and each worker map once per process)
        "peak_total_pss_mb": max((x.pss_total for x in samples if x.pss_total), default=None),
        "rss_growth_mb": round(last["rss_mb"] - first["rss_mb"], 1),
        "duckdb_growth_mb": _less(last["duckdb_mb"], first["duckdb_mb"]),
        "rss_less_duckdb_growth_mb": _less(
            _less(last["rss_mb"], last["duckdb_mb"]), _less(first["rss_mb"], first["duckdb_mb"])
        ),
        "worker_rss_growth_mb": round(last["worker_rss_mb"] - first["worker_rss_mb"], 1),
        **flatness(samples, n),
    }
