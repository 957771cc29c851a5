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
