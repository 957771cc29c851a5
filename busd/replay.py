"""Replay: the stream folded again from its first sequence (``busd rebuild``, ``busd verify``).

Replay reads through an ephemeral consumer with no acks (never the durable one), folds with
the same :class:`~busd.fold.Folder` as the daemon, and commits into a fresh catalog. Messages
the live catalog quarantined as ``poison`` stay quarantined: replaying them could crash the
replay the same way they crashed the daemon.

A file is not read again when ``stat`` still gives the identity recorded when it was checked
for the same event (git's index rule, :func:`busd.validate.unchanged`): the facts recorded
then are reused (:class:`~busd.recorded.RecordedChecks`). ``recheck=True`` reads every file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import duckdb

from busd import source
from busd.catalog import Catalog
from busd.catalog.schema import COMPARED, FILE_COLUMNS
from busd.config import Settings
from busd.daemon.answers import poison_of
from busd.durable import fsync_dir, fsync_path
from busd.errors import BusdError, CatalogLocked
from busd.exports import Exporter
from busd.exports.files import file_problem
from busd.fold import Folder
from busd.manifest import read_manifest, reader_sql
from busd.model import Changed, Claim, Known, Sibling
from busd.recorded import RecordedChecks
from busd.sql import sql_str

REPLAY_BATCH = 5000  # events per fetch and per batch
REPLAY_COMMIT = 25_000  # events per catalog transaction (a COMMIT was 40 % of a batch's)

Progress = Callable[[int, int], None]  # (sequences done, sequences in all)


class ReplayStore:
    """The fold's store during replay: the new catalog, and the stream for payloads."""

    def __init__(self, catalog: Catalog, nc: Any, stream: str) -> None:
        self.catalog = catalog
        self.nc = nc
        self.stream = stream

    async def lookup(
        self, seqs: Sequence[int], event_ids: Sequence[str]
    ) -> tuple[dict[int, Known], dict[str, Claim]]:
        return self.catalog.lookup(seqs, event_ids)

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]:
        return self.catalog.siblings(event_id, after_seq)

    async def payload(self, seq: int) -> bytes:
        return await source.stored_payload(self.nc, self.stream, seq)


@dataclass
class ReplayResult:
    events: int = 0
    last_seq: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    files_checked: int = 0  # artifacts whose file was read
    files_reused: int = 0  # artifacts whose file was unchanged since its recorded check

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def files(self) -> str:
        return f"files checked {self.files_checked:,}, reused {self.files_reused:,}"


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's cyclic collector, tuned for a replay: it allocates millions of short-lived
    objects and makes no cycles of its own, and with the default thresholds the collector
    took a fifth of its CPU, traversing again and again the objects there before it began
    (frozen while it runs) and the batch in hand (collected every 50,000 allocations, not
    700)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def replay_into(
    s: Settings,
    nc: Any,
    catalog: Catalog,
    *,
    upto_seq: int | None = None,
    poison: dict[int, str] | None = None,
    progress: Progress | None = None,
    recorded: RecordedChecks | None = None,
) -> ReplayResult:
    """Fold the stream (up to ``upto_seq``, default: its last sequence now) into ``catalog``;
    the checks in ``recorded`` are reused where their files are unchanged."""
    with fewer_collections():
        return await _replay_into(s, nc, catalog, upto_seq, poison, progress, recorded)


async def _replay_into(
    s: Settings,
    nc: Any,
    catalog: Catalog,
    upto_seq: int | None,
    poison: dict[int, str] | None,
    progress: Progress | None,
    recorded: RecordedChecks | None,
) -> ReplayResult:
    first, last = await source.stream_bounds(nc, s.nats.stream)
    target = last if upto_seq is None else min(upto_seq, last)
    result = ReplayResult()
    started = time.perf_counter()
    if target == 0 or first > target:
        return result
    name = f"busd-replay-{uuid.uuid4().hex[:12]}"
    await source.add_reader(nc, s.nats.stream, name, 1, idle_s=60.0)
    pull = source.PullSource(nc, s.nats.stream, name)
    await pull.start()
    folder = Folder(
        s,
        ReplayStore(catalog, nc, s.nats.stream),
        replay=True,
        quarantined=poison or {},
        recorded=recorded,
    )
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="busd-replay")
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Changed] | None = None
    done = 0
    held = 0  # events in the catalog transaction left open
    try:
        while done < target - first + 1:
            batch = [d for d in await pull.fetch(REPLAY_BATCH, 500) if d.seq <= target]
            if not batch:
                if pull.nc.is_closed:
                    raise BusdError("the NATS connection closed during replay")
                continue
            # batch N is decoded and its files checked while batch N-1 commits
            prepared = await folder.prepare(batch)
            if pending is not None:
                try:
                    await pending
                except BaseException:
                    prepared.cancel()
                    raise
            folded = await folder.finish(prepared)
            for item in folded.decided:
                if item.outcome is not None:
                    result.outcomes[item.outcome.value] = (
                        result.outcomes.get(item.outcome.value, 0) + 1
                    )
            # only the logs per batch, a COMMIT every REPLAY_COMMIT events; artifacts_f and
            # runs_d once, at the end (a failure discards the whole replay anyway)
            held += len(batch)
            hold = held < REPLAY_COMMIT
            held = held if hold else 0
            pending = loop.run_in_executor(
                writer, partial(catalog.commit, derive=False, hold=hold), folded.rows
            )
            done = batch[-1].seq - first + 1
            result.events += len(batch)
            result.last_seq = batch[-1].seq
            if progress:
                progress(done, target - first + 1)
            if batch[-1].seq >= target:
                break
        if pending is not None:
            await pending
        await loop.run_in_executor(writer, catalog.derive_all)
    finally:
        result.files_checked, result.files_reused = folder.files_checked, folder.files_reused
        writer.shutdown(wait=True)
        await folder.close()
        await pull.stop()
        with contextlib.suppress(Exception):
            await source.delete_consumer(nc, s.nats.stream, name)
    result.seconds = time.perf_counter() - started
    return result


