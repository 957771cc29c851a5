"""What the exports look like on disk (docs/reference/exports.md): ``_manifest.json``, the
file or folder of part files of each export, and the ``exports_d`` rows of a refresh."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from busd.sql import quote_ident, sql_str

MANIFEST = "_manifest.json"
PART_GLOB = "part-*.parquet"


@dataclass(frozen=True, slots=True)
class ExportResult:
    name: str
    path: str
    rows: int
    bytes: int
    catalog_seq: int
    refreshed_at: dt.datetime
    duration_s: float
    parts: int = 0  # part files rewritten (partitioned exports)
    catalog_commit: int = 0  # the catalog's commit count in the snapshot it was written from
    partition_seqs: int = 0  # sequences per part file (0: one file)
    catalog_id: str = ""  # the catalog it was written from


class ManifestEntry(msgspec.Struct):
    file: str  # "<name>.parquet", or "<name>/" for a folder of part files
    rows: int
    bytes: int
    catalog_seq: int
    refreshed_at: dt.datetime
    duration_ms: float = 0.0
    # what freshness is judged by: written by a busd before it, 0, which is always stale
    catalog_commit: int = 0
    partition_seqs: int = 0
    parts_written: int = 0
    catalog_id: str = ""


class MissingFiles(msgspec.Struct):
    """Committed artifacts whose file is gone or unreadable, as last checked."""

    count: int = 0
    paths: list[str] = msgspec.field(default_factory=list)  # the first few, sorted
    checked_at: dt.datetime | None = None


class Manifest(msgspec.Struct):
    catalog_seq: int = 0
    written_at: dt.datetime | None = None
    exports: dict[str, ManifestEntry] = msgspec.field(default_factory=dict)
    artifacts_missing: MissingFiles = msgspec.field(default_factory=MissingFiles)


def read_manifest(folder: Path) -> Manifest:
    try:
        return msgspec.json.decode((folder / MANIFEST).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return Manifest()


def reader_sql(folder: Path, name: str) -> str | None:
    """``read_parquet(...)`` of one export as it lies in ``folder`` (a file, or a folder of
    part files); None when it is not there."""
    parts = folder / name
    if any(parts.glob(PART_GLOB)):
        return f"read_parquet({sql_str(str(parts / PART_GLOB))})"
    single = folder / f"{name}.parquet"
    return f"read_parquet({sql_str(single)})" if single.exists() else None


def exports_reader(folder: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per export in ``folder`` (named after it)
    that can read nothing else: what ``busd query`` answers with."""
    con = duckdb.connect(":memory:")
    for name in export_names(folder):
        con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT * FROM {reader_sql(folder, name)}")
    con.execute(f"SET allowed_directories = [{sql_str(str(folder) + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def export_names(folder: Path) -> list[str]:
    """Exports present in ``folder``, by name."""
    names = {f.stem for f in folder.glob("*.parquet")}
    if folder.is_dir():
        names |= {d.name for d in folder.iterdir() if d.is_dir() and any(d.glob(PART_GLOB))}
    return sorted(names)


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(manifest), indent=2)


def manifest_rows(results: Sequence[ExportResult]) -> list[tuple[Any, ...]]:
    """``exports_d`` rows, in its column order."""
    return [
        (
            r.name,
            r.path,
            r.rows,
            r.bytes,
            r.catalog_seq,
            r.refreshed_at,
            round(r.duration_s * 1000, 3),
            r.catalog_commit,
        )
        for r in results
    ]
