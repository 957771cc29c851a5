"""Golden exports (contract §6): Parquet files readers use instead of the DuckDB file.

Each file is written to a temporary name in the same folder, fsynced, renamed over the old
one, and the folder fsynced: a reader sees the old file or the new one, never a partial one.
``_manifest.json`` is written last. A refresh runs on its own DuckDB cursor inside one
read transaction, so it sees one snapshot of the catalog while the writer keeps committing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from busd import faults
from busd.catalog import Changed, first_row, sql_str
from busd.config import ExportSettings, Settings
from busd.errors import ConfigError, FatalStorageError, StorageError

MANIFEST = "_manifest.json"
# In no particular order: sorting a million artifacts took a third of a refresh.
BUILTIN: tuple[ExportSettings, ...] = (
    ExportSettings(name="runs", sql="SELECT * FROM catalog.runs_d"),
    ExportSettings(name="artifacts", sql="SELECT * FROM catalog.artifacts_f"),
)


# With ``export_partition_seqs`` set: these exports are folders of part files, a part per
# that many stream sequences of each row's first commit (``first_seq``).
PARTITIONABLE = {"runs": "catalog.runs_d", "artifacts": "catalog.artifacts_f"}
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


class ManifestEntry(msgspec.Struct):
    file: str  # "<name>.parquet", or "<name>/" for a folder of part files
    rows: int
    bytes: int
    catalog_seq: int
    refreshed_at: dt.datetime
    duration_ms: float = 0.0


class Manifest(msgspec.Struct):
    catalog_seq: int = 0
    written_at: dt.datetime | None = None
    exports: dict[str, ManifestEntry] = msgspec.field(default_factory=dict)


def fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)


def durable_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final``, fsync the folder. A failed fsync is fatal."""
    try:
        fsync_path(tmp)
    except OSError as exc:
        # After a failed fsync the page cache can no longer be trusted (fsyncgate): exit.
        raise FatalStorageError(f"fsync of {tmp} failed: {exc.strerror}") from exc
    try:
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot rename {tmp.name} to {final}: {exc.strerror}") from exc
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        raise FatalStorageError(f"fsync of {final.parent} failed: {exc.strerror}") from exc


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    durable_replace(tmp, path)


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


def export_names(folder: Path) -> list[str]:
    """Exports present in ``folder``, by name."""
    names = {f.stem for f in folder.glob("*.parquet")}
    if folder.is_dir():
        names |= {d.name for d in folder.iterdir() if d.is_dir() and any(d.glob(PART_GLOB))}
    return sorted(names)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def data_names(sql: str) -> set[str]:
    """Artifact names an export's SQL reads as ``data."<name>"`` or ``data.name``."""
    found = re.findall(r'\bdata\s*\.\s*(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_]*))', sql)
    return {(quoted.replace('""', '"') if quoted else bare) for quoted, bare in found}


