"""Golden exports (docs/reference/exports.md): Parquet files readers use, not the DuckDB file.

Each file is replaced durably (:mod:`busd.durable`), ``_manifest.json`` last. A refresh runs on
its own DuckDB cursor in one read transaction: one snapshot while the writer keeps committing.
The ``data."<name>"`` views leave out committed files that are gone or unreadable, which are
counted (at each refresh, and over every committed artifact now and then): a vanished file
never stops the bus (docs/reference/daemon.md). A file the machine fails to read now (EIO, a
read that hangs) is left out too, but the exports reading it are written as stale
(``catalog_commit`` 0) and refreshed again once it reads (:mod:`busd.exports.files`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb

from busd import faults, log
from busd.config import ExportSettings, Settings
from busd.durable import durable_replace, fsync_dir, readable_dir, write_bytes_atomic
from busd.errors import ConfigError, FatalStorageError, StorageError
from busd.exports import parts as pt
from busd.exports.files import ArtifactFiles
from busd.manifest import (
    MANIFEST,
    PART_GLOB,
    ExportResult,
    ManifestEntry,
    encode_manifest,
    read_manifest,
    reader_sql,
)
from busd.model import Changed
from busd.sql import (
    ID_KEY,
    MOVED_KEY,
    commit_count,
    first_row,
    meta_value,
    quote_ident,
    set_memory_limit,
    sql_str,
    stretched,
)

# In no particular order: sorting a million artifacts took a third of a refresh.
BUILTIN: tuple[ExportSettings, ...] = (
    ExportSettings(name="runs", sql=f"SELECT {pt.EXPORTED} FROM catalog.runs_d"),
    ExportSettings(name="artifacts", sql=f"SELECT {pt.EXPORTED} FROM catalog.artifacts_f"),
)

# With ``export_partition_seqs`` set: these exports are folders of part files, a part per
# that many stream sequences of each row's first commit (``first_seq``).
PARTITIONABLE = {"runs": "catalog.runs_d", "artifacts": "catalog.artifacts_f"}

# in data."<name>", busd's run_id keeps its name; a file's own run_id column gets this one
FILE_RUN_ID = "file_run_id"
_FILE_COL = "_busd_file"  # read_parquet's filename column: no artifact names a column so
_PASSES = 5  # a refresh that fails on a damaged file is retried without it this many times


class _DamagedFile(Exception):
    """A refresh failed on a file that passed the cheap checks; it is left out next pass."""


def data_names(sql: str) -> set[str]:
    """Artifact names an export's SQL reads as ``data."<name>"`` or ``data.name``."""
    found = re.findall(r'\bdata\s*\.\s*(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_]*))', sql)
    return {(quoted.replace('""', '"') if quoted else bare) for quoted, bare in found}


