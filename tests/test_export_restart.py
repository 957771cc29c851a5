"""The first refresh after a start rewrites only the part files holding rows that changed
while no busd exported them (``export_partition_seqs``; busd/exports/parts.py): each
``runs_d`` and ``artifacts_f`` row records the commit that last changed it. Parts whose files
are missing or damaged are rewritten too; a new span, a new catalog or rows that moved make
it rewrite every part."""

from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.parquet as pq
from support import Bus, committed_batch

from busd.catalog import Catalog
from busd.exports import Exporter
from busd.manifest import read_manifest
from busd.model import Changed

SPAN = 1000
BOTH = ["runs", "artifacts"]


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Each part file's inode and mtime: a rewritten part has another."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.glob("part-*"))}


def rewritten(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> set[str]:
    return {name for name, stamp in after.items() if before.get(name) != stamp}


def exported_rows(folder: Path) -> list[tuple[object, ...]]:
    table = pq.read_table(folder / "artifacts")
    return sorted(
        zip(*(table.column(c).to_pylist() for c in ("run_id", "seq", "version")), strict=True)
    )


def catalog_rows(catalog: Catalog) -> list[tuple[object, ...]]:
    return sorted(
        catalog.con.execute("SELECT run_id, seq, version FROM catalog.artifacts_f").fetchall()
    )


def start(catalog: Catalog, folder: Path, span: int = SPAN) -> Exporter:
    """What ``busd serve`` does at start: the exports older than the catalog, refreshed."""
    exporter = Exporter(catalog.cursor(), folder, (), partition_seqs=span)
    stale = exporter.stale(catalog.catalog_seq())
    if stale:
        exporter.refresh(stale)
    return exporter


def test_a_restart_after_commits_of_a_killed_busd_rewrites_only_their_parts(bus: Bus) -> None:
    exports = bus.data / "exports"
    junk = [b"{not json"] * (SPAN - 1)  # rejected: sequences with no rows, cheap to settle
    bus.publish([bus.event("a"), *junk, bus.event("b"), *junk, bus.event("c")], js=False)
    bus.drain(export_partition_seqs=SPAN)  # runs a, b, c in parts 0, 1 and 2
    parts = exports / "artifacts"
    before = {name: stamps(exports / name) for name in BOTH}
    assert sorted(before["artifacts"]) == [f"part-0000000{p}.parquet" for p in range(3)]

    # a new version of b (part 1) and a new run d (part 2): committed, and busd is killed
    # before it refreshes the exports
    again = bus.event(
        "b", [{"name": "fills", "path": str(bus.parquet("b/fills.parquet")), "meta": {"v": 2}}]
    )
    bus.publish([again, bus.event("d")])
    cfg = bus.write_config(export_partition_seqs=SPAN)
    proc = bus.spawn("serve", "--config", str(cfg), env={"BUSD_TEST_FAULT": "after_commit"})
    assert proc.wait(90) == -signal.SIGKILL, bus.log()
    assert bus.sql("SELECT count(*) FROM catalog.artifacts_f") == [(4,)]
    assert pq.read_table(parts).num_rows == 3  # not exported

    bus.drain(export_partition_seqs=SPAN)
    for name in BOTH:
        assert rewritten(before[name], stamps(exports / name)) == {
            "part-00000001.parquet",
            "part-00000002.parquet",
        }, name
    rows = bus.sql("SELECT run_id, seq, version FROM catalog.artifacts_f ORDER BY ALL")
    assert exported_rows(exports) == rows
    assert [r[0] for r in rows] == ["a", "b", "c", "d"] and rows[1][2] == 2
    assert sorted(pq.read_table(exports / "runs").column("run_id").to_pylist()) == list("abcd")
    commits = bus.sql("SELECT value::INTEGER FROM catalog.meta WHERE key = 'commits'")[0][0]
    entry = read_manifest(exports).exports["artifacts"]
    assert (entry.catalog_commit, entry.partition_seqs, entry.rows) == (commits, SPAN, 4)


def test_missing_and_damaged_part_files_are_rewritten_at_start(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    folder = tmp_path / "exports"
    try:
        for seq, run in ((5, "a"), (1500, "b"), (2500, "c"), (3500, "d")):
            catalog.commit(committed_batch(seq, run))
        start(catalog, folder).refresh(BOTH, Changed())
        parts = folder / "artifacts"
        (parts / "part-00000001.parquet").unlink()
        damaged = parts / "part-00000002.parquet"
        damaged.write_bytes(damaged.read_bytes()[:-100])  # its footer cut
        (parts / "part-00000009.parquet").write_bytes(b"a part no row belongs to")
        before = stamps(parts)
        runs_before = stamps(folder / "runs")

        exporter = Exporter(catalog.cursor(), folder, (), partition_seqs=SPAN)
        assert exporter.stale(catalog.catalog_seq()) == ["artifacts"]  # nothing committed since
        exporter.refresh(["artifacts"])
        after = stamps(parts)
        assert sorted(after) == [f"part-0000000{p}.parquet" for p in range(4)]
        assert rewritten(before, after) == {"part-00000001.parquet", "part-00000002.parquet"}
        assert stamps(folder / "runs") == runs_before
        assert exported_rows(folder) == catalog_rows(catalog)
        assert read_manifest(folder).exports["artifacts"].parts_written == 2
        assert Exporter(catalog.cursor(), folder, (), partition_seqs=SPAN).stale() == []
    finally:
        catalog.close()


def test_a_new_span_a_new_catalog_or_moved_rows_rewrite_every_part(tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    path = tmp_path / "c.duckdb"
    catalog = Catalog(path)
    try:
        for seq, run in ((5, "a"), (1500, "b"), (2500, "c")):
            catalog.commit(committed_batch(seq, run))
        start(catalog, folder)
        parts = folder / "artifacts"

        # while busd is down, seq 900 of run c commits late: c moves from part 2 to part 0
        before = stamps(parts)
        assert catalog.commit(committed_batch(900, "c")).artifacts is None
        start(catalog, folder)
        after = stamps(parts)  # part 2 holds no row now: gone
        assert sorted(after) == ["part-00000000.parquet", "part-00000001.parquet"]
        assert rewritten(before, after) == set(after)
        assert exported_rows(folder) == catalog_rows(catalog)

        before = stamps(parts)  # the same catalog, exported with another span
        start(catalog, folder, span=2000)
        assert sorted(stamps(parts)) == ["part-00000000.parquet"]  # a, c (900) and b (1500)
        assert exported_rows(folder) == catalog_rows(catalog)
    finally:
        catalog.close()

    # a replay makes a new catalog, whose commit counter starts again
    path.unlink()
    catalog = Catalog(path)
    try:
        catalog.commit(committed_batch(2500, "z"))
        before = stamps(parts)
        start(catalog, folder, span=2000)
        assert sorted(stamps(parts)) == ["part-00000001.parquet"]
        assert exported_rows(folder) == catalog_rows(catalog)
    finally:
        catalog.close()
