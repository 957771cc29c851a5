"""The catalog under DuckDB's memory limit (``catalog.memory_limit_mb``): a group of events
whose rows do not fit one transaction is committed in parts, never retried forever.

A 5,000-event group whose artifacts have a 300-column schema carries ~70 MiB of `columns`
JSON; with the limit at 128 MiB its transaction failed with "Out of Memory" on every retry,
and busd stalled on it."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support import Bus, ack_floor

from busd.catalog import Catalog
from busd.catalog.schema import (
    ARTIFACT_LOG_COLUMNS,
    EVENT_COLUMNS,
    REJECTION_COLUMNS,
    RUN_LOG_COLUMNS,
    Columns,
)
from busd.errors import StorageError
from busd.model import Batch
from busd.sql import STAMP


def _schema(n: int) -> str:
    """The `columns` JSON of an n-column table: ~45 bytes a column."""
    return "[" + ",".join(f'{{"name":"feature_{i:03d}","type":"double"}}' for i in range(n)) + "]"


WIDE = _schema(300)  # 13.5 KB
TABLES = ("events_f", "artifact_log", "run_log", "artifacts_f", "runs_d")


def _row(layout: Columns, **values: Any) -> tuple[Any, ...]:
    return tuple(values.get(name) for name, _ in layout)


def _batch(
    seqs: range, *, artifacts: int = 1, runs: int | None = None, columns: str = WIDE
) -> Batch:
    """Committed events, each with ``artifacts`` 300-column artifacts; ``runs``: how many
    distinct runs they share (a run's later events add to it), else one run each."""
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    batch = Batch()
    for seq in seqs:
        run_id = f"run-{seq % runs if runs else seq:06d}"
        common = {"seq": seq, "run_id": run_id, "event_id": f"e-{seq}", "published_at": at}
        batch.events.append(
            _row(
                EVENT_COLUMNS,
                **common,
                payload_sha256=f"{seq:064x}",
                subject="artifacts.lab.features",
                producer="lab.features",
                outcome="committed",
                n_artifacts=artifacts,
                committed_at=at,
            )
        )
        batch.runs.append(_row(RUN_LOG_COLUMNS, **common, kind="features", producer="lab.features"))
        batch.artifacts += [
            _row(
                ARTIFACT_LOG_COLUMNS,
                **common,
                name=f"part-{k:03d}",
                path=f"/data/features/{run_id}/part-{k:03d}.parquet",
                format="parquet",
                rows=1000,
                bytes=50_000,
                columns=columns.replace("feature_000", f"f{seq}"),  # no two alike
                schema_hash="c0ffee",
                committed_at=at,
            )
            for k in range(artifacts)
        ]
    return batch


def _tables(catalog: Catalog) -> dict[str, list[tuple[Any, ...]]]:
    """Every row but its commit stamp (which counts transactions), sorted here: an ORDER BY
    of these wide rows would not fit the limit either."""
    return {
        t: sorted(
            catalog.con.execute(
                f"SELECT COLUMNS(lambda c: c <> '{STAMP}') FROM catalog.{t}"
            ).fetchall(),
            key=repr,
        )
        for t in TABLES
    }


def test_a_group_too_large_for_the_memory_limit_commits_in_parts(tmp_path: Path) -> None:
    limited = Catalog(tmp_path / "limited.duckdb", memory_limit_mb=64)
    free = Catalog(tmp_path / "free.duckdb")
    try:
        # 5,000 events, a run for every 7 (runs span the parts), then a second group
        for seqs in (range(1, 5001), range(5001, 6001)):
            changed = limited.commit(_batch(seqs, runs=700))
            assert changed.artifacts and changed.runs  # what the exports rewrite, merged
            free.commit(_batch(seqs, runs=700))
        assert _tables(limited) == _tables(free)
        assert limited.catalog_seq() == 6000
        n = limited.con.execute("SELECT count(*), sum(version) FROM catalog.artifacts_f").fetchone()
        assert n == (700, 6000)  # a key per run, each version counted once
    finally:
        limited.close()
        free.close()


def test_one_event_too_large_for_the_memory_limit_commits_with_the_limit_raised(
    tmp_path: Path,
) -> None:
    """A single event cannot be split: its transaction alone runs with the limit doubled
    until it fits (up to ``stretch`` times it), and the limit is set back after. It failed
    on every retry before, and busd stalled on a valid event."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=64)
    try:
        catalog.commit(_batch(range(1, 2), artifacts=1000, columns=_schema(400)))  # 18 MB
        assert catalog.catalog_seq() == 1
        assert catalog.con.execute("SELECT count(*) FROM catalog.artifacts_f").fetchone() == (1000,)
        limit = catalog.con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert limit == ("64.0 MiB",)
    finally:
        catalog.close()


def test_one_event_beyond_the_stretched_limit_is_a_storage_error(tmp_path: Path) -> None:
    """Past ``stretch`` times the limit the commit fails (the daemon retries it, and says
    so) without leaving anything half-written, and the limit is back where it was."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=64, stretch=1)
    try:
        with pytest.raises(StorageError, match=r"Out of Memory.*raise catalog\.memory_limit_mb"):
            catalog.commit(_batch(range(1, 2), artifacts=1000, columns=_schema(400)))
        assert catalog.catalog_seq() == 0
        catalog.commit(_batch(range(10, 12)))  # the catalog is still usable
        assert catalog.catalog_seq() == 11
    finally:
        catalog.close()


def test_a_replay_transaction_out_of_memory_fails_whole(tmp_path: Path) -> None:
    """A replay holds batches in one open transaction; when the batch that closes it runs
    out of memory, everything held rolls back with it. Splitting only the closing batch
    then committed its halves alone: 3,000 held events vanished without an error."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=64)
    try:
        for lo in range(1, 3001, 1000):
            catalog.commit(_batch(range(lo, lo + 1000), columns="[]"), derive=False, hold=True)
        with pytest.raises(StorageError, match="Out of Memory"):
            catalog.commit(_batch(range(3001, 8001), runs=700), derive=False)
        assert catalog.catalog_seq() == 0  # nothing half-kept: the replay is failed, whole
    finally:
        catalog.close()


def test_an_export_too_wide_for_the_memory_limit_refreshes_with_it_raised(
    tmp_path: Path,
) -> None:
    """4,000 artifacts of 2,000-column schemas (90 KB of `columns` each): their refresh
    asked DuckDB for one 256 MiB allocation under the default 128 MiB, failed every time,
    and the acks waited for good (a reviewer's run). The refresh alone now runs with the
    limit doubled until it fits, and the limit is set back."""
    from busd import config
    from busd.exports import Exporter

    s = config.load(env={}, overrides={"data_dir": str(tmp_path)})
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=s.catalog.memory_limit_mb)
    try:
        for lo in range(1, 4001, 200):
            catalog.commit(_batch(range(lo, lo + 200), columns=_schema(2000)))
        cur = catalog.cursor()
        exporter = Exporter.of(cur, s)
        results, _ = exporter.refresh(["runs", "artifacts"])
        assert {r.name: r.rows for r in results} == {"runs": 4000, "artifacts": 4000}
        assert cur.execute("SELECT current_setting('memory_limit')").fetchone() == ("128.0 MiB",)
    finally:
        catalog.close()


def test_an_export_of_wide_artifacts_fits_the_default_memory_limit(tmp_path: Path) -> None:
    """6,000 artifacts of distinct 300-column schemas (13.5 KB of `columns` each): the
    artifacts export held them in one row group and its refresh ran out of memory under
    the default 128 MiB, every time (acks waited on it for good); row groups of at most
    8 MB fit."""
    from busd import config
    from busd.exports import Exporter

    limit = config.load(env={}).catalog.memory_limit_mb
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=limit)
    try:
        for lo in range(1, 6001, 1000):
            catalog.commit(_batch(range(lo, lo + 1000)))
        exporter = Exporter(catalog.cursor(), tmp_path / "exports", ())
        results, _ = exporter.refresh(["runs", "artifacts"])
        assert {r.name: r.rows for r in results} == {"runs": 6000, "artifacts": 6000}
    finally:
        catalog.close()


def test_known_sequences_of_a_sparse_batch(tmp_path: Path) -> None:
    """One late low sequence among new ones: the outcomes of exactly those asked for (the
    range between them is the whole catalog, and is not brought back)."""
    catalog = Catalog(tmp_path / "catalog.duckdb")
    try:
        catalog.commit(_batch(range(1, 2001), columns="[]"))
        asked = [7, *range(5001, 5101)]
        assert set(catalog.known(asked)) == {7}
        assert set(catalog.known([3, 1999, 2000, 2001])) == {3, 1999, 2000}
        assert catalog.commit(_batch(range(7, 8), columns="[]")).artifacts == set()  # again
        assert catalog.catalog_seq() == 2000
    finally:
        catalog.close()


def _rejections(seqs: range, size: int) -> Batch:
    """Rejected events whose payloads (kept for inspection) are ``size`` bytes each."""
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    batch = Batch()
    for seq in seqs:
        common = {"seq": seq, "event_id": f"e-{seq}", "published_at": at}
        batch.events.append(
            _row(EVENT_COLUMNS, **common, payload_sha256=f"{seq:064x}", outcome="rejected")
        )
        batch.rejections.append(
            _row(
                REJECTION_COLUMNS,
                **common,
                subject="artifacts.lab.features",
                reason="malformed",
                payload=seq.to_bytes(8) + b"x" * size,
                deliveries=1,
                rejected_at=at,
            )
        )
    return batch


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda seqs: _rejections(seqs, 100_000), id="payloads-100KB"),
        pytest.param(lambda seqs: _batch(seqs, columns=_schema(2000)), id="columns-90KB"),
    ],
)
def test_wide_values_past_a_failed_checkpoint_keep_committing(tmp_path: Path, make: Any) -> None:
    """DuckDB's checkpoint needs memory for the widest values it rewrites: at 128 MiB the
    COMMIT after ~3,500 rows of 100 KB values failed with its checkpoint ("durable, but the
    autocheckpoint failed", or "Failed to commit"), and DuckDB invalidated the database. busd
    exited 1; restarted, it failed at its next checkpoint, every time, and then at every
    commit: a permanent stall, reached by bad input (malformed 100 KB payloads) as well as by
    valid data (2,000-column schemas). The catalog is attached again and the checkpoint run
    with the limit stretched; the batch is committed once, the limit set back."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=128)
    reader = catalog.cursor()  # another thread's connection, opened before
    try:
        for lo in range(1, 4001, 100):
            catalog.commit(make(range(lo, lo + 100)))
        assert catalog.con.execute(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM catalog.events_f"
        ).fetchone() == (4000, 4000, 1, 4000)
        assert reader.execute("SELECT max(seq) FROM catalog.events_f").fetchone() == (4000,)
        limit = catalog.con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert limit == ("128.0 MiB",)
    finally:
        catalog.close()


def test_serve_keeps_running_through_malformed_wide_payloads(bus: Bus) -> None:
    """Bad input must not stop busd: 1,200 malformed 200 KB payloads, kept for inspection,
    made the catalog's checkpoint fail at `busd serve`'s 64 MiB, and busd exited 1 (then,
    restarted, at every checkpoint). Now every one is rejected with its payload whole, the
    daemon keeps running, and a good event after them commits."""
    n, size = 1200, 200_000
    cfg = bus.write_config(catalog={"memory_limit_mb": 64}, consumer={"batch_max": 100})
    proc = bus.spawn("serve", "--config", str(cfg))
    bus.while_alive(proc, lambda: "busd ready" in bus.log(), 60, "busd ready")
    bad = [i.to_bytes(4) + b"x" * size for i in range(n)]  # not JSON: `malformed`
    last = bus.publish([*bad, bus.event("run-after")])[-1]
    bus.while_alive(proc, lambda: ack_floor(bus) >= last, 120, "every event settled")
    proc.terminate()
    assert proc.wait(60) == 0
    assert bus.sql(
        "SELECT reason, count(*), min(octet_length(payload)), max(octet_length(payload)) "
        "FROM catalog.rejections_f GROUP BY reason"
    ) == [("malformed", n, size + 4, size + 4)]
    assert bus.sql("SELECT outcome FROM catalog.events_f WHERE seq = ?", [last]) == [("committed",)]


def test_the_catalog_is_attached_again_while_another_thread_reads(tmp_path: Path) -> None:
    """An export refresh reads in a transaction of its own cursor, on its own thread. When
    the catalog was attached again (after a failed checkpoint) while one was open, the
    ATTACH failed ("already attached") and busd exited 1 (a reviewer's script; an open
    transaction keeps DuckDB from checkpointing on its own, so the window is the moment
    between the failure and the DETACH, staged here). The ATTACH now waits for it."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=128)
    reader = catalog.cursor()
    try:
        catalog.commit(_rejections(range(1, 101), 1000))
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM catalog.events_f").fetchone() == (100,)
        ended = threading.Timer(0.5, lambda: reader.execute("ROLLBACK"))
        ended.start()
        catalog._reattach(duckdb.Error("Checkpoint failed: the database has been invalidated"))
        ended.join()
        catalog.commit(_rejections(range(101, 201), 1000))
        assert reader.execute("SELECT count(*) FROM catalog.events_f").fetchone() == (200,)
    finally:
        catalog.close()
