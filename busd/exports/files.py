"""Committed artifacts whose file is gone or cannot be read now: looked at before a file goes
into a ``data."<name>"`` view, remembered when DuckDB fails on one anyway, and swept over every
committed artifact now and then. A vanished file never stops the bus: it is left out of the
views, counted (``busd_artifacts_missing``) and named in the manifest.

A file the *machine* fails to read (EIO, ESTALE, EMFILE, a read that hangs on a stalled network
or FUSE filesystem) is not gone: it is left out of the refresh under way, the exports that
should hold it are marked stale, it is looked at again every few seconds and, once it reads,
the exports are refreshed with it. It is reported only when it stays unreadable longer than
``verify.file_wait_s``. Every look at a file is bounded by ``verify.check_timeout_s``: it runs
on a thread of its own, left behind when its read hangs (see :class:`Bounded`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import duckdb

from busd.durable import write_bytes_atomic
from busd.errors import StorageError
from busd.exports.sweep import (
    SWEEP_EVERY_S,
    SWEEP_SHARE,
    Pass,
    begin_pass,
    no_longer_committed,
    small,
)
from busd.manifest import MANIFEST, MissingFiles, encode_manifest, read_manifest
from busd.sql import sql_str

MISSING_LISTED = 10  # files named in the manifest and by `busd status`
RECHECK_FIRST_S = 1.0  # a file the machine failed to read is looked at again after this,
RECHECK_MAX_S = 30.0  # ... twice as long each time, up to this

# errors that say something about the file (gone, not allowed, not a file); any other error
# while reading it is the machine's (EIO, ESTALE, EMFILE, ENOMEM, ...) and passes
_ABOUT_THE_FILE = frozenset((
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP,
    errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EINVAL,
))  # fmt: skip
# errors of the machine as DuckDB words them (its message ends with the strerror)
_MACHINE_WORDS = tuple(os.strerror(code) for code in (
    errno.EIO, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT,
    errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOLINK, errno.ENOTCONN, errno.ECONNRESET,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.EREMOTEIO,
    errno.ENOBUFS,
))  # fmt: skip

StatKey = tuple[int, ...]


class Look(NamedTuple):
    """What looking at a file found: ``why`` it cannot be read (None: it can), whether that
    is the machine's failure (``transient``), and its stat key when stat answered."""

    why: str | None
    transient: bool = False
    key: StatKey | None = None


def look(path: str, *, deep: bool = True) -> Look:
    """Look at a committed artifact's file. ``deep`` also reads the Parquet magic bytes and
    footer length (a few bytes at each end), else only stat and access: cheap enough to run
    over every committed artifact."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _failed(exc, None)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if not stat.S_ISREG(st.st_mode):
        return Look("not a regular file", False, key)  # opening a FIFO would block
    if not deep:
        ok = os.access(path, os.R_OK)
        return Look(None if ok else "unreadable: permission denied", False, key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 4, 0)
            if size < 12:
                return Look("not Parquet: too small", False, key)
            tail = os.pread(fd, 8, size - 8)
        finally:
            os.close(fd)
    except OSError as exc:
        return _failed(exc, key)
    if head != b"PAR1" or tail[4:] != b"PAR1" or int.from_bytes(tail[:4], "little") + 12 > size:
        return Look("not Parquet", False, key)
    return Look(None, False, key)


def _failed(exc: OSError, key: StatKey | None) -> Look:
    if exc.errno == errno.ENOENT:
        return Look("missing", False, key)
    return Look(f"unreadable: {exc.strerror or exc}", exc.errno not in _ABOUT_THE_FILE, key)


def file_problem(path: str, *, deep: bool = True) -> str | None:
    """Why a committed artifact's file cannot be read now; None when it can (no time bound:
    for tools that look at files once, such as ``busd verify``)."""
    return look(path, deep=deep).why


def machine_error(message: str) -> bool:
    """A DuckDB error that says the machine failed to read (not what the file holds)."""
    first = message.splitlines()[0] if message else ""
    return any(first.endswith(words) or f": {words}" in first for words in _MACHINE_WORDS)


def read_whole(path: str) -> Look:
    """Read a whole file with DuckDB, on a connection of its own (the refresh's transaction
    is aborted); why that fails, or None."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(
            f"SELECT count(*) FROM read_parquet({sql_str(path)}) AS t WHERE hash(t) IS NOT NULL"
        ).fetchall()
    except duckdb.Error as exc:
        return Look("unreadable: " + str(exc).splitlines()[0], machine_error(str(exc)))
    finally:
        con.close()
    return Look(None)


