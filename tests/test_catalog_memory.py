"""The catalog under DuckDB's memory limit (``catalog.memory_limit_mb``): a group of events
whose rows do not fit one transaction is committed in parts, never retried forever.

A 5,000-event group whose artifacts have a 300-column schema carries ~70 MiB of `columns`
JSON; with the limit at 128 MiB its transaction failed with "Out of Memory" on every retry,
and busd stalled on it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from busd.catalog import Catalog
from busd.catalog.schema import ARTIFACT_LOG_COLUMNS, EVENT_COLUMNS, RUN_LOG_COLUMNS, Columns
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


def test_one_event_too_large_for_the_memory_limit_is_a_storage_error(tmp_path: Path) -> None:
    """A single event cannot be split: the commit fails (the daemon retries it, and says
    so) without leaving anything half-written."""
    catalog = Catalog(tmp_path / "catalog.duckdb", memory_limit_mb=64)
    try:
        with pytest.raises(StorageError, match="Out of Memory"):  # 1,000 artifacts, 90 MB
            catalog.commit(_batch(range(1, 2), artifacts=1000, columns=_schema(2000)))
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
