"""W3C trace context: an event's ``traceparent`` header is kept in its catalog rows and named in
the log lines of its batch, and a replay gives the same rows.

Also here: the derived tables do not depend on how sequences were batched, when a later event
of a run leaves out a field an earlier one gave (a traceparent is such a field).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from busd.catalog import Catalog
from busd.catalog.schema import (
    ARTIFACT_LOG_COLUMNS,
    COMPARED,
    EVENT_COLUMNS,
    RUN_LOG_COLUMNS,
    Columns,
)
from busd.model import Batch

T0 = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)


def row(table: Columns, /, **values: Any) -> tuple[Any, ...]:
    """A row in the order of ``table``'s columns, NULL where no value is given."""
    unknown = set(values) - {name for name, _ in table}
    assert not unknown, unknown
    return tuple(values.get(name) for name, _ in table)


def committed(seq: int, run_id: str, **run: Any) -> Batch:
    """The rows of one committed event of ``run_id`` (one artifact) with these run fields."""
    at = T0 + dt.timedelta(seconds=seq)
    event_id = f"{run_id}:{seq}"
    batch = Batch()
    batch.events.append(
        row(
            EVENT_COLUMNS,
            seq=seq,
            event_id=event_id,
            payload_sha256=f"{seq:064x}",
            subject="artifacts.lab",
            producer="lab",
            run_id=run_id,
            outcome="committed",
            n_artifacts=1,
            published_at=at,
            committed_at=at,
        )
    )
    batch.artifacts.append(
        row(
            ARTIFACT_LOG_COLUMNS,
            run_id=run_id,
            name="fills",
            seq=seq,
            path=f"/a/{seq}.parquet",
            format="parquet",
            rows=3,
            bytes=100,
            sha256=run.pop("sha256", None),
            columns="[]",
            schema_hash="0" * 16,
            event_id=event_id,
            published_at=at,
            committed_at=at,
        )
    )
    batch.runs.append(
        row(
            RUN_LOG_COLUMNS,
            seq=seq,
            run_id=run_id,
            kind="sim",
            producer="lab",
            published_at=at,
            event_id=event_id,
            **run,
        )
    )
    return batch


def joined(*batches: Batch) -> Batch:
    out = Batch()
    for b in batches:
        out.events += b.events
        out.artifacts += b.artifacts
        out.runs += b.runs
    return out


def derived(path: Path, batches: list[Batch]) -> dict[str, list[tuple[Any, ...]]]:
    catalog = Catalog(path)
    try:
        for batch in batches:
            catalog.commit(batch)
        out = {}
        for table in ("runs_d", "artifacts_f"):
            wall_clock = COMPARED[table]
            exclude = f" EXCLUDE ({', '.join(wall_clock)})" if wall_clock else ""
            out[table] = catalog.con.execute(
                f"SELECT *{exclude} FROM catalog.{table} ORDER BY ALL"
            ).fetchall()
        return out
    finally:
        catalog.close()


def test_a_field_left_out_later_is_left_out_whatever_the_batches(tmp_path: Path) -> None:
    """Seq 2 of a run leaves out status and sha256 that seq 1 gave. The highest sequence
    wins, NULL included: one batch (as a replay commits) and two (as the daemon may) agree.
    DuckDB's arg_max skips NULL values, which made the single batch keep seq 1's."""
    first = committed(1, "run-a", status="succeeded", code_version="v1", sha256="a" * 64)
    second = committed(2, "run-a")
    apart = derived(tmp_path / "apart.duckdb", [first, second])
    together = derived(tmp_path / "together.duckdb", [joined(first, second)])
    assert apart == together
    (run,) = apart["runs_d"]
    assert run[0] == "run-a" and run[3] is None  # status: seq 2 gave none
    (artifact,) = apart["artifacts_f"]
    assert artifact[6] is None  # sha256: seq 2 gave none
