"""``busd bench --artifacts N``: a soak to N artifacts (10,000,000 for the target) with
partitioned exports, then the export figures at that size.

N / 100 events of a hundred artifacts each (the bench's pool files, reused: every one is still
opened and parsed) are published, and a real ``busd serve --drain`` with
``export_partition_seqs`` consumes them. The soak is bounded in time: past the bound busd is
stopped and the figures are taken at the size it reached (the report says so). Then, on that
catalog and its exports, with busd's own code in this process:

- the first refresh after a restart: 5,000 new events and a new version of one older
  artifact are committed while no busd runs, then a new exporter starts as ``busd serve``
  does (``stale``, then ``refresh``): its time and the part files it rewrote, of how many;
- the refresh after each of ``--runs`` further 5,000-event batches (the median);
- point lookups as ``busd query`` answers them (a fresh DuckDB connection with a view per
  export, :func:`busd.manifest.exports_reader`): an artifact by run and name, a run; and the
  wall time of the ``busd query`` process, Python's start included;
- a whole rewrite of every part, what the first refresh after a start cost before.

The machine's load average is reported with the figures: they move with it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from busd.bench.env import PoolFile, children, memory_mb, publish
from busd.bench.measure import Ctx, median, settled
from busd.catalog import Catalog
from busd.catalog.schema import ARTIFACT_LOG_COLUMNS, EVENT_COLUMNS, RUN_LOG_COLUMNS, Columns
from busd.errors import BusdError
from busd.exports import Exporter
from busd.manifest import PART_GLOB, exports_reader
from busd.model import Batch, Changed

PER_EVENT = 100  # artifacts per event of the soak
PARTITION_SEQS = 5_000  # sequences per part: 500,000 artifact rows per part of the soak
BATCH = 5_000  # events of a measured batch (one run, one artifact each)
TARGET_MS = 100.0  # refresh after a batch, and a point lookup
SLOWEST = 2_000  # artifacts/s: the soak is stopped after 300 s + N / SLOWEST


def _encode(run_id: str, files: list[PoolFile]) -> tuple[str, bytes]:
    import msgspec

    event_id = f"{run_id}:final"
    return event_id, msgspec.json.encode(
        {
            "schema_version": 1,
            "event_id": event_id,
            "run": {"run_id": run_id, "kind": "bench", "status": "succeeded"},
            "artifacts": [
                {"name": f"a{k:03d}", "path": f.path, "rows": f.rows, "bytes": f.bytes}
                for k, f in enumerate(files)
            ],
        }
    )


def _row(layout: Columns, /, **values: Any) -> tuple[Any, ...]:
    return tuple(values.get(name) for name, _ in layout)


def _batch(first_seq: int, runs: list[str], path: str, names: tuple[str, ...] = ("a000",)) -> Batch:
    """What busd commits for events of these runs (one each, from ``first_seq`` on), whose
    artifacts all name the file at ``path``."""
    now = dt.datetime.now(dt.UTC)
    batch = Batch()
    for seq, run_id in enumerate(runs, first_seq):
        event_id = f"{run_id}:{seq}"
        common = {"seq": seq, "run_id": run_id, "event_id": event_id, "published_at": now}
        batch.events.append(
            _row(
                EVENT_COLUMNS,
                **common,
                payload_sha256="0" * 64,
                subject="bench",
                producer="bench",
                outcome="committed",
                n_artifacts=len(names),
                committed_at=now,
            )
        )
        batch.runs.append(
            _row(RUN_LOG_COLUMNS, **common, kind="bench", producer="bench", status="succeeded")
        )
        batch.artifacts += [
            _row(
                ARTIFACT_LOG_COLUMNS,
                **common,
                name=name,
                path=path,
                format="parquet",
                rows=3,
                bytes=1000,
                columns="[]",
                committed_at=now,
            )
            for name in names
        ]
    return batch


async def _fill(ctx: Ctx, n: int) -> dict[str, Any]:
    """Publish ``n`` artifacts and let ``busd serve --drain`` take them, within the bound."""
    env = ctx.env
    pool = ctx.pool
    if not pool:
        raise BusdError("no Parquet files to name")
    events = max(1, n // PER_EVENT)
    stream = env.stream("artifacts")
    await env.ensure_stream(stream)
    ctx.tick(f"artifacts: publishing {events:,} events of {PER_EVENT}", 0, events)
    payloads = (
        _encode(
            f"big-{env.tag}-{i:08d}",
            [pool[(i * PER_EVENT + k) % len(pool)] for k in range(PER_EVENT)],
        )
        for i in range(events)
    )
    pub = await publish(
        env.nc,
        stream.subject,
        payloads,
        window=2000,
        timeout_s=120 + events / 200,
        tick=lambda k: ctx.tick("", k, None),
    )
    config_path, s = env.config(
        "artifacts", stream, "busd-artifacts", extra={"export_partition_seqs": PARTITION_SEQS}
    )
    ctx.tick(f"artifacts: busd serve --drain over {events:,} events", 0, events)
    proc = env.spawn(
        [sys.executable, "-m", "busd", "serve", "--drain", "--config", str(config_path)],
        "artifacts.log",
    )
    bound_s = 300 + n / SLOWEST  # 10M artifacts: 5,300 s
    started = time.monotonic()
    done, peak, bounded = 0, 0.0, False
    try:
        while proc.poll() is None:
            if time.monotonic() - started > bound_s:
                bounded = True
                break
            await asyncio.sleep(2.0)
            rss = sum(
                r for r in (memory_mb(p, "VmRSS") for p in [proc.pid, *children(proc.pid)]) if r
            )
            peak = max(peak, rss)
            now_done = await settled(env.nc, s, events)
            ctx.tick("", now_done - done, None)
            done = now_done
    finally:
        code = env.end(proc, 120.0)
    seconds = time.monotonic() - started
    if code != 0:
        raise BusdError(f"busd serve --drain exited {code}: {env.log_tail('artifacts.log')}")
    return {
        "config": config_path,
        "published_events": pub.count,
        "publish_seconds": round(pub.seconds, 1),
        "drain_seconds": round(seconds, 1),
        "bound_s": bound_s,
        "stopped_at_bound": bounded,
        "peak_rss_mb_with_workers": round(peak, 1),
    }


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def _lookups(folder: Path, run_id: str, runs: int) -> dict[str, Any]:
    """Point lookups as ``busd query`` runs them, each on a fresh connection."""
    queries = {
        "artifact": f"SELECT * FROM artifacts WHERE run_id = '{run_id}' AND name = 'a003'",
        "run": f"SELECT * FROM runs WHERE run_id = '{run_id}'",
    }
    out: dict[str, Any] = {}
    for key, sql in queries.items():
        total, query, found = [], [], 0
        for _ in range(max(3, runs)):
            started = time.perf_counter()
            con = exports_reader(folder)
            ready = time.perf_counter()
            found = len(con.execute(sql).fetchall())
            done = time.perf_counter()
            con.close()
            total.append(done - started)
            query.append(done - ready)
        if found != 1:
            raise BusdError(f"the {key} lookup found {found} rows, not 1")
        out[key] = {
            "ms": round(median(total) * 1000, 1),
            "query_ms": round(median(query) * 1000, 1),
            "sql": sql,
        }
    return out


def _query_process(config_path: Path, sql: str) -> float:
    """Wall time of a ``busd query`` process answering ``sql``, in ms."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "busd", "query", "--config", str(config_path), "--json", sql],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BusdError(f"busd query exited {done.returncode}: {done.stderr[-300:]!r}")
    return round((time.perf_counter() - started) * 1000, 1)


