"""W3C trace context: an event's ``traceparent`` header is kept in its catalog rows and named in
the log lines of its batch, and a replay gives the same rows.

Also here: the derived tables do not depend on how sequences were batched, when a later event
of a run leaves out a field an earlier one gave (a traceparent is such a field).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from support import Bus

from busd import events as ev
from busd.catalog import Catalog
from busd.catalog.schema import (
    ARTIFACT_LOG_COLUMNS,
    COMPARED,
    EVENT_COLUMNS,
    RUN_LOG_COLUMNS,
    Columns,
)
from busd.errors import ConfigError
from busd.model import Batch
from busd.producer import checked_traceparent

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


# ---- the header, as W3C Trace Context reads it ----------------------------------------------
TP1 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
TP3 = "00-11111111111111111111111111111111-2222222222222222-01"
TP4 = "00-abcdefabcdefabcdefabcdefabcdef01-0123456789abcdef-01"


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ({"traceparent": TP1}, TP1),
        ({"Traceparent": TP1}, TP1),  # header names are matched as HTTP does
        ({"traceparent": f" {TP1}\t"}, TP1),
        (
            {"traceparent": TP1.replace("00-", "cc-", 1) + "-what-comes-next"},
            TP1[:55].replace("00-", "cc-", 1),
        ),
        ({"traceparent": TP1.replace("00-", "cc-", 1) + "x"}, None),  # no dash after the 4 fields
        ({"traceparent": TP1 + "-x"}, None),  # version 00 is exactly 55 characters
        ({"traceparent": TP1.upper()}, None),
        ({"traceparent": TP1.replace("00-", "ff-", 1)}, None),
        ({"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"}, None),
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"}, None),
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"}, None),
        ({"traceparent": ""}, None),
        ({"Nats-Msg-Id": "x"}, None),
        (None, None),
    ],
)
def test_a_valid_traceparent_is_kept_an_invalid_one_ignored(
    headers: dict[str, str] | None, kept: str | None
) -> None:
    assert ev.traceparent_of(headers) == kept


def test_the_producer_refuses_an_invalid_traceparent() -> None:
    """`busd submit --traceparent` and submit_sync: a usage error (exit 2) before anything is
    sent, rather than a header busd would ignore."""
    assert checked_traceparent(None) is None and checked_traceparent("  ") is None
    assert checked_traceparent(f"{TP1} ") == TP1
    with pytest.raises(ConfigError, match="not a W3C trace context") as refused:
        checked_traceparent(TP1.upper())
    assert refused.value.exit_code == 2


# ---- through the real daemon, replay and logs -----------------------------------------------
def test_traceparents_reach_the_catalog_the_logs_and_a_replay(bus: Bus) -> None:
    cfg = bus.write_config()
    bus.init()
    fills = bus.parquet("tp-d/fills.parquet")
    bus.publish(
        [
            bus.event("tp-a"),
            bus.event("tp-b"),
            bus.event("tp-c"),
            bus.event("tp-x", [{"name": "f", "path": "missing.parquet"}]),  # rejected
            bus.event("tp-a", [{"name": "fills", "path": str(bus.parquet("a2.parquet"))}]),
        ],
        headers=[
            {"traceparent": TP1},
            {"Traceparent": TP2},
            {"traceparent": TP2.upper()},  # invalid: ignored, the event still commits
            {"traceparent": TP3},
            None,  # the run's later event has none: runs_d follows the highest sequence
        ],
    )
    out = bus.cli(
        "submit", "--config", str(cfg), "--run-id", "tp-d", "--kind", "sim",
        "--traceparent", TP4, f"fills={fills}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    served = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert served.wait(90) == 0, bus.log()

    events = bus.sql("SELECT run_id, outcome, traceparent FROM catalog.events_f ORDER BY seq")
    assert events == [
        ("tp-a", "committed", TP1),
        ("tp-b", "committed", TP2),
        ("tp-c", "committed", None),
        ("tp-x", "rejected", TP3),
        ("tp-a", "committed", None),
        ("tp-d", "committed", TP4),
    ]
    runs = bus.sql("SELECT run_id, traceparent FROM catalog.runs_d ORDER BY run_id")
    assert runs == [("tp-a", None), ("tp-b", TP2), ("tp-c", None), ("tp-d", TP4)]
    assert bus.sql("SELECT count(*) FROM catalog.run_log WHERE traceparent = ?", [TP1]) == [(1,)]
    assert bus.export("runs").column("traceparent").to_pylist().count(TP4) == 1

    # the log lines of the batches name the trace ids, and the rejection its traceparent
    lines = [json.loads(x) for x in bus.log().splitlines() if x.startswith("{")]
    traced = {
        t for line in lines if line.get("event") == "batch" for t in line.get("trace_ids", [])
    }
    assert traced == {tp[3:35] for tp in (TP1, TP2, TP3, TP4)}
    (rejected,) = [line for line in lines if line.get("event") == "event rejected"]
    assert rejected["traceparent"] == TP3

    verified = bus.cli("verify", "--config", str(cfg))  # a replay gives the same rows
    assert verified.returncode == 0, verified.stdout + verified.stderr
