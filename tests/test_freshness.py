"""Export freshness is judged by what the catalog committed, not by the highest sequence
(docs/reference/exports.md, issue 11 item 5): a commit that leaves max(seq) as it was (a late lower
sequence, an event_id demotion) and a crash before the refresh still get exported."""

from __future__ import annotations

import signal
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from support import Bus, committed_batch, wait_for

from busd.catalog import Catalog
from busd.catalog.schema import DDL_V1, DDL_V2, MIGRATIONS
from busd.exports import Exporter
from busd.manifest import read_manifest

LATEST = {
    "name": "latest_fills",
    "depends_on": ["fills"],
    "sql": "SELECT run_id, x FROM data.fills",
}


def exported_runs(bus: Bus, name: str) -> list[str]:
    return sorted(
        set(pq.read_table(bus.data / "exports" / f"{name}.parquet").column("run_id").to_pylist())
    )


def exported_seq(bus: Bus, name: str) -> int:
    entry = read_manifest(bus.data / "exports").exports.get(name)
    return entry.catalog_seq if entry else 0


@pytest.mark.parametrize("case", ["late_lower_sequence", "event_id_demotion"])
def test_a_commit_below_the_highest_sequence_then_a_crash_is_exported(bus: Bus, case: str) -> None:
    late_file = bus.artifacts / "late" / "fills.parquet"  # written only after seq 2 commits
    late = bus.event("late", [{"name": "fills", "path": str(late_file)}], event_id="job:1")
    early = bus.event("early", event_id="job:1" if case == "event_id_demotion" else "job:2")
    cfg = bus.write_config(exports=[LATEST], verify={"file_wait_s": 30})
    seqs = bus.publish([late, early])
    assert seqs == [1, 2]
    # busd dies right after its second commit: seq 1's, once its file is there
    proc = bus.spawn(
        "serve",
        "--config",
        str(cfg),
        env={"BUSD_TEST_FAULT": "after_commit", "BUSD_TEST_FAULT_SKIP": "1"},
    )
    wait_for(lambda: exported_seq(bus, "latest_fills") == 2, 60, "seq 2 exported")
    bus.parquet("late/fills.parquet")
    assert proc.wait(90) == -signal.SIGKILL, bus.log()

    # committed, not exported: the highest sequence is still 2, the export's too
    assert bus.sql("SELECT seq FROM catalog.events_f WHERE run_id = 'late'") == [(1,)]
    assert bus.sql("SELECT max(seq) FROM catalog.events_f") == [(2,)]
    assert exported_runs(bus, "latest_fills") == ["early"]

    bus.drain(exports=[LATEST], verify={"file_wait_s": 30})
    wanted = ["late"] if case == "event_id_demotion" else ["early", "late"]
    assert exported_runs(bus, "latest_fills") == wanted
    assert exported_runs(bus, "runs") == wanted
    commits = bus.sql("SELECT value::INTEGER FROM catalog.meta WHERE key = 'commits'")[0][0]
    manifest = read_manifest(bus.data / "exports")
    assert {e.catalog_commit for e in manifest.exports.values()} == {commits}
    assert sorted(bus.sql("SELECT name, catalog_commit FROM catalog.exports_d")) == [
        ("artifacts", commits),
        ("latest_fills", commits),
        ("runs", commits),
    ]


def test_the_commit_count_moves_only_when_the_catalog_changes(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    try:
        start = catalog.commits()
        catalog.commit(committed_batch(1, "r1"))
        assert catalog.commits() == start + 1
        catalog.commit(committed_batch(1, "r1"))  # a redelivery: applied already
        assert catalog.commits() == start + 1
        catalog.record_exports([("runs", "runs.parquet", 1, 10, 1, None, 1.0, start + 1)])
        assert catalog.commits() == start + 1
        catalog.commit(committed_batch(2, "r2"))
        assert catalog.commits() == start + 2
    finally:
        catalog.close()


def test_a_version_2_catalog_migrates_and_its_exports_are_refreshed_once(tmp_path: Path) -> None:
    path = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(path))
    con.execute(DDL_V1)
    con.execute(DDL_V2)
    con.execute("INSERT INTO catalog.meta VALUES ('schema_version', '2')")
    con.execute(
        "INSERT INTO catalog.exports_d VALUES ('runs', 'runs.parquet', 1, 10, 5, now(), 1.0)"
    )
    con.execute("INSERT INTO catalog.events_f (seq, outcome) VALUES (5, 'committed')")
    folder = tmp_path / "exports"
    folder.mkdir()
    con.execute(f"COPY (SELECT * FROM catalog.runs_d) TO '{folder / 'runs.parquet'}'")
    con.close()
    # a manifest an older busd wrote: no commit count, at the catalog's highest sequence
    (folder / "_manifest.json").write_text(
        '{"catalog_seq": 5, "exports": {"runs": {"file": "runs.parquet", "rows": 0, '
        '"bytes": 1, "catalog_seq": 5, "refreshed_at": "2026-11-30T00:00:00Z"}}}'
    )
    catalog = Catalog(path)
    try:
        assert catalog.schema_version() == max(MIGRATIONS)
        assert catalog.commits() == 1
        assert catalog.con.execute(
            "SELECT name, catalog_seq, catalog_commit FROM catalog.exports_d"
        ).fetchall() == [("runs", 5, None)]
        exporter = Exporter(catalog.cursor(), folder, ())
        # runs is at the highest sequence with its table's columns: stale by commit count
        assert exporter.stale(5) == ["runs", "artifacts"]
        exporter.refresh(["runs", "artifacts"])
        assert exporter.stale(5) == []
        assert read_manifest(folder).exports["runs"].catalog_commit == 1
    finally:
        catalog.close()
    again = Catalog(path)
    try:
        assert again.migrate() == max(MIGRATIONS) and again.commits() == 1  # idempotent
    finally:
        again.close()