async def rebuild(
    s: Settings, nc: Any, progress: Progress | None = None, *, recheck: bool = False
) -> ReplayResult:
    """Replay into a new catalog file, refresh the exports from it, swap it in atomically.

    Holds the live catalog's lock throughout, so a ``busd serve`` cannot start meanwhile,
    and refuses while one runs. Files unchanged since the live catalog checked them are not
    read again, unless ``recheck``.
    """
    live = Catalog(s.catalog_path)  # raises CatalogLocked while serve runs
    new_path = s.catalog_path.with_name(s.catalog_path.name + ".rebuild")
    for leftover in (new_path, Path(str(new_path) + ".wal")):
        leftover.unlink(missing_ok=True)
    recorded = None
    try:
        poison = poison_of(live)
        if not recheck:
            recorded = RecordedChecks.snapshot(s, live.con, "catalog.artifact_log", s.data_path)
        fresh = Catalog(new_path)
        try:
            result = await replay_into(
                s, nc, fresh, poison=poison, progress=progress, recorded=recorded
            )
        finally:
            fresh.close()
        fsync_path(new_path)
    finally:
        if recorded is not None:
            recorded.close()
        live.close()
    wal = Path(str(s.catalog_path) + ".wal")
    wal.unlink(missing_ok=True)  # checkpointed on close; a stale WAL must never meet the new file
    os.replace(new_path, s.catalog_path)
    fsync_dir(s.catalog_path.parent)
    catalog = Catalog(s.catalog_path)
    try:
        exporter = Exporter.of(catalog.cursor(), s)
        exporter.refresh(list(exporter.exports))
    finally:
        catalog.close()
    return result


@dataclass
class Difference:
    table: str
    side: str  # "live only" or "replay only"
    row: tuple[Any, ...]


@dataclass
class VerifyReport:
    compared: list[str]
    against: str  # "catalog" or "exports"
    differences: list[Difference]
    counts: dict[str, int]
    replay: ReplayResult
    # committed artifacts whose file is gone or unreadable: (name, run_id, path, why). A
    # replay rejects their events now, so the catalogs differ for them.
    missing: list[tuple[str, str, str, str]] = field(default_factory=list)


async def verify(
    s: Settings,
    nc: Any,
    *,
    poison: dict[int, str] | None = None,
    workdir: Path | None = None,
    limit: int = 20,
    recheck: bool = False,
) -> VerifyReport:
    """Replay into a temporary catalog and compare it with the live one.

    When ``busd serve`` holds the catalog, the comparison is against its exports (runs and
    artifacts) at the sequence their manifest names; otherwise against every catalog table.
    Files unchanged since the live catalog (or its artifacts export) recorded their check
    are not read again, unless ``recheck``.
    """
    tmp_dir = workdir or s.data_path
    tmp = tmp_dir / f".verify-{uuid.uuid4().hex[:8]}.duckdb"
    recorded: RecordedChecks | None = None
    try:
        try:
            live = Catalog(s.catalog_path, read_only=True)
        except CatalogLocked:
            live_open = False
            # runs and artifacts are refreshed together; configured exports may lag behind them
            manifest = read_manifest(s.exports_path)
            runs = manifest.exports.get("runs")
            upto = runs.catalog_seq if runs else manifest.catalog_seq
        else:
            live_open = True
            try:
                upto = live.catalog_seq()
                poison = poison_of(live) if poison is None else poison
                committed = _committed(live.con, "catalog.artifacts_f")
                if not recheck:
                    recorded = RecordedChecks.snapshot(s, live.con, "catalog.artifact_log", tmp_dir)
            finally:
                live.close()
        if not live_open:  # busd serve holds the catalog: what its artifacts export says
            exported = reader_sql(s.exports_path, "artifacts")
            con = duckdb.connect(":memory:")
            try:
                committed = [] if exported is None else _committed(con, exported)
                if exported is not None and not recheck:
                    recorded = RecordedChecks.snapshot(s, con, exported, tmp_dir)
            finally:
                con.close()
        missing = sorted(
            (str(n), str(r), str(p), why)
            for n, r, p, *identity in committed
            if (recheck or not _unchanged_file(str(p), identity))
            and (why := file_problem(str(p))) is not None
        )
        replayed = Catalog(tmp)
        try:
            result = await replay_into(
                s, nc, replayed, upto_seq=upto, poison=poison, recorded=recorded
            )
            if live_open:
                report = _compare_catalogs(s.catalog_path, replayed, limit)
            else:
                report = _compare_exports(s, replayed, limit)
            report.replay = result
            report.missing = missing
            return report
        finally:
            replayed.close()
    finally:
        if recorded is not None:
            recorded.close()
        for leftover in (tmp, Path(str(tmp) + ".wal")):
            leftover.unlink(missing_ok=True)


