"""``export_partition_seqs``: runs and artifacts exports as folders of part files, where a
refresh rewrites only the parts holding rows that changed."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from support import Bus, committed_batch, wait_for

from busd.catalog import Catalog
from busd.catalog.schema import DDL_V1, MIGRATIONS
from busd.exports import Exporter
from busd.manifest import read_manifest
from busd.model import Changed

SPAN = 1000


def inodes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_ino for f in sorted(folder.glob("part-*.parquet"))}


def exported_seq(bus: Bus) -> int:
    return read_manifest(bus.data / "exports").catalog_seq


def test_a_refresh_rewrites_only_the_parts_that_changed(bus: Bus) -> None:
    exports = bus.data / "exports"
    cfg = bus.write_config(export_partition_seqs=SPAN)
    first = bus.publish([bus.event(f"r{i}") for i in range(2100)])  # parts 0, 1 and 2
    proc = bus.spawn("serve", "--config", str(cfg))
    wait_for(lambda: exported_seq(bus) == first[-1], 90, "2,100 events exported")
    before = inodes(exports / "artifacts")
    assert sorted(before) == [f"part-0000000{p}.parquet" for p in range(3)]
    assert not (exports / "artifacts.parquet").exists()

    # new runs land in the newest part; a new version of r5 changes its row in part 0
    again = bus.event(
        "r5", [{"name": "fills", "path": str(bus.parquet("r5/fills.parquet")), "meta": {"take": 2}}]
    )
    later = bus.publish([bus.event("new-a"), bus.event("new-b"), again])
    wait_for(lambda: exported_seq(bus) == later[-1], 60, "3 more events exported")
    after = inodes(exports / "artifacts")
    assert after["part-00000001.parquet"] == before["part-00000001.parquet"]  # untouched
    assert after["part-00000000.parquet"] != before["part-00000000.parquet"]
    assert after["part-00000002.parquet"] != before["part-00000002.parquet"]

    table = pq.read_table(exports / "artifacts")
    assert table.num_rows == 2102
    r5 = [row for row in table.to_pylist() if row["run_id"] == "r5"]
    assert [(row["version"], row["seq"], row["first_seq"]) for row in r5] == [
        (2, later[-1], first[5])
    ]
    entry = read_manifest(exports).exports["artifacts"]
    assert (entry.file, entry.rows) == ("artifacts/", 2102)
    assert pq.read_table(exports / "runs").num_rows == 2102

    out = bus.cli(
        "query",
        "--config",
        str(cfg),
        "--json",
        "SELECT count(*) AS n FROM artifacts JOIN runs USING (run_id)",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"n": 2102}]
    verify = bus.cli("verify", "--config", str(cfg), timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "artifacts_f 0 differences" in verify.stdout
    proc.terminate()
    assert proc.wait(30) == 0

    # back to one file: the folder goes (it would be stale), the file comes back
    bus.drain()
    assert not (exports / "artifacts").exists()
    assert pq.read_table(exports / "artifacts.parquet").num_rows == 2102


def test_an_empty_catalog_still_has_one_part_with_the_columns(bus: Bus) -> None:
    bus.publish([b"{not json"])
    bus.drain(export_partition_seqs=SPAN)
    parts = list((bus.data / "exports" / "artifacts").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000000.parquet"]
    table = pq.read_table(parts[0])
    assert table.num_rows == 0 and "first_seq" in table.column_names


def test_a_version_1_catalog_gets_first_seq_from_its_log(tmp_path: Path) -> None:
    path = tmp_path / "v1.duckdb"  # a database named "catalog" would clash with the schema
    con = duckdb.connect(str(path))
    con.execute(DDL_V1)
    con.execute("INSERT INTO catalog.meta VALUES ('schema_version', '1')")
    for seq in (7, 3, 9):
        con.execute(
            "INSERT INTO catalog.artifact_log (run_id, name, seq) VALUES ('r', 'a', ?)", [seq]
        )
    con.execute(
        "INSERT INTO catalog.artifacts_f (run_id, name, seq, version) VALUES ('r', 'a', 9, 3)"
    )
    con.close()
    catalog = Catalog(path)
    try:
        assert catalog.schema_version() == max(MIGRATIONS)
        assert catalog.con.execute("SELECT seq, first_seq FROM catalog.artifacts_f").fetchall() == [
            (9, 3)
        ]
    finally:
        catalog.close()


def test_a_whole_refresh_drops_parts_whose_rows_are_gone(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    try:
        con = catalog.con
        for run, first in (("a", 5), ("b", 2500)):
            con.execute(
                "INSERT INTO catalog.runs_d (run_id, first_seq, last_seq) VALUES (?, ?, ?)",
                [run, first, first],
            )
            con.execute(
                "INSERT INTO catalog.artifacts_f (run_id, name, seq, version, "
                "first_seq) VALUES (?, 'f', ?, 1, ?)",
                [run, first, first],
            )
        folder = tmp_path / "exports"
        exporter = Exporter(catalog.cursor(), folder, (), partition_seqs=SPAN)
        exporter.refresh(["runs", "artifacts"], Changed())  # the first refresh is whole
        assert sorted(inodes(folder / "artifacts")) == [
            "part-00000000.parquet",
            "part-00000002.parquet",
        ]
        # run b is gone (a demotion can do that): what changed is unknown, all is rewritten
        con.execute("DELETE FROM catalog.artifacts_f WHERE run_id = 'b'")
        con.execute("DELETE FROM catalog.runs_d WHERE run_id = 'b'")
        exporter.refresh(["runs", "artifacts"], Changed(None, None))
        for name in ("runs", "artifacts"):
            assert sorted(inodes(folder / name)) == ["part-00000000.parquet"]
            assert pq.read_table(folder / name).column("run_id").to_pylist() == ["a"]
        # an incremental refresh rewrites only the part named
        before = inodes(folder / "artifacts")
        con.execute("UPDATE catalog.artifacts_f SET version = 2 WHERE run_id = 'a'")
        exporter.refresh(["runs", "artifacts"], Changed(set(), {5}))
        assert inodes(folder / "artifacts") != before
        assert pq.read_table(folder / "artifacts").column("version").to_pylist() == [2]
    finally:
        catalog.close()


def test_a_late_lower_sequence_moves_its_row_to_a_lower_part(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    try:
        folder = tmp_path / "exports"
        exporter = Exporter(catalog.cursor(), folder, (), partition_seqs=SPAN)
        exporter.refresh(["runs", "artifacts"], catalog.commit(committed_batch(1001, "r")))
        # seq 999 of the same run commits late (its file appeared late): r's first_seq
        # drops to 999, from part 1 to part 0, and part 1 must lose it
        changed = catalog.commit(committed_batch(999, "r"))
        assert changed.runs is None and changed.artifacts is None
        exporter.refresh(["runs", "artifacts"], changed)
        for name in ("runs", "artifacts"):
            table = pq.read_table(folder / name)
            assert table.column("run_id").to_pylist() == ["r"], name
            assert table.column("first_seq").to_pylist() == [999], name
        # later sequences are incremental again
        assert catalog.commit(committed_batch(1500, "s")).artifacts == {1500}
    finally:
        catalog.close()


def test_an_export_without_a_new_column_is_rewritten_at_start(bus: Bus) -> None:
    """After the v2 migration, artifacts.parquet lacks first_seq until refreshed: a start
    refreshes it before anything else, so readers and verify see the table's columns."""
    bus.publish([bus.event(f"m{i}") for i in range(3)])
    bus.drain()
    path = bus.data / "exports" / "artifacts.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["first_seq"]), path)  # as before v2
    bus.drain()  # nothing new in the stream
    assert "first_seq" in pq.read_table(path).column_names
