"""Partitioned exports (``export_partition_seqs``): which part files a refresh rewrites.

``runs`` and ``artifacts`` are then folders of part files, one per ``span`` stream sequences
of each row's first commit (``first_seq``; part 0 also holds rows without one). Every
``runs_d`` and ``artifacts_f`` row records the catalog commit that last changed it
(``changed_commit``) and the manifest the commit each export reflects, so a refresh rewrites
the parts holding rows changed since: after a batch, and after a start whatever was committed
while no busd exported it (a crash between a commit and its refresh, a standby's commits).

Every part is rewritten when the files cannot be trusted: no manifest entry, another span,
another catalog (a replay makes a new one), a catalog behind the export (a restored copy), or
a commit since that moved rows between parts or removed some (``moved_commit``: a late lower
sequence, a demotion). The first refresh of an exporter also holds the files on disk against
the catalog: a part whose file is missing, unreadable, or has another number of rows is
rewritten, and a part file no row belongs to is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from busd.manifest import PART_GLOB, ManifestEntry
from busd.sql import STAMP

# the columns a partitioned or built-in export holds: the commit stamp stays in the catalog
EXPORTED = f"* EXCLUDE ({STAMP})"


def part_of(span: int) -> str:
    return f"coalesce(first_seq, 0) // {span}"


def part_file(folder: Path, part: int) -> Path:
    return folder / f"part-{part:08d}.parquet"


def part_number(path: Path) -> int | None:
    digits = path.stem[5:]
    return int(digits) if digits.isdigit() else None


def part_where(part: int, span: int) -> str:
    """A range on first_seq, so that DuckDB skips the row groups of other parts."""
    where = f"first_seq >= {part * span} AND first_seq < {(part + 1) * span}"
    return where + " OR first_seq IS NULL" if part == 0 else where


@dataclass
class Look:
    """What the part files on disk hold, held against the manifest and the catalog."""

    covered: int | None  # the catalog commit they reflect; None: rewrite every part
    repair: set[int] = field(default_factory=set)  # parts whose file is missing or wrong
    gone: list[Path] = field(default_factory=list)  # part files no row belongs to

    def clean(self) -> bool:
        return self.covered is not None and not self.repair and not self.gone


def look(
    cur: duckdb.DuckDBPyConnection,
    folder: Path,
    table: str,
    span: int,
    entry: ManifestEntry | None,
    catalog_id: str,
    commits: int,
) -> Look:
    """Reads the footer of every part file (row count, columns) and counts the catalog's
    rows per part (a scan of ``first_seq``)."""
    if (
        entry is None
        or entry.file != f"{folder.name}/"
        or entry.partition_seqs != span
        or entry.catalog_id != catalog_id
        or not 0 < entry.catalog_commit <= commits
    ):
        return Look(None)
    counts = {
        int(p): int(n)
        for p, n in cur.execute(
            f"SELECT {part_of(span)} AS part, count(*) FROM {table} GROUP BY part"
        ).fetchall()
    } or {0: 0}  # an empty catalog still has part 0, with the columns
    wanted = [r[0] for r in cur.execute(f"DESCRIBE SELECT {EXPORTED} FROM {table}").fetchall()]
    found = Look(entry.catalog_commit)
    on_disk: dict[int, Path] = {}
    for path in folder.glob(PART_GLOB):
        part = part_number(path)
        if part is None or part not in counts:
            found.gone.append(path)
        else:
            on_disk[part] = path
    for part, rows in counts.items():
        file = on_disk.get(part)
        try:
            meta = pq.read_metadata(file) if file is not None else None
        except (OSError, pa.ArrowException):
            meta = None
        if meta is None or meta.num_rows != rows:
            found.repair.add(part)
        elif meta.schema.to_arrow_schema().names != wanted:
            return Look(None)  # written before a migration: every part
    return found


def changed_since(cur: duckdb.DuckDBPyConnection, table: str, span: int, commit: int) -> set[int]:
    """Parts holding rows that commits after ``commit`` changed."""
    rows = cur.execute(
        f"SELECT DISTINCT {part_of(span)} FROM {table} WHERE {STAMP} > ?", [commit]
    ).fetchall()
    return {int(p) for (p,) in rows}


def every_part(cur: duckdb.DuckDBPyConnection, table: str, span: int) -> set[int]:
    rows = cur.execute(f"SELECT DISTINCT {part_of(span)} FROM {table}").fetchall()
    return {int(p) for (p,) in rows} or {0}