def _committed(con: duckdb.DuckDBPyConnection, source: str) -> list[tuple[Any, ...]]:
    """(name, run_id, path, then bytes and the file's identity when it was checked) of each
    committed artifact in ``source``; only the first three from one older than v5."""
    try:
        return con.execute(
            f"SELECT name, run_id, path, bytes, {', '.join(FILE_COLUMNS[:-1])} "
            f"FROM {source} WHERE path IS NOT NULL"
        ).fetchall()
    except duckdb.BinderException:
        return con.execute(
            f"SELECT name, run_id, path FROM {source} WHERE path IS NOT NULL"
        ).fetchall()


def _unchanged_file(path: str, identity: Sequence[Any]) -> bool:
    """The file has the identity it had when it was checked, read as Parquet, and committed
    (a change of its mode or owner changes its ctime): no need to open it again to know it
    can be read."""
    if len(identity) != 5 or identity[1] is None:
        return False
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return False
    size, dev, ino, mtime_ns, ctime_ns = identity
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == size
        and st.st_ino == ino
        and st.st_mtime_ns == mtime_ns
        and st.st_ctime_ns == ctime_ns
        and st.st_dev == dev
    )


def _diff(
    con: duckdb.DuckDBPyConnection, table: str, left: str, right: str, limit: int
) -> tuple[list[Difference], int]:
    """Rows of ``left`` not in ``right`` and the other way round, duplicates counted (what
    EXCEPT ALL both ways gives), in one hash aggregate: EXCEPT ALL sorted, 5x slower."""
    rows = con.execute(
        f"SELECT * EXCLUDE (busd_side), sum(busd_side) AS busd_n FROM ("
        f"SELECT *, 1 AS busd_side FROM ({left}) "
        f"UNION ALL SELECT *, -1 AS busd_side FROM ({right})) "
        "GROUP BY ALL HAVING sum(busd_side) <> 0 ORDER BY ALL"
    ).fetchall()
    out: list[Difference] = []
    total = 0
    for side, sign in (("live only", 1), ("replay only", -1)):
        shown = 0
        for *row, n in rows:
            if (n > 0) != (sign > 0):
                continue
            total += abs(n)
            for _ in range(min(abs(n), limit - shown)):
                out.append(Difference(table, side, tuple(row)))
                shown += 1
    return out, total


def _select(source_sql: str, table: str) -> str:
    # COLUMNS, not EXCLUDE: a catalog or export older than a left-out column has none to leave out
    left_out = COMPARED[table]
    if not left_out:
        return f"SELECT * FROM {source_sql}"
    names = ", ".join(sql_str(c) for c in left_out)
    return f"SELECT COLUMNS(lambda c: c NOT IN ({names})) FROM {source_sql}"


def _compare_catalogs(live_path: Path, replayed: Catalog, limit: int) -> VerifyReport:
    con = replayed.con
    try:
        con.execute(f"ATTACH {sql_str(live_path)} AS live (READ_ONLY)")
    except duckdb.IOException as exc:
        raise CatalogLocked(f"the catalog {live_path} was locked during verify: {exc}") from None
    differences: list[Difference] = []
    counts: dict[str, int] = {}
    try:
        for table in COMPARED:
            diffs, n = _diff(
                con,
                table,
                _select(f"live.catalog.{table}", table),
                _select(f"busd.catalog.{table}", table),
                limit,
            )
            differences += diffs
            counts[table] = n
    finally:
        con.execute("DETACH live")
    return VerifyReport(list(COMPARED), "catalog", differences, counts, ReplayResult())


def _compare_exports(s: Settings, replayed: Catalog, limit: int) -> VerifyReport:
    con = replayed.con
    differences: list[Difference] = []
    counts: dict[str, int] = {}
    for export, table in (("runs", "runs_d"), ("artifacts", "artifacts_f")):
        source = reader_sql(s.exports_path, export)
        if source is None:
            raise BusdError(f"the {export} export is missing from {s.exports_path}")
        diffs, n = _diff(
            con, table, _select(source, table), _select(f"busd.catalog.{table}", table), limit
        )
        differences += diffs
        counts[table] = n
    return VerifyReport(["runs_d", "artifacts_f"], "exports", differences, counts, ReplayResult())