def _measure(ctx: Ctx, config_path: Path) -> dict[str, Any]:
    """The refresh and lookup figures on the soak's catalog (busd not running)."""
    from busd.config import load as load_config

    s = load_config(str(config_path), env={})
    load = [round(x, 2) for x in os.getloadavg()]
    catalog = Catalog(s.catalog_path)
    try:
        con = catalog.con
        artifacts = int(con.execute("SELECT count(*) FROM catalog.artifacts_f").fetchall()[0][0])
        runs = int(con.execute("SELECT count(*) FROM catalog.runs_d").fetchall()[0][0])
        middle = str(  # the run looked up: one in the middle of the stream
            con.execute(
                "SELECT arg_min(run_id, abs(first_seq::BIGINT - m)) FROM catalog.runs_d, "
                "(SELECT (min(first_seq) + max(first_seq)) // 2 AS m FROM catalog.runs_d)"
            ).fetchall()[0][0]
        )
        seq = catalog.catalog_seq() + 1
        path = ctx.pool[0].path  # a real file: not counted missing
        # while no busd runs: new events, and a new version of an artifact in an older part
        ctx.tick(f"artifacts: first refresh after a restart at {artifacts:,}", 0, None)
        catalog.commit(_batch(seq, [f"down-{i:06d}" for i in range(BATCH)], path))
        seq += BATCH
        older = str(con.execute("SELECT min(run_id) FROM catalog.runs_d").fetchall()[0][0])
        catalog.commit(_batch(seq, [older], path, ("a003",)))
        seq += 1
        started = time.perf_counter()
        exporter = Exporter.of(catalog.cursor(), s)
        stale = exporter.stale(catalog.catalog_seq())
        judged = time.perf_counter()
        results, _ = exporter.refresh(stale) if stale else ([], 0)
        restart_s = time.perf_counter() - started
        restart = {
            "ms": round(restart_s * 1000, 1),
            "stale_ms": round((judged - started) * 1000, 1),
            "stale": stale,
            "parts_rewritten": {r.name: r.parts for r in results},
            "parts": {n: len(list((s.exports_path / n).glob(PART_GLOB))) for n in stale},
        }
        ctx.tick(f"artifacts: refresh after {BATCH:,}-event batches", 0, ctx.runs)
        times: list[float] = []
        parts: list[int] = []
        for k in range(ctx.runs):
            changed = catalog.commit(_batch(seq, [f"live-{k}-{i:06d}" for i in range(BATCH)], path))
            seq += BATCH
            started = time.perf_counter()
            results, _ = exporter.refresh(["runs", "artifacts"], changed)
            times.append(time.perf_counter() - started)
            parts.append(sum(r.parts for r in results))
            ctx.tick("", 1, None)
        ctx.tick("artifacts: point lookups", 0, None)
        lookups = _lookups(s.exports_path, middle, ctx.runs)
        process = {
            "lookup_ms": _query_process(config_path, lookups["artifact"]["sql"]),
            "select_1_ms": _query_process(config_path, "SELECT 1"),
        }
        ctx.tick("artifacts: a whole rewrite, for comparison", 0, None)
        started = time.perf_counter()
        exporter.refresh(["runs", "artifacts"], Changed(None, None))
        whole_s = time.perf_counter() - started
    finally:
        catalog.close()
    return {
        "artifacts": artifacts,
        "runs": runs,
        "partition_seqs": PARTITION_SEQS,
        "part_files": {
            n: len(list((s.exports_path / n).glob(PART_GLOB))) for n in ("runs", "artifacts")
        },
        "catalog_mb": _size_mb(s.catalog_path),
        "exports_mb": _size_mb(s.exports_path),
        "restart": restart,
        "after_batch_ms": round(median(times) * 1000, 1),
        "after_batch_runs_ms": [round(t * 1000, 1) for t in times],
        "after_batch_parts": parts,
        "lookups": lookups,
        "query_process": process,
        "whole_seconds": round(whole_s, 2),
        "load_average": {"before": load, "after": [round(x, 2) for x in os.getloadavg()]},
        "target_ms": TARGET_MS,
    }