class Exporter:
    """Refreshes exports from a cursor of the catalog's database (its own thread)."""

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        folder: Path,
        configured: Sequence[ExportSettings],
        *,
        partition_seqs: int = 0,
        check_timeout_s: float = 30.0,
        file_wait_s: float = 60.0,
        hold_s: float = 0.0,
        memory_limit_mb: int = 0,
    ) -> None:
        """``check_timeout_s`` bounds each look at an artifact's file; a file the machine
        fails to read is reported after ``file_wait_s``, and a new one is named in
        ``files.holding`` for ``hold_s`` (the daemon's acks wait for it that long).
        ``memory_limit_mb``: the catalog's (DuckDB's, shared), stretched for a refresh
        that does not fit it."""
        self.cur = cursor
        self.memory_limit_mb = memory_limit_mb
        self.folder = folder
        self.partition_seqs = partition_seqs
        # a partitioned export's parts reflect this catalog commit once this exporter has
        # refreshed it; before, its files on disk are looked at (busd.exports.parts)
        self._covered: dict[str, int] = {}
        self._looks: dict[str, pt.Look] = {}  # looked at by stale(), for the next refresh
        self.exports = {e.name: e for e in (*BUILTIN, *configured)}
        # an export without depends_on follows every data.* name its SQL reads
        self._inputs = {
            e.name: set(e.depends_on) or data_names(e.sql) for e in self.exports.values()
        }
        # names some export reads as data.*: their files get the deep check in a sweep too
        self.files = ArtifactFiles(
            cursor,
            folder,
            {n for e in configured for n in data_names(e.sql)},
            timeout_s=check_timeout_s,
            report_after_s=file_wait_s,
            hold_s=hold_s,
        )
        folder.mkdir(parents=True, exist_ok=True)
        readable_dir(folder)
        self.cur.execute("ATTACH IF NOT EXISTS ':memory:' AS data")
        # query_progress() then tells, from another thread, that a long refresh advances
        self.cur.execute(
            "SET enable_progress_bar = true; SET enable_progress_bar_print = false;"
            " SET progress_bar_time = 0"
        )
        self.files_written = 0  # export and part files replaced, ever
        self.refreshing_since: float | None = None  # monotonic start of the refresh under way
        self.remove_leftovers()

    @classmethod
    def of(cls, cursor: duckdb.DuckDBPyConnection, s: Settings) -> Exporter:
        """The exporter a configuration describes. Acks wait for a new file the machine
        fails to read for ``verify.file_wait_s``, at most half of ``consumer.stall_s``."""
        return cls(
            cursor,
            s.exports_path,
            s.exports,
            partition_seqs=s.export_partition_seqs,
            check_timeout_s=s.verify.check_timeout_s,
            file_wait_s=s.verify.file_wait_s,
            hold_s=min(s.verify.file_wait_s, s.consumer.stall_s / 2),
            memory_limit_mb=s.catalog.memory_limit_mb,
        )

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

    def progress(self) -> tuple[int, float]:
        """What a refresh under way has done so far: files replaced and how far the query
        running now is; called from another thread, it changes while a refresh advances."""
        try:
            query = self.cur.query_progress()
        except duckdb.Error:
            query = -1.0
        return self.files_written, query

    def due(self, touched: Iterable[str]) -> list[str]:
        """Export names a batch touching these artifact names makes stale (built-ins always)."""
        names = set(touched)
        return [
            n
            for n, e in self.exports.items()
            if n in ("runs", "artifacts") or names & self._inputs[n]
        ]

    def stale(self, catalog_seq: int = 0) -> list[str]:
        """Exports older than the catalog, missing, or with other columns than their table
        (a catalog migration added one): refreshed at start, before any ack.

        "Older" is by the catalog's commit count, not by the highest sequence: a late lower
        sequence or an event_id demotion changes the catalog and leaves max(seq) as it was.
        """
        manifest = read_manifest(self.folder)
        commits = commit_count(self.cur)
        catalog_id = meta_value(self.cur, ID_KEY) or ""
        out = []
        for name in self.exports:
            entry = manifest.exports.get(name)
            if (
                entry is None
                or entry.catalog_commit < commits
                or entry.catalog_seq < catalog_seq
                or entry.catalog_id not in ("", catalog_id)
                or not (self.folder / entry.file).exists()
                or not self._same_columns(name)
                or not self._parts_clean(name, entry, catalog_id, commits)
            ):
                out.append(name)
            else:
                self._seed(name)
        return out

    def _parts_clean(self, name: str, entry: ManifestEntry, catalog_id: str, commits: int) -> bool:
        """A partitioned export's part files are all there, whole, written with this span:
        what they lack is rewritten by the next refresh (looked at once, unless this
        exporter wrote them: a standby that takes over)."""
        if not self.partition_seqs or name not in PARTITIONABLE or name in self._covered:
            return True
        found = pt.look(
            self.cur,
            self.folder / name,
            PARTITIONABLE[name],
            self.partition_seqs,
            entry,
            catalog_id,
            commits,
        )
        self._looks[name] = found
        return found.clean()

    def _seed(self, name: str) -> None:
        """A fresh export holds every file of its ``data.*`` inputs committed now: none of
        them is new to it (acks wait only for new files, see ``ArtifactFiles.split``)."""
        for input_name in data_names(self.exports[name].sql):
            rows = self.cur.execute(
                "SELECT seq FROM catalog.artifacts_f WHERE name = ?", [input_name]
            ).fetchall()
            self.files.seed(name, input_name, (int(s) for (s,) in rows))

    def _same_columns(self, name: str) -> bool:
        """A built-in export has its table's columns (configured ones are not checked)."""
        table = PARTITIONABLE.get(name)
        source = reader_sql(self.folder, name)
        if table is None or source is None:
            return True
        try:
            exported = [
                r[0] for r in self.cur.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
            ]
        except duckdb.Error:
            return False  # unreadable: rewrite it
        wanted = [
            r[0] for r in self.cur.execute(f"DESCRIBE SELECT {pt.EXPORTED} FROM {table}").fetchall()
        ]
        return exported == wanted

    def check(self) -> None:
        """Bind every configured export's SQL once (LIMIT 0): a broken one is a config error.

        While a ``data.*`` input has no files yet its columns are unknown, so only the
        syntax of such an export can be checked."""
        self.files.begin()
        try:
            for name, export in self.exports.items():
                self._check_one(name, export)
        finally:
            self.files.end()

    def _check_one(self, name: str, export: ExportSettings) -> None:
        inputs = data_names(export.sql)
        for left in range(_PASSES - 1, -1, -1):
            try:
                if self._define_views(inputs)[0]:
                    self.cur.extract_statements(export.sql)
                else:
                    self.cur.execute(f"SELECT * FROM ({export.sql}) LIMIT 0")
                return
            except duckdb.Error as exc:
                # a damaged artifact file is no fault of the configuration
                if left and inputs and self.files.blame(inputs, str(exc), None):
                    continue
                first = str(exc).splitlines()[0]
                raise ConfigError(f"bad value for exports.{name}.sql: {first}") from None

    def _define_views(
        self, names: Iterable[str], export: str | None = None, baseline: int = 0
    ) -> tuple[list[str], bool]:
        """``data."<name>"``: the union by column name of the current files that can be
        read, plus busd's run_id (a file's own run_id column becomes ``file_run_id``).
        Returns the names that have no readable files (yet), and whether a file was left out
        because the machine failed to read it now (what reads the views is incomplete).
        ``export``: the export being refreshed (None: a check), ``baseline`` the sequence
        its manifest covers (see ``ArtifactFiles.split``)."""
        empty = []
        incomplete = False
        for name in names:
            files = self.cur.execute(
                "SELECT run_id, path, seq, coalesce(list_contains(json_extract_string("
                "columns, '$[*].name'), 'run_id'), false) FROM catalog.artifacts_f "
                "WHERE name = ? ORDER BY run_id",
                [name],
            ).fetchall()
            good, left_out = self.files.split(name, [f[:3] for f in files], export, baseline)
            incomplete = incomplete or left_out
            readable = {p for _, p in good}
            own_run_id = any(has and p in readable for _, p, _, has in files)
            view = f"data.main.{quote_ident(name)}"
            if not good:
                empty.append(name)
                self.cur.execute(
                    f"CREATE OR REPLACE VIEW {view} AS SELECT NULL::VARCHAR AS run_id WHERE false"
                )
                continue
            paths = ", ".join(sql_str(p) for _, p in good)
            mapping = ", ".join(f"({sql_str(p)}, {sql_str(r)})" for r, p in good)
            own = f", run_id AS {FILE_RUN_ID}" if own_run_id else ""
            self.cur.execute(
                f"CREATE OR REPLACE VIEW {view} AS "
                f"SELECT f.* EXCLUDE ({_FILE_COL}), m.run_id FROM ("
                f"SELECT COLUMNS(lambda c: c <> 'run_id'){own} FROM read_parquet([{paths}], "
                f"union_by_name = true, filename = {sql_str(_FILE_COL)})) AS f "
                f"JOIN (VALUES {mapping}) AS m(path, run_id) ON f.{_FILE_COL} = m.path"
            )
        return empty, incomplete

    def refresh(
        self, names: Sequence[str], changed: Changed | None = None
    ) -> tuple[list[ExportResult], int]:
        """Rewrite these exports from one snapshot; then the manifest. Returns (results, seq).

        ``changed``: what the transactions since the last refresh changed; a partitioned
        export rewrites the parts holding those rows and the parts the catalog says changed
        since its last refresh (a field None: every part). ``changed`` None: nothing known,
        the part files on disk are looked at again (:mod:`busd.exports.parts`)."""
        self.refreshing_since = time.monotonic()
        limits, raised = stretched(self.memory_limit_mb), False
        try:
            if self.files.sweep_due(inline=True):
                self.files.sweep()
            self.files.begin()
            while True:
                try:
                    return self._passes(names, changed)
                except StorageError as exc:
                    # rows too wide for the cap (4,000 artifacts of 2,000-column schemas:
                    # one 256 MiB allocation at 128 MiB, every time, and acks waited for
                    # good): this refresh alone runs with it doubled, up to STRETCH times
                    limit = next(limits, None) if "out of memory" in str(exc).lower() else None
                    if limit is None:
                        raise
                    log.get().warning(
                        "an export refresh did not fit the catalog's memory limit; "
                        "refreshing with the limit raised for it alone",
                        limit_mb=limit,
                        error=str(exc),
                    )
                    set_memory_limit(self.cur, limit)
                    raised = True
        finally:
            if raised:
                with contextlib.suppress(duckdb.Error):
                    set_memory_limit(self.cur, self.memory_limit_mb)
            self.files.end()
            self.refreshing_since = None

    def _passes(
        self, names: Sequence[str], changed: Changed | None
    ) -> tuple[list[ExportResult], int]:
        for left in range(_PASSES - 1, -1, -1):
            try:
                done = self._refresh_pass(names, changed)
                self.files.listed()  # what it listed is no longer new to its exports
                return done
            except _DamagedFile as exc:
                if not left:  # the export loop retries; what was found stays left out
                    raise StorageError(f"export refresh failed: {exc}") from None
        raise AssertionError("unreachable")

    def _refresh_pass(
        self, names: Sequence[str], changed: Changed | None
    ) -> tuple[list[ExportResult], int]:
        results: list[ExportResult] = []
        cur = self.cur
        covered = {n: e.catalog_seq for n, e in read_manifest(self.folder).exports.items()}
        try:
            cur.execute("BEGIN")
            row = first_row(cur, "SELECT coalesce(max(seq), 0) FROM catalog.events_f")
            catalog_seq = int(row[0]) if row else 0
            commits = commit_count(cur)
            catalog_id = meta_value(cur, ID_KEY) or ""
            for name in names:
                if self.partition_seqs and name in PARTITIONABLE:
                    if changed is None:
                        self._covered.pop(name, None)
                    result: ExportResult | None = self._refresh_parts(
                        self.exports[name],
                        PARTITIONABLE[name],
                        catalog_seq,
                        set() if changed is None else getattr(changed, name),
                        commits,
                        catalog_id,
                    )
                else:
                    result = self._refresh_one(
                        self.exports[name], catalog_seq, commits, covered.get(name, 0)
                    )
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
        self._write_manifest(results, catalog_seq, catalog_id)
        return results, catalog_seq

    def _refresh_one(
        self, export: ExportSettings, catalog_seq: int, commits: int, covered: int
    ) -> ExportResult | None:
        """Rewrite one export; None while one of its ``data.*`` inputs has no files yet.
        Written without a file the machine failed to read, it is recorded as stale
        (``catalog_commit`` 0): refreshed again, at the latest by the next busd to start."""
        started = time.perf_counter()
        inputs = data_names(export.sql)
        final = self.folder / f"{export.name}.parquet"
        tmp = self.folder / f".{export.name}.parquet.tmp-{os.getpid()}"
        try:
            empty, incomplete = self._define_views(inputs, export.name, covered)
            if empty:  # a view reads the files' footers already
                return None
            rows = self._copy(export.sql, tmp)
        except duckdb.Error as exc:
            if inputs and self.files.blame(inputs, str(exc), tmp):
                raise _DamagedFile(str(exc).splitlines()[0]) from None
            raise
        size = tmp.stat().st_size
        faults.hit("during_export")
        durable_replace(tmp, final)
        self.files_written += 1
        faults.hit("after_rename")
        return ExportResult(
            export.name,
            final.name,
            rows,
            size,
            catalog_seq,
            dt.datetime.now(dt.UTC),
            time.perf_counter() - started,
            catalog_commit=0 if incomplete else commits,
        )

    def _refresh_parts(
        self,
        export: ExportSettings,
        table: str,
        catalog_seq: int,
        first_seqs: set[int] | None,
        commits: int,
        catalog_id: str,
    ) -> ExportResult:
        """Rewrite the part files of the rows with these ``first_seq`` and of the rows
        changed since the last refresh (None: every part, and parts that no longer hold rows
        are removed)."""
        started = time.perf_counter()
        span, cur = self.partition_seqs, self.cur
        folder = self.folder / export.name
        folder.mkdir(exist_ok=True)
        readable_dir(folder)
        covered = self._covered.get(export.name)
        found = pt.Look(covered)
        if covered is None:  # the first refresh: what do the files on disk hold?
            entry = read_manifest(self.folder).exports.get(export.name)
            found = (
                self._looks.pop(export.name)
                if export.name in self._looks
                else pt.look(cur, folder, table, span, entry, catalog_id, commits)
            )
        moved = int(meta_value(cur, MOVED_KEY) or 0)
        whole = first_seqs is None or found.covered is None or moved > found.covered
        if whole:
            parts = pt.every_part(cur, table, span)
        else:
            assert first_seqs is not None and found.covered is not None
            parts = {seq // span for seq in first_seqs} | found.repair
            parts |= pt.changed_since(cur, table, span, found.covered)
        for part in sorted(parts):
            final = pt.part_file(folder, part)
            tmp = folder / f".{final.name}.tmp-{os.getpid()}"
            self._copy(f"SELECT {pt.EXPORTED} FROM {table} WHERE {pt.part_where(part, span)}", tmp)
            faults.hit("during_export")
            durable_replace(tmp, final)
            self.files_written += 1
            faults.hit("after_rename")
        gone = [
            f
            for f in (folder.glob(PART_GLOB) if whole else found.gone)
            if pt.part_number(f) not in parts
        ]
        for f in gone:
            f.unlink(missing_ok=True)
        if gone:
            fsync_dir(folder)
        self._covered[export.name] = commits
        row = first_row(cur, f"SELECT count(*) FROM {table}")
        size = sum(f.stat().st_size for f in folder.glob(PART_GLOB))
        return ExportResult(
            export.name,
            f"{export.name}/",
            int(row[0]) if row else 0,
            size,
            catalog_seq,
            dt.datetime.now(dt.UTC),
            time.perf_counter() - started,
            len(parts),
            commits,
            span,
        )

    def _copy(self, sql: str, tmp: Path) -> int:
        """``COPY (sql)`` to a Parquet file; the number of rows written. Each writer thread
        holds a row group in memory: at most 30,720 rows and 8 MB (docs/scale.md: why)."""
        try:
            row = first_row(
                self.cur,  # COPY answers with the number of rows written
                f"COPY ({sql}) TO {sql_str(str(tmp))} "
                "(FORMAT parquet, COMPRESSION zstd, "
                "ROW_GROUP_SIZE 30720, ROW_GROUP_SIZE_BYTES '8MB')",
            )
        except duckdb.Error:
            tmp.unlink(missing_ok=True)
            raise
        return int(row[0]) if row else 0

    def _write_manifest(
        self, results: Sequence[ExportResult], catalog_seq: int, catalog_id: str
    ) -> None:
        manifest = read_manifest(self.folder)
        for r in results:
            manifest.exports[r.name] = ManifestEntry(
                r.path,
                r.rows,
                r.bytes,
                r.catalog_seq,
                r.refreshed_at,
                round(r.duration_s * 1000, 3),
                r.catalog_commit,
                r.partition_seqs,
                r.parts,
                catalog_id,
            )
        for gone in set(manifest.exports) - set(self.exports):
            del manifest.exports[gone]
        manifest.catalog_seq = min(
            (e.catalog_seq for e in manifest.exports.values()), default=catalog_seq
        )
        manifest.written_at = dt.datetime.now(dt.UTC)
        manifest.artifacts_missing = self.files.missing_files()
        write_bytes_atomic(self.folder / MANIFEST, encode_manifest(manifest))