class Exporter:
    """Refreshes exports from a cursor of the catalog's database (its own thread)."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, folder: Path,
                 configured: Sequence[ExportSettings], *, partition_seqs: int = 0) -> None:
        self.cur = cursor
        self.folder = folder
        self.partition_seqs = partition_seqs
        # a partitioned export is rewritten whole the first time: nothing says what changed
        # while no busd ran (or between its last refresh and a crash)
        self._whole_next = set(PARTITIONABLE) if partition_seqs else set()
        self.exports = {e.name: e for e in (*BUILTIN, *configured)}
        # an export without depends_on follows every data.* name its SQL reads
        self._inputs = {e.name: set(e.depends_on) or data_names(e.sql)
                        for e in self.exports.values()}
        folder.mkdir(parents=True, exist_ok=True)
        self.cur.execute("ATTACH IF NOT EXISTS ':memory:' AS data")
        self.remove_leftovers()

    @classmethod
    def of(cls, cursor: duckdb.DuckDBPyConnection, s: Settings) -> Exporter:
        """The exporter a configuration describes."""
        return cls(cursor, s.exports_path, s.exports, partition_seqs=s.export_partition_seqs)

    def remove_leftovers(self) -> None:
        """Temporary files of a refresh that was killed half-way are never read: remove them,
        and the files of the other layout (partitioned or not), which would be stale."""
        for leftover in [*self.folder.glob(".*.tmp-*"), *self.folder.glob("*/.*.tmp-*")]:
            leftover.unlink(missing_ok=True)
        for name in PARTITIONABLE:
            if self.partition_seqs:
                (self.folder / f"{name}.parquet").unlink(missing_ok=True)
            else:
                shutil.rmtree(self.folder / name, ignore_errors=True)

    def due(self, touched: Iterable[str]) -> list[str]:
        """Export names a batch touching these artifact names makes stale (built-ins always)."""
        names = set(touched)
        return [n for n, e in self.exports.items()
                if n in ("runs", "artifacts") or names & self._inputs[n]]

    def stale(self, catalog_seq: int) -> list[str]:
        """Exports older than the catalog, missing, or with other columns than their table
        (a catalog migration added one): refreshed at start, before any ack."""
        manifest = read_manifest(self.folder)
        out = []
        for name in self.exports:
            entry = manifest.exports.get(name)
            if (entry is None or entry.catalog_seq < catalog_seq
                    or not (self.folder / entry.file).exists()
                    or not self._same_columns(name)):
                out.append(name)
        return out

    def _same_columns(self, name: str) -> bool:
        """A built-in export has its table's columns (configured ones are not checked)."""
        table = PARTITIONABLE.get(name)
        source = reader_sql(self.folder, name)
        if table is None or source is None:
            return True
        try:
            exported = [r[0] for r in self.cur.execute(
                f"DESCRIBE SELECT * FROM {source}").fetchall()]
        except duckdb.Error:
            return False  # unreadable: rewrite it
        wanted = [r[0] for r in self.cur.execute(f"DESCRIBE SELECT * FROM {table}").fetchall()]
        return exported == wanted

    def check(self) -> None:
        """Bind every configured export's SQL once (LIMIT 0): a broken one is a config error.

        While a ``data.*`` input has no files yet its columns are unknown, so only the
        syntax of such an export can be checked."""
        for name, export in self.exports.items():
            empty = self._define_views(data_names(export.sql))
            try:
                if empty:
                    self.cur.extract_statements(export.sql)
                else:
                    self.cur.execute(f"SELECT * FROM ({export.sql}) LIMIT 0")
            except duckdb.Error as exc:
                first = str(exc).splitlines()[0]
                raise ConfigError(f"bad value for exports.{name}.sql: {first}") from None

    def _define_views(self, names: Iterable[str]) -> list[str]:
        """``data."<name>"``: the union by column name of the current files, plus run_id.
        Returns the names that have no files yet."""
        empty = []
        for name in names:
            files = self.cur.execute(
                "SELECT run_id, path FROM catalog.artifacts_f WHERE name = ? ORDER BY run_id",
                [name]).fetchall()
            view = f"data.main.{quote_ident(name)}"
            if not files:
                empty.append(name)
                self.cur.execute(f"CREATE OR REPLACE VIEW {view} AS "
                                 "SELECT NULL::VARCHAR AS run_id WHERE false")
                continue
            paths = ", ".join(sql_str(p) for _, p in files)
            mapping = ", ".join(f"({sql_str(p)}, {sql_str(r)})" for r, p in files)
            self.cur.execute(
                f"CREATE OR REPLACE VIEW {view} AS "
                f"SELECT f.* EXCLUDE (filename), m.run_id FROM read_parquet([{paths}], "
                f"union_by_name = true, filename = true) AS f "
                f"JOIN (VALUES {mapping}) AS m(path, run_id) ON f.filename = m.path")
        return empty

    def refresh(self, names: Sequence[str], changed: Changed | None = None
                ) -> tuple[list[ExportResult], int]:
        """Rewrite these exports from one snapshot; then the manifest. Returns (results, seq).

        ``changed``: what the transactions since the last refresh changed; a partitioned
        export then rewrites only the parts holding those rows (None: all of them)."""
        results: list[ExportResult] = []
        cur = self.cur
        try:
            cur.execute("BEGIN")
            row = first_row(cur, "SELECT coalesce(max(seq), 0) FROM catalog.events_f")
            catalog_seq = int(row[0]) if row else 0
            for name in names:
                if self.partition_seqs and name in PARTITIONABLE:
                    first_seqs = None if changed is None or name in self._whole_next \
                        else getattr(changed, name)
                    result: ExportResult | None = self._refresh_parts(
                        self.exports[name], PARTITIONABLE[name], catalog_seq, first_seqs)
                    self._whole_next.discard(name)
                else:
                    result = self._refresh_one(self.exports[name], catalog_seq)
                if result is not None:
                    results.append(result)
        except duckdb.Error as exc:
            raise StorageError(f"export refresh failed: {str(exc).splitlines()[0]}") from exc
        except FatalStorageError:
            raise
        except OSError as exc:
            raise StorageError(f"export refresh failed: {exc}") from exc
        finally:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
        self._write_manifest(results, catalog_seq)
        return results, catalog_seq

    def _refresh_one(self, export: ExportSettings, catalog_seq: int) -> ExportResult | None:
        """Rewrite one export; None while one of its ``data.*`` inputs has no files yet."""
        started = time.perf_counter()
        if self._define_views(data_names(export.sql)):
            return None
        final = self.folder / f"{export.name}.parquet"
        tmp = self.folder / f".{export.name}.parquet.tmp-{os.getpid()}"
        rows = self._copy(export.sql, tmp)
        size = tmp.stat().st_size
        faults.hit("during_export")
        durable_replace(tmp, final)
        faults.hit("after_rename")
        return ExportResult(export.name, final.name, rows, size, catalog_seq,
                            dt.datetime.now(dt.UTC), time.perf_counter() - started)

    def _refresh_parts(self, export: ExportSettings, table: str, catalog_seq: int,
                       first_seqs: set[int] | None) -> ExportResult:
        """Rewrite the part files of the rows with these ``first_seq`` (None: every part,
        and parts that no longer hold rows are removed)."""
        started = time.perf_counter()
        span = self.partition_seqs
        folder = self.folder / export.name
        folder.mkdir(exist_ok=True)
        part_of = f"coalesce(first_seq, 0) // {span}"
        if first_seqs is None:
            parts = {int(p) for (p,) in self.cur.execute(
                f"SELECT DISTINCT {part_of} FROM {table}").fetchall()} or {0}
        else:
            parts = {seq // span for seq in first_seqs}
        for part in sorted(parts):
            final = folder / f"part-{part:08d}.parquet"
            tmp = folder / f".{final.name}.tmp-{os.getpid()}"
            # a range on first_seq, so that DuckDB skips the row groups of other parts
            where = f"first_seq >= {part * span} AND first_seq < {(part + 1) * span}"
            if part == 0:
                where += " OR first_seq IS NULL"
            self._copy(f"SELECT * FROM {table} WHERE {where}", tmp)
            faults.hit("during_export")
            durable_replace(tmp, final)
            faults.hit("after_rename")
        if first_seqs is None:
            gone = [f for f in folder.glob(PART_GLOB)
                    if not f.stem[5:].isdigit() or int(f.stem[5:]) not in parts]
            for f in gone:
                f.unlink()
            if gone:
                fsync_dir(folder)
        row = first_row(self.cur, f"SELECT count(*) FROM {table}")
        size = sum(f.stat().st_size for f in folder.glob(PART_GLOB))
        return ExportResult(export.name, f"{export.name}/", int(row[0]) if row else 0, size,
                            catalog_seq, dt.datetime.now(dt.UTC),
                            time.perf_counter() - started, len(parts))

    def _copy(self, sql: str, tmp: Path) -> int:
        """``COPY (sql)`` to a Parquet file; the number of rows written."""
        try:
            row = first_row(self.cur,  # COPY answers with the number of rows written
                            f"COPY ({sql}) TO {sql_str(str(tmp))} "
                            "(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)")
        except duckdb.Error:
            tmp.unlink(missing_ok=True)
            raise
        return int(row[0]) if row else 0

    def _write_manifest(self, results: Sequence[ExportResult], catalog_seq: int) -> None:
        manifest = read_manifest(self.folder)
        for r in results:
            manifest.exports[r.name] = ManifestEntry(r.path, r.rows, r.bytes, r.catalog_seq,
                                                     r.refreshed_at, round(r.duration_s * 1000, 3))
        for gone in set(manifest.exports) - set(self.exports):
            del manifest.exports[gone]
        manifest.catalog_seq = min((e.catalog_seq for e in manifest.exports.values()),
                                   default=catalog_seq)
        manifest.written_at = dt.datetime.now(dt.UTC)
        data = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
        write_bytes_atomic(self.folder / MANIFEST, data)


def manifest_rows(results: Sequence[ExportResult]) -> list[tuple[Any, ...]]:
    return [(r.name, r.path, r.rows, r.bytes, r.catalog_seq, r.refreshed_at,
             round(r.duration_s * 1000, 3)) for r in results]