async def measure_artifacts(ctx: Ctx) -> dict[str, Any]:
    if not ctx.artifacts:
        return {"status": "skipped", "why": "run with --artifacts N (10000000 for the target)"}
    load = [round(x, 2) for x in os.getloadavg()]
    fill = await _fill(ctx, ctx.artifacts)
    config_path = fill.pop("config")
    figures = await asyncio.to_thread(_measure, ctx, config_path)
    return {
        "status": "ok",
        "wanted": ctx.artifacts,
        "per_event": PER_EVENT,
        "fill": fill,
        "load_average_at_start": load,
        **figures,
    }


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table, each figure next to its target."""
    n = f"{r['artifacts']:,}"
    reached = (
        ""
        if not r["fill"]["stopped_at_bound"]
        else f" (stopped at the time bound: {n} of {r['wanted']:,})"
    )
    load = "/".join(str(x) for x in r["load_average"]["before"])
    restart = r["restart"]
    written = sum(restart["parts_rewritten"].values())
    there = sum(restart["parts"].values())
    lookup = r["lookups"]["artifact"]
    run = r["lookups"]["run"]
    fill = r["fill"]
    return [
        (
            f"artifacts soak: serve --drain to {n} artifacts{reached}",
            f"{r['artifacts'] / max(fill['drain_seconds'], 1e-9):,.0f} artifacts/s",
            f"{fill['published_events']:,} events of {r['per_event']} in "
            f"{fill['drain_seconds']:.0f} s; partitioned by {r['partition_seqs']:,} seqs "
            f"({r['part_files']['artifacts']} + {r['part_files']['runs']} part files); catalog "
            f"{r['catalog_mb']:,.0f} MiB, exports {r['exports_mb']:,.0f} MiB; peak RSS "
            f"{fill['peak_rss_mb_with_workers']:,.0f} MiB with the workers; load {load}",
        ),
        (
            f"refresh after a {BATCH:,}-event batch at {n}",
            f"{r['after_batch_ms']:.0f} ms",
            f"target ≤ {r['target_ms']:.0f} ms; parts rewritten per refresh "
            f"{'/'.join(str(p) for p in r['after_batch_parts'])}; "
            f"runs: {' / '.join(f'{t:.0f}' for t in r['after_batch_runs_ms'])} ms",
        ),
        (
            f"first refresh after a restart at {n}",
            f"{restart['ms']:.0f} ms, {written} of {there} parts",
            f"target: only what changed while busd was down ({BATCH:,} new events and one new "
            f"version of an older artifact); of it, finding the stale exports "
            f"{restart['stale_ms']:.0f} ms; a whole rewrite {r['whole_seconds']:.1f} s",
        ),
        (
            f"busd query: point lookup at {n}",
            f"{lookup['ms']:.0f} ms",
            f"target ≤ {r['target_ms']:.0f} ms (an artifact by run and name; the query alone "
            f"{lookup['query_ms']:.0f} ms; a run by run_id {run['ms']:.0f} ms); the busd query "
            f"process {r['query_process']['lookup_ms']:.0f} ms with Python's start "
            f"(SELECT 1: {r['query_process']['select_1_ms']:.0f} ms)",
        ),
    ]
