"""``busd orphans``: what the catalog does not know, and what it knows that is gone.

Orphans are Parquet files under the artifact roots that no committed artifact names, grouped
by folder: the folders show which producers still write without publishing. Committed
artifacts are read from the artifacts export, never from the catalog file, so this runs next
to ``busd serve`` and as any user who can read the exports; a file committed since the last
refresh shows as an orphan until the export catches up (``catalog_seq`` says how far it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from busd.config import Settings
from busd.errors import BusdError
from busd.exports.files import file_problem
from busd.manifest import read_manifest, reader_sql
from busd.migrate import parquet_files, scan_roots


@dataclasses.dataclass
class Gone:
    run_id: str
    name: str
    path: str
    problem: str


@dataclasses.dataclass
class OrphanReport:
    catalog_seq: int
    export_found: bool
    committed: int
    scanned: int
    orphans: dict[str, list[str]]  # folder -> files in it
    gone: list[Gone]

    @property
    def orphan_count(self) -> int:
        return sum(len(files) for files in self.orphans.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "catalog_seq": self.catalog_seq,
            "artifacts_export": self.export_found,
            "committed_artifacts": self.committed,
            "files_scanned": self.scanned,
            "orphans": {
                "count": self.orphan_count,
                "folders": [
                    {"folder": folder, "count": len(files), "files": files}
                    for folder, files in sorted(self.orphans.items())
                ],
            },
            "gone": {
                "count": len(self.gone),
                "artifacts": [dataclasses.asdict(g) for g in self.gone],
            },
        }


def committed_artifacts(s: Settings) -> tuple[bool, list[tuple[str, str, str]]]:
    """(run_id, name, path) of every committed artifact, from the artifacts export."""
    source = reader_sql(s.exports_path, "artifacts")
    if source is None:
        return False, []
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute(f"SELECT run_id, name, path FROM {source} ORDER BY ALL").fetchall()
    except duckdb.Error as exc:
        raise BusdError(
            f"cannot read the artifacts export in {s.exports_path}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        con.close()
    return True, [(str(r), str(n), str(p)) for r, n, p in rows]


def find(s: Settings, folders: Sequence[Path] | None = None) -> OrphanReport:
    found, rows = committed_artifacts(s)
    named = {path for _, _, path in rows}
    orphans: dict[str, list[str]] = {}
    scanned = 0
    for found_path in parquet_files(scan_roots(s, folders), s):
        scanned += 1
        if str(found_path) not in named:
            orphans.setdefault(str(found_path.parent), []).append(str(found_path))
    gone = []
    for run_id, name, path in rows:
        problem = file_problem(path, deep=False)
        if problem is not None:
            gone.append(Gone(run_id, name, path, problem))
    return OrphanReport(
        read_manifest(s.exports_path).catalog_seq, found, len(rows), scanned, orphans, gone
    )
