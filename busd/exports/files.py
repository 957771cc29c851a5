"""Committed artifacts whose file is gone or unreadable: checked cheaply before a file goes
into a ``data."<name>"`` view, remembered when DuckDB fails on one anyway, and swept over every
committed artifact now and then. A vanished file never stops the bus: it is left out of the
views, counted (``busd_artifacts_missing``) and named in the manifest."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from collections.abc import Iterable
from pathlib import Path

import duckdb

from busd.durable import write_bytes_atomic
from busd.errors import StorageError
from busd.manifest import MANIFEST, MissingFiles, encode_manifest, read_manifest
from busd.sql import sql_str

MISSING_LISTED = 10  # files named in the manifest and by `busd status`
SWEEP_EVERY_S = 60.0  # every committed artifact's file is checked at most this often,
SWEEP_SHARE = 30  # ... and for at most 1/30 of the export thread's time


def file_problem(path: str, *, deep: bool = True) -> str | None:
    """Why a committed artifact's file cannot be read now; None when it can. ``deep`` also
    reads the Parquet magic bytes and footer length (a few bytes at each end), else only
    stat and access: cheap enough to run over every committed artifact."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # opening a FIFO would block the export thread
    if not deep:
        return None if os.access(path, os.R_OK) else "unreadable: permission denied"
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(4)
            if size < 12:
                return "not Parquet: too small"
            handle.seek(size - 8)
            tail = handle.read(8)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if head != b"PAR1" or tail[4:] != b"PAR1" or int.from_bytes(tail[:4], "little") + 12 > size:
        return "not Parquet"
    return None


def stat_key(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ArtifactFiles:
    """The export thread's view of the committed files (its own cursor's snapshot)."""

    def __init__(
        self, cursor: duckdb.DuckDBPyConnection, folder: Path, view_names: set[str]
    ) -> None:
        self.cur, self.folder = cursor, folder
        # names some export reads as data.*: their files get the deep check in a sweep too
        self._view_names = view_names
        # per artifact name, run_id -> (path, why) of committed files that cannot be read
        self._missing: dict[str, dict[str, tuple[str, str]]] = {}
        self.missing_count = 0
        self._checked_at: dt.datetime | None = None
        self._next_sweep = 0.0  # the first refresh (or sweep) checks every committed file
        # files DuckDB failed to read although the cheap check passed, by their stat key;
        # and files it read whole without error (not read again until they change)
        self._damaged: dict[str, tuple[tuple[int, ...] | None, str]] = {}
        self._read_whole: dict[str, tuple[int, ...] | None] = {}
        self._view_files: dict[str, list[str]] = {}  # the files each view reads now

    def problem(self, path: str, *, deep: bool = True) -> str | None:
        why = file_problem(path, deep=deep)
        if why is not None or path not in self._damaged:
            return why
        key, damage = self._damaged[path]
        if key == stat_key(path):
            return damage
        del self._damaged[path]  # rewritten since: worth another try
        return None

    def _read_fails(self, path: str) -> str | None:
        """Read a whole file with DuckDB (on a connection of its own: the refresh's
        transaction is aborted); why that fails, or None."""
        key = stat_key(path)
        if key is not None and self._read_whole.get(path) == key:
            return None
        con = duckdb.connect(":memory:")
        try:
            con.execute(
                f"SELECT count(*) FROM read_parquet({sql_str(path)}) AS t WHERE hash(t) IS NOT NULL"
            ).fetchall()
        except duckdb.Error as exc:
            return "unreadable: " + str(exc).splitlines()[0]
        finally:
            con.close()
        self._read_whole[path] = key
        return None

    def blame(self, names: Iterable[str], error: str, tmp: Path | None) -> bool:
        """After a refresh failed: the files of these views it failed on, remembered as
        damaged (left out from now on). False when no file is to blame."""
        if tmp is not None and str(tmp) in error:
            return False  # writing the export failed, not reading an artifact
        files = [p for n in names for p in self._view_files.get(n, ())]
        named = [(p, "unreadable: " + error.splitlines()[0]) for p in files if p in error]
        if not named:  # DuckDB does not always say which file: read each one
            named = [(p, why) for p in files if (why := self._read_fails(p)) is not None]
        for path, why in named:
            self._damaged[path] = (stat_key(path), why)
        return bool(named)

    def viewed(self, name: str, good: list[str], bad: dict[str, tuple[str, str]]) -> None:
        """What a view of ``name`` now reads, and the files it left out (run_id -> why)."""
        self._missing[name] = bad
        self.count_missing()
        self._checked_at = dt.datetime.now(dt.UTC)
        self._view_files[name] = good

    def sweep_due(self) -> bool:
        return time.monotonic() >= self._next_sweep

    def sweep(self) -> MissingFiles:
        """Check every committed artifact's file (stat; the files exports read, a few bytes
        more), and record the result in the manifest when it changed."""
        started = time.monotonic()
        before = self.missing_files()
        for path in list(self._damaged):  # a read error may have been passing
            if self._read_fails(path) is None:
                del self._damaged[path]
        # a file read whole without error is not read again while unchanged (an export
        # that fails for its own reasons must not re-read all its files every minute)
        in_views = {p for files in self._view_files.values() for p in files}
        self._read_whole = {p: k for p, k in self._read_whole.items() if p in in_views}
        try:
            rows = self.cur.execute(
                "SELECT name, run_id, path FROM catalog.artifacts_f WHERE path IS NOT NULL"
            )
            missing: dict[str, dict[str, tuple[str, str]]] = {}
            while chunk := rows.fetchmany(10_000):
                for name, run_id, path in chunk:
                    why = self.problem(path, deep=name in self._view_names)
                    if why is not None:
                        missing.setdefault(name, {})[run_id] = (path, why)
        except duckdb.Error as exc:
            raise StorageError(f"checking artifact files failed: {exc}") from exc
        finally:
            took = time.monotonic() - started
            self._next_sweep = time.monotonic() + max(SWEEP_EVERY_S, SWEEP_SHARE * took)
        self._missing = missing
        self.count_missing()
        self._checked_at = dt.datetime.now(dt.UTC)
        report = self.missing_files()
        if (report.count, report.paths) != (before.count, before.paths):
            manifest = read_manifest(self.folder)
            manifest.artifacts_missing = report
            write_bytes_atomic(self.folder / MANIFEST, encode_manifest(manifest))
        return report

    def count_missing(self) -> None:
        # one int, so that other threads (the daemon's metrics) read it safely
        self.missing_count = sum(len(files) for files in self._missing.values())

    def missing_files(self) -> MissingFiles:
        paths = sorted({p for files in self._missing.values() for p, _ in files.values()})
        return MissingFiles(self.missing_count, paths[:MISSING_LISTED], self._checked_at)
