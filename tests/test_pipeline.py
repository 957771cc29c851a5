"""End to end through a real nats-server and a real DuckDB file: publish → commit → export."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from support import Bus, sha256_file

from busd.manifest import read_manifest


def test_core_and_jetstream_publish_both_commit(bus: Bus) -> None:
    bus.publish([bus.event("run-core")], js=False)  # what `nats pub` does: no PubAck
    bus.publish([bus.event("run-js")], headers=[{"Nats-Msg-Id": "run-js:final"}])
    stats = bus.drain()
    assert stats.outcomes == {"committed": 2}
    runs = bus.sql("SELECT run_id, producer, n_artifacts FROM catalog.runs_d ORDER BY run_id")
    assert runs == [("run-core", "lab.sim", 1), ("run-js", "lab.sim", 1)]
    ids = dict(bus.sql("SELECT run_id, event_id FROM catalog.events_f"))
    assert ids["run-js"] == "run-js:final"  # from Nats-Msg-Id
    assert len(ids["run-core"]) == 64  # sha256 of the payload
    assert bus.export("runs").num_rows == 2
    assert bus.export("artifacts").num_rows == 2
    manifest = read_manifest(bus.data / "exports")
    assert manifest.exports["artifacts"].catalog_seq == 2
    assert manifest.exports["runs"].rows == 2


def test_artifact_row_facts_come_from_the_file(bus: Bus) -> None:
    path = bus.parquet("r/fills.parquet", rows=7)
    event = bus.event(
        "r",
        [
            {
                "name": "fills",
                "path": "r/fills.parquet",
                "rows": 7,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "meta": {"note": "x"},
            }
        ],
        event_id="r:1",
        producer="lab.sim",
    )
    event["run"]["params"] = {"seed": 7, "nested": {"a": [1, 2]}}
    bus.publish([event])
    bus.drain()
    (row,) = bus.sql(
        "SELECT path, format, rows, bytes, sha256, columns, schema_hash, meta, "
        "event_id, seq, version FROM catalog.artifacts_f"
    )
    assert row[0] == str(path.resolve())
    assert row[1:5] == ("parquet", 7, path.stat().st_size, sha256_file(path))
    assert json.loads(row[5]) == [{"name": "x", "type": "int64"}, {"name": "y", "type": "string"}]
    assert len(row[6]) == 16 and json.loads(row[7]) == {"note": "x"}
    assert row[8:] == ("r:1", 1, 1)
    (params,) = bus.sql("SELECT params FROM catalog.runs_d")[0]
    assert json.loads(params) == {"seed": 7, "nested": {"a": [1, 2]}}


def test_same_event_twice_is_one_commit_and_one_duplicate(bus: Bus) -> None:
    event = bus.event("run-dup", event_id="run-dup:final")
    bus.publish([event, event], js=False)
    stats = bus.drain()
    assert stats.outcomes == {"committed": 1, "duplicate": 1}
    assert bus.sql("SELECT outcome FROM catalog.events_f ORDER BY seq") == [
        ("committed",),
        ("duplicate",),
    ]
    assert bus.sql("SELECT version FROM catalog.artifacts_f") == [(1,)]
    # a later run of busd sees it as a duplicate of the catalog, not of its own batch
    bus.publish([event], js=False)
    assert bus.drain().outcomes == {"duplicate": 1}


def test_jetstream_drops_a_republish_inside_the_duplicate_window(bus: Bus) -> None:
    event = bus.event("run-w")
    seqs = bus.publish([event, event], headers=[{"Nats-Msg-Id": "w:1"}, {"Nats-Msg-Id": "w:1"}])
    assert seqs == [1, 1]
    assert bus.drain().outcomes == {"committed": 1}


def test_later_sequence_wins_and_versions_count(bus: Bus) -> None:
    first = bus.parquet("r/v1.parquet", rows=2)
    second = bus.parquet("r/v2.parquet", rows=5)
    e1 = bus.event("r", [{"name": "fills", "path": str(first)}], event_id="r:1")
    e2 = bus.event(
        "r",
        [{"name": "fills", "path": str(second)}, {"name": "pos", "path": str(first)}],
        event_id="r:2",
    )
    e2["run"]["status"] = "failed"
    bus.publish([e1, e2])
    bus.drain()
    assert bus.sql("SELECT name, rows, seq, version FROM catalog.artifacts_f ORDER BY name") == [
        ("fills", 5, 2, 2),
        ("pos", 2, 2, 1),
    ]
    assert bus.sql("SELECT status, n_artifacts, first_seq, last_seq FROM catalog.runs_d") == [
        ("failed", 2, 1, 2)
    ]


def test_event_with_one_bad_artifact_leaves_nothing(bus: Bus) -> None:
    good = bus.parquet("r/good.parquet")
    event = bus.event(
        "r", [{"name": "good", "path": str(good)}, {"name": "bad", "path": str(good), "rows": 999}]
    )
    bus.publish([event])
    stats = bus.drain()
    assert stats.outcomes == {"rejected": 1}
    assert bus.sql("SELECT count(*) FROM catalog.artifacts_f") == [(0,)]
    assert bus.sql("SELECT count(*) FROM catalog.runs_d") == [(0,)]
    assert bus.sql("SELECT reason FROM catalog.rejections_f") == [("rows_mismatch",)]
    assert bus.export("artifacts").num_rows == 0


def test_rejections_do_not_stop_later_good_events(bus: Bus) -> None:
    bus.publish([b"not json", bus.event("a"), {"schema_version": 1}, bus.event("b")])
    stats = bus.drain()
    assert stats.outcomes == {"committed": 2, "rejected": 2}
    assert sorted(r for (r,) in bus.sql("SELECT run_id FROM catalog.runs_d")) == ["a", "b"]
    payloads = bus.sql("SELECT seq, payload FROM catalog.rejections_f ORDER BY seq")
    assert payloads[0] == (1, b"not json")


def test_exports_stay_readable_while_refreshed(bus: Bus) -> None:
    """A reader polling the exports never sees a partial file while busd rewrites them."""
    bus.publish([bus.event(f"run-{i}") for i in range(5)])
    bus.drain()
    errors: list[str] = []
    reads = 0
    stop = threading.Event()
    target = bus.data / "exports" / "artifacts.parquet"

    con = duckdb.connect()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                # One open per read: a reader that opens the path twice (pq.read_table on a
                # path does, through the dataset API) can pair an old footer with new pages.
                with open(target, "rb") as handle:
                    pq.read_table(handle)
                con.execute(f"SELECT count(*) FROM read_parquet('{target}')").fetchall()
                reads += 1
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(6):
            bus.publish([bus.event(f"run-{round_}-{i}") for i in range(20)])
            bus.drain(consumer={"batch_max": 5})
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert reads > 0
    assert bus.export("artifacts").num_rows == 125
    assert not list((bus.data / "exports").glob(".*tmp*"))


def test_relative_paths_resolve_against_the_first_root(bus: Bus) -> None:
    bus.parquet("deep/x.parquet")
    bus.publish([bus.event("r", [{"name": "x", "path": "deep/../deep/x.parquet"}])])
    bus.drain()
    (path,) = bus.sql("SELECT path FROM catalog.artifacts_f")[0]
    assert Path(path) == (bus.artifacts / "deep" / "x.parquet").resolve()
