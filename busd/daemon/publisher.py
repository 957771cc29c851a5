"""The publisher: export refreshes, coalesced, and the acks that wait for them.

It owns what has changed since the last refresh (the artifact names touched, the rows a
partitioned export rewrites, the generation of the newest commit waiting for its export) and
the export thread. Every commit hands its changes over with :meth:`committed` once its
transaction is done; the export loop takes them all, refreshes once, and only then has the
daemon ack everything of that generation or older. A failed refresh keeps the acks waiting
and is retried; a failed fsync raises :class:`~busd.errors.FatalStorageError`, which ends
the daemon.

A file the machine fails to read now (EIO, a read that hangs) is left out of a refresh and the
exports reading it are refreshed again once it reads (the sweep loop looks for that). When the
file is new to an export — committed since its last refresh — the acks wait for it too, for a
while (``Exporter.files.hold_s``): a message is acked once the exports hold its rows, unless
its file stays unreadable; then it is acked, the file reported, and the exports follow later.

The export thread is a :class:`~busd.daemon.threads.CallThread`: exit never waits for it, as
DuckDB cannot be interrupted in a read that hangs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from busd import log
from busd.catalog import Catalog
from busd.errors import FatalStorageError, StorageError
from busd.exports import Exporter
from busd.manifest import manifest_rows
from busd.metrics import Metrics
from busd.model import Changed

OnThread = Callable[..., Awaitable[Any]]


PAUSE_MAX_S = 2.0  # the longest pause after a refresh, for batches to coalesce


class Publisher:
    def __init__(
        self,
        exporter: Exporter,
        catalog: Catalog,
        *,
        metrics: Metrics,
        on_exporter: OnThread,
        on_writer: OnThread,
        progress: Callable[[], None],
        pause_max_s: float = PAUSE_MAX_S,
    ) -> None:
        self.exporter, self.catalog, self.metrics = exporter, catalog, metrics
        self.on_exporter, self.on_writer, self.progress = on_exporter, on_writer, progress
        self.log = log.get()
        self.generation = 0  # of the newest commit whose messages wait for a refresh
        self.exported_generation = 0  # the newest generation a finished refresh covers
        self.refreshes = 0
        self._touched: set[str] = set()
        self._stale: set[str] = set()  # exports to refresh whole (found stale at start)
        self._changed = Changed()  # rows committed since the last refresh (partitioned exports)
        self._rows: dict[str, tuple[Any, ...]] = {}  # latest exports_d row per export
        self._wanted = asyncio.Event()
        self._idle = asyncio.Event()
        self._lock = asyncio.Lock()  # the export loop, sweeps and `busd export` share it
        self._last_refresh_s = 0.0
        self.pause_max_s = pause_max_s
        self._unavailable = 0  # files the machine failed to read, as last logged

    # ---- what commits hand over ------------------------------------------------------------
    def committed(self, changed: Changed) -> None:
        """A transaction is done: its rows are for the next refresh to take."""
        self._changed.update(changed)

    def want(self, touched: set[str]) -> int:
        """Messages committed now wait for a refresh: the generation they wait for."""
        self.generation += 1
        self._touched |= touched
        self._wanted.set()
        return self.generation

    def touched(self, names: set[str]) -> None:
        """Rows committed with no message to ack (the standby, a backfill)."""
        self._touched |= names
        self._wanted.set()

    def stale(self, names: Sequence[str]) -> None:
        """Exports older than the catalog whose refresh failed at start (a full disk): the
        loop refreshes them whole, before any ack, and again until that succeeds."""
        self._stale.update(names)
        self._wanted.set()

    def pending(self) -> bool:
        return bool(self._touched or self._stale)

    def take_rows(self) -> list[tuple[Any, ...]]:
        """exports_d rows to ride along with the next transaction (one fsync fewer)."""
        rows, self._rows = list(self._rows.values()), {}
        return rows

    # ---- the loop ------------------------------------------------------------------------
    async def run(self, ack_through: Callable[[int], Awaitable[None]]) -> None:
        delay_s = 0.5
        while True:
            if not self._wanted.is_set():
                self._idle.set()
            await self._wanted.wait()
            self._wanted.clear()
            generation = self.generation
            touched, self._touched = self._touched, set()
            changed, self._changed = self._changed, Changed()
            stale, self._stale = self._stale, set()
            due = set(self.exporter.due(touched)) | stale
            names = [n for n in self.exporter.exports if n in due]
            try:
                await self.refresh(names, None if stale else changed)
            except FatalStorageError:  # a failed fsync: never retried, never acked
                raise
            except StorageError as exc:
                self.log.error(
                    "export refresh failed; acks wait", error=str(exc), retry_in_s=delay_s
                )
                self._touched |= touched
                self._changed.update(changed)
                self._stale |= stale
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, 30.0)
                self._wanted.set()
                continue
            held = self.exporter.files.holding
            if held:  # a new file cannot be read now: its exports lack it, acks wait
                self.log.warning(
                    "a file just committed cannot be read now; acks wait",
                    artifacts=sorted(held),
                    retry_in_s=delay_s,
                )
                self._touched |= held
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, 30.0)
                self._wanted.set()
                continue
            delay_s = 0.5
            self.exported_generation = generation
            await ack_through(generation)
            # Exports take at most about half the time: a refresh that took d seconds is
            # followed by a pause of d (at most pause_max_s) in which further batches commit
            # and coalesce into the next one. Small catalogs refresh in milliseconds.
            await anyio.sleep(min(self._last_refresh_s, self.pause_max_s))

    async def until_idle(self) -> None:
        """One more pass of the loop over whatever is pending (shutdown)."""
        self._wanted.set()
        self._idle.clear()
        await self._idle.wait()

    async def refresh(self, names: Sequence[str], changed: Changed | None = None) -> None:
        """Refresh exports; ``changed`` (rows committed since the last refresh) lets a
        partitioned export rewrite only its parts holding them. None: all parts."""
        try:
            async with self._lock:
                results, _seq = await self.on_exporter(self.exporter.refresh, names, changed)
        except StorageError:
            for name in names:
                self.metrics.export_failures.labels(export=name).inc()
            raise
        self.refreshes += 1
        self.progress()
        files = self.exporter.files
        self.metrics.artifacts_missing.set(files.missing_count)
        if len(files.unavailable) != self._unavailable:
            self._unavailable = len(files.unavailable)
            self.log.warning(
                "files cannot be read now; left out of the exports until they read again",
                files=sorted(files.unavailable)[:10],
                count=self._unavailable,
            )
        self._last_refresh_s = sum(r.duration_s for r in results)
        stamp = time.time()
        for r in results:
            self.metrics.export_seconds.labels(export=r.name).observe(r.duration_s)
            self.metrics.export_last_success.labels(export=r.name).set(stamp)
        self._rows.update((row[0], row) for row in manifest_rows(results))

    async def refresh_changed(self, touched: set[str]) -> None:
        """The standby's refresh after it followed a batch."""
        changed, self._changed = self._changed, Changed()
        try:
            await self.refresh(self.exporter.due(touched), changed)
        except StorageError:  # tried again: its rows are still to be refreshed
            changed.update(self._changed)
            self._changed = changed
            raise

    async def sweep_loop(self, committing: Callable[[], bool]) -> None:
        """Committed files that vanish are counted while no refresh runs, too (the check
        shares the export thread and its lock, and never waits behind a refresh); files the
        machine failed to read are looked at again, and the exports reading them refreshed
        once they read; exports_d rows no batch commit carried are recorded on their own."""
        files = self.exporter.files
        while True:
            await anyio.sleep(1.0)
            await self.record_when_idle(committing())
            if not self._lock.locked() and (files.sweep_due() or files.recheck_due()):
                try:
                    async with self._lock:
                        if files.sweep_due():
                            await self.on_exporter(files.sweep)
                        else:
                            await self.on_exporter(files.recheck)
                except FatalStorageError:
                    raise
                except StorageError as exc:
                    self.log.warning("could not check the artifact files", error=str(exc))
                self.metrics.artifacts_missing.set(files.missing_count)
            recovered = files.take_recovered()
            if recovered:
                self.log.info("files read again; refreshing", artifacts=sorted(recovered))
                self.touched(recovered)

    async def record_when_idle(self, committing: bool) -> None:
        """exports_d rows on their own transaction when no batch commit carries them."""
        if self._rows and not committing:
            rows = self.take_rows()
            try:
                await self.on_writer(self.catalog.record_exports, rows)
            except FatalStorageError:
                raise
            except StorageError as exc:
                self.log.warning("could not record exports_d", error=str(exc))
                for row in rows:  # kept for the next transaction, unless a newer one came
                    self._rows.setdefault(row[0], row)