# ---- looks bounded in time ------------------------------------------------------------------
class _Job:
    """Looks at files one after the other on a thread of its own."""

    def __init__(self, fn: Callable[[str], Look], paths: Sequence[str]) -> None:
        self.fn, self.paths = fn, paths
        self.results: list[Look] = []
        self.lock = threading.Lock()
        self.since = time.monotonic()  # when the look under way began
        self.finished = threading.Event()
        self.abandoned = False

    def run(self) -> None:
        for path in self.paths:
            try:
                result = self.fn(path)
            except Exception as exc:  # noqa: BLE001 - a look never raises: say why
                result = Look(f"unreadable: {exc}", True)
            with self.lock:
                if self.abandoned:
                    return
                self.results.append(result)
                self.since = time.monotonic()
        self.finished.set()


class Bounded:
    """Looks at files on daemon threads, each look bounded by ``timeout_s``.

    A read that hangs (a stalled network or FUSE filesystem) cannot be interrupted: not by
    DuckDB's ``interrupt()``, which is checked between tasks, and on FUSE not even by
    SIGKILL. So the looks run on a thread that is left behind when one hangs; the file is
    named unavailable, and no other look at it starts until that thread's read returns, so a
    hung file costs one thread and one wait, not one per refresh. Exit never joins these
    threads."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stuck: dict[str, threading.Thread] = {}

    def stuck(self, path: str) -> bool:
        thread = self._stuck.get(path)
        if thread is None:
            return False
        if thread.is_alive():
            return True
        del self._stuck[path]
        return False

    def map(self, fn: Callable[[str], Look], paths: Sequence[str]) -> list[Look]:
        hung = Look(f"unreadable: no answer within {self.timeout_s:g}s", True)
        out = [hung] * len(paths)
        todo = [i for i, p in enumerate(paths) if not self.stuck(p)]
        while todo:
            job = _Job(fn, [paths[i] for i in todo])
            thread = threading.Thread(target=job.run, name="busd-look", daemon=True)
            thread.start()
            waiting = None
            while not job.finished.wait(min(self.timeout_s, 0.25)):
                with job.lock:
                    if time.monotonic() - job.since > self.timeout_s:
                        job.abandoned = True
                        waiting = len(job.results)
                        break
            for k, result in enumerate(job.results):
                out[todo[k]] = result
            if waiting is None or waiting >= len(todo):
                break
            self._stuck[paths[todo[waiting]]] = thread
            todo = todo[waiting + 1 :]
        return out


# ---- what the export thread knows of the committed files -------------------------------------
@dataclasses.dataclass
class Unavailable:
    """A committed file the machine failed to read: left out until it reads again."""

    names: set[str]  # artifact names committed with this file
    why: str
    since: float  # monotonic, the first failure
    looks: int = 1  # failed looks since
    due: float = 0.0  # the next look (monotonic)
    held: bool = False  # new to an export when it failed: acks wait for it a while
    whole: bool = False  # DuckDB failed on it where the cheap look did not: read it whole

    def failed_again(self, why: str, now: float, *, hung: bool = False) -> None:
        """Another failed look; one still hung is asked about again soon (a glance at its
        thread), else the looks space out."""
        self.why, self.looks = why, self.looks + 1
        wait_s = RECHECK_FIRST_S * 2 ** (self.looks - 1)
        self.due = now + (RECHECK_FIRST_S if hung else min(wait_s, RECHECK_MAX_S))


class ArtifactFiles:
    """The export thread's view of the committed files (its own cursor's snapshot).

    Called on the export thread only, but for :meth:`take_recovered`, ``missing_count`` and
    ``holding``, which other threads read."""

    def __init__(
        self,
        cursor: duckdb.DuckDBPyConnection,
        folder: Path,
        view_names: set[str],
        *,
        timeout_s: float = 30.0,
        report_after_s: float = 60.0,
        hold_s: float = 0.0,
    ) -> None:
        self.cur, self.folder = cursor, folder
        # names some export reads as data.*: their files get the deep check in a sweep too
        self._view_names = view_names
        self.bounded = Bounded(timeout_s)
        self.report_after_s = report_after_s  # unavailable this long: reported as unreadable
        self.hold_s = hold_s  # how long acks wait for a new file that cannot be read now
        # per artifact name, run_id -> (path, why) of committed files that cannot be read
        self._missing: dict[str, dict[str, tuple[str, str]]] = {}
        self.unavailable: dict[str, Unavailable] = {}  # by path
        # read by other threads: one value each
        self.missing_count = 0
        self.holding: frozenset[str] = frozenset()  # names whose new file acks wait for
        self.next_recheck = float("inf")  # monotonic, when an unavailable file is due
        self._recovered: set[str] = set()  # names whose unavailable file reads again
        self._recovered_lock = threading.Lock()
        self._checked_at: dt.datetime | None = None
        self._next_sweep = 0.0  # a pass over every committed file starts at once
        self._pass: Pass | None = None  # a sweep under way, slice by slice
        # files DuckDB failed to read although the cheap check passed, by their stat key;
        # and files it read whole without error (not read again until they change)
        self._damaged: dict[str, tuple[StatKey | None, str]] = {}
        self._read_whole: dict[str, StatKey | None] = {}
        self._view_files: dict[str, list[str]] = {}  # the files each view reads now
        self._looked: dict[str, Look] = {}  # looks of the refresh under way
        self._skip: set[str] = set()  # left out of the refresh under way (DuckDB failed)
        # per (export, artifact name): the seq of every committed file the export's last
        # finished refresh listed (a file not among them is new to it), and the same of the
        # refresh under way
        self._listed: dict[tuple[str, str], frozenset[int]] = {}
        self._listing: dict[tuple[str, str], frozenset[int]] = {}

    # ---- a refresh ----------------------------------------------------------------------
    def begin(self) -> None:
        """A refresh (or check) starts: every file is looked at again."""
        self._looked, self._skip, self._listing = {}, set(), {}

    def listed(self) -> None:
        """A refresh finished: the files it listed are no longer new to its exports."""
        self._listed.update(self._listing)
        self._listing = {}

    def seed(self, export: str, name: str, seqs: Iterable[int]) -> None:
        """``export`` already holds these committed files of ``name`` (its file on disk is
        as fresh as the catalog when busd starts): none of them is new to it."""
        self._listed[(export, name)] = frozenset(seqs)

    def end(self) -> None:
        """A refresh, check or look is done: what other threads read is brought up to date
        (which names acks wait for, when to look again, how many files are reported)."""
        now = time.monotonic()
        held = [u for u in self.unavailable.values() if u.held and now - u.since < self.hold_s]
        self.holding = frozenset(n for u in held for n in u.names)
        self.next_recheck = min((u.due for u in self.unavailable.values()), default=float("inf"))
        self.count_missing()

    def split(
        self,
        name: str,
        files: Sequence[tuple[str, str, int]],
        export: str | None = None,
        baseline: int = 0,
    ) -> tuple[list[tuple[str, str]], bool]:
        """The (run_id, path) of ``name``'s committed files (run_id, path, seq) that can be
        read now, and whether some were left out because the machine failed to read them
        (the export is then incomplete). Files new to ``export`` (the export being refreshed;
        None: a check) that fail so are *held*: acks wait for them a while.

        New is committed since the export's last finished refresh: not listed by it. Not by
        sequence: a file that appeared late commits its lower sequence after higher ones
        were exported. Only before that refresh (and without :meth:`seed`) is new judged by
        ``baseline``, the sequence the export's manifest covers."""
        key = (export or "", name)
        before = self._listed.get(key)
        if export is not None:
            self._listing[key] = frozenset(seq for _, _, seq in files)
        new = list({p: None for _, p, _ in files if p not in self._looked and p not in self._skip})
        for path, found in zip(new, self.bounded.map(look, new), strict=True):
            self._looked[path] = found
        now = time.monotonic()
        good: list[tuple[str, str]] = []
        bad: dict[str, tuple[str, str]] = {}
        incomplete = False
        skipped = Look("unreadable: failed in this refresh", True)
        for run_id, path, seq in files:
            found = skipped if path in self._skip else self._looked[path]
            why = found.why or self._damage(path, found.key)
            if why is None:
                self._readable(path)
                good.append((run_id, path))
            elif found.transient:
                incomplete = True
                held = export is not None and (
                    seq not in before if before is not None else seq > baseline
                )
                self._unreadable(path, name, why, now, held=held, whole=path in self._skip)
            else:
                self.unavailable.pop(path, None)
                bad[run_id] = (path, why)
        self._missing[name] = bad
        self._checked_at = dt.datetime.now(dt.UTC)
        self._view_files[name] = [p for _, p in good]
        return good, incomplete

    def _damage(self, path: str, key: StatKey | None) -> str | None:
        if path not in self._damaged:
            return None
        damaged_key, damage = self._damaged[path]
        if damaged_key == key:
            return damage
        del self._damaged[path]  # rewritten since: worth another try
        return None

    def _unreadable(
        self, path: str, name: str, why: str, now: float, *, held: bool, whole: bool
    ) -> None:
        known = self.unavailable.get(path)
        if known is None:
            self.unavailable[path] = Unavailable(
                {name}, why, now, due=now + RECHECK_FIRST_S, held=held, whole=whole
            )
            return
        known.names.add(name)
        known.whole = known.whole or whole
        known.held = known.held or held  # a sweep may have looked at a new file first
        if known.due <= now:  # one failure per look, not per view that reads it
            known.failed_again(why, now)

    def _readable(self, path: str) -> None:
        gone = self.unavailable.pop(path, None)
        if gone is not None:
            with self._recovered_lock:
                self._recovered |= gone.names

    def take_recovered(self) -> set[str]:
        """Artifact names whose unavailable file reads again (the exports reading them are
        refreshed); any thread."""
        with self._recovered_lock:
            names, self._recovered = self._recovered, set()
        return names

    def blame(self, names: Iterable[str], error: str, tmp: Path | None) -> bool:
        """After a refresh failed: the files of these views it failed on. Left out of this
        refresh; remembered as damaged when DuckDB judged what they hold, as unavailable when
        the machine failed to read them. False when no file is to blame."""
        if tmp is not None and str(tmp) in error:
            return False  # writing the export failed, not reading an artifact
        files = [p for n in names for p in self._view_files.get(n, ())]
        named = [
            (p, Look("unreadable: " + error.splitlines()[0], machine_error(error)))
            for p in files
            if p in error
        ]
        if not named:  # DuckDB does not always say which file: read each one
            named = [(p, f) for p, f in zip(files, self._reads(files), strict=True) if f.why]
        for path, found in named:
            if found.transient:
                self._skip.add(path)
            else:
                self._damaged[path] = (self._looked.get(path, Look(None)).key, str(found.why))
        return bool(named)

    def _reads(self, paths: Sequence[str]) -> list[Look]:
        """Each file read whole by DuckDB (bounded), but those read whole since they last
        changed."""
        out = [Look(None)] * len(paths)
        todo = [
            i
            for i, p in enumerate(paths)
            if p not in self._read_whole or self._read_whole[p] != self._key(p)
        ]
        for i, found in zip(
            todo, self.bounded.map(read_whole, [paths[i] for i in todo]), strict=True
        ):
            out[i] = found
            if found.why is None:
                self._read_whole[paths[i]] = self._key(paths[i])
        return out

    def _key(self, path: str) -> StatKey | None:
        found = self._looked.get(path)
        return found.key if found is not None else None

    # ---- between refreshes --------------------------------------------------------------
    def recheck_due(self) -> bool:
        """Any thread."""
        return time.monotonic() >= self.next_recheck

    def recheck(self) -> None:
        """Look again at the unavailable files whose turn it is (those still hung are not
        looked at until their read returns)."""
        now = time.monotonic()
        due = [p for p, u in self.unavailable.items() if u.due <= now]
        before = self.missing_files()
        plain = [p for p in due if not self.unavailable[p].whole]
        whole = [p for p in due if self.unavailable[p].whole]
        self._looked = dict(zip(plain, self.bounded.map(look, plain), strict=True))
        for path, found in zip(whole, self.bounded.map(read_whole, whole), strict=True):
            self._looked[path] = found
        now = time.monotonic()
        for path in due:
            found = self._looked[path]
            if found.why is None:
                self._readable(path)
            elif found.transient:
                hung = self.bounded.stuck(path)
                self.unavailable[path].failed_again(found.why, now, hung=hung)
            # gone or damaged now: the next refresh or sweep reports it
        self._looked = {}
        self.end()
        self._report(before)

    def sweep_due(self, *, inline: bool = False) -> bool:
        """A sweep is due, or one is under way. ``inline`` (a refresh asks): only when the
        whole sweep is one call; a larger catalog is swept between refreshes, a slice at a
        time (the daemon's sweep loop), so that a refresh never waits for millions of files."""
        if self._pass is None and time.monotonic() < self._next_sweep:
            return False
        return not inline or (self._pass is None and small(self.cur))

    def sweep(self) -> MissingFiles:
        """Check the next slice of the committed artifacts' files (stat; the files exports
        read, a few bytes more): about ``SWEEP_ROWS`` of them, by ``first_seq``. Once every
        one was, record the result in the manifest when it changed."""
        started = time.monotonic()
        try:
            if self._pass is None:
                self._pass = self._begin_pass()
            sweep = self._pass
            rows = self.cur.execute(
                f"SELECT name, run_id, path FROM catalog.artifacts_f WHERE ({sweep.where()}) "
                "AND path IS NOT NULL"
            )
            seen = 0
            while chunk := rows.fetchmany(10_000):
                self._sweep_chunk(chunk, sweep.missing)
                seen += len(chunk)
            sweep.advance(seen, time.monotonic() - started)
            if not sweep.done():
                self.end()
                return self.missing_files()
            gone = no_longer_committed(self.cur, list(self.unavailable))
        except duckdb.Error as exc:
            self._pass = None
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            raise StorageError(f"checking artifact files failed: {exc}") from exc
        self._pass = None
        self._next_sweep = time.monotonic() + max(SWEEP_EVERY_S, SWEEP_SHARE * sweep.took)
        for path in gone:
            del self.unavailable[path]
        self._missing = sweep.missing
        self._checked_at = dt.datetime.now(dt.UTC)
        self.end()
        return self._report(sweep.before)

    def _begin_pass(self) -> Pass:
        before = self.missing_files()
        damaged = list(self._damaged)  # a read error may have been passing
        for path, found in zip(damaged, self.bounded.map(read_whole, damaged), strict=True):
            if found.why is None:
                del self._damaged[path]
        # a file read whole without error is not read again while unchanged (an export
        # that fails for its own reasons must not re-read all its files every minute)
        in_views = {p for files in self._view_files.values() for p in files}
        self._read_whole = {p: k for p, k in self._read_whole.items() if p in in_views}
        return begin_pass(self.cur, before)

    def _sweep_chunk(
        self, chunk: list[tuple[str, str, str]], missing: dict[str, dict[str, tuple[str, str]]]
    ) -> None:
        looks: dict[str, Look] = {}
        for deep in (True, False):
            wanted = {p: deep for n, _, p in chunk if (n in self._view_names) == deep}
            paths = [p for p in wanted if p not in looks]
            found = self.bounded.map(functools.partial(look, deep=deep), paths)
            looks.update(zip(paths, found, strict=True))
        now = time.monotonic()
        for name, run_id, path in chunk:
            seen = looks[path]
            why = seen.why or self._damage(path, seen.key)
            if why is None:
                self._readable(path)
            elif seen.transient:
                self._unreadable(path, name, why, now, held=False, whole=False)
            else:
                self.unavailable.pop(path, None)
                missing.setdefault(name, {})[run_id] = (path, why)

    # ---- the report ---------------------------------------------------------------------
    def _report(self, before: MissingFiles) -> MissingFiles:
        """Record the report in the manifest when it changed."""
        report = self.missing_files()
        if (report.count, report.paths) != (before.count, before.paths):
            manifest = read_manifest(self.folder)
            manifest.artifacts_missing = report
            write_bytes_atomic(self.folder / MANIFEST, encode_manifest(manifest))
        return report

    def _reported(self) -> list[str]:
        """Unavailable files reported as unreadable: for longer than ``report_after_s``, and
        by more than one look (a file that hangs once is not reported)."""
        now = time.monotonic()
        return [
            p
            for p, u in self.unavailable.items()
            if u.looks > 1 and now - u.since >= self.report_after_s
        ]

    def count_missing(self) -> None:
        # one int, so that other threads (the daemon's metrics) read it safely
        self.missing_count = self.missing_files().count

    def missing_files(self) -> MissingFiles:
        gone = [p for files in self._missing.values() for p, _ in files.values()]
        unreadable = set(self._reported()) - set(gone)
        paths = sorted({*gone, *unreadable})[:MISSING_LISTED]
        return MissingFiles(len(gone) + len(unreadable), paths, self._checked_at)
