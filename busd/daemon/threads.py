"""The catalog's two threads: its writer (every transaction, in order) and the export
cursor's. Both are :class:`CallThread`s, daemon threads that exit never joins: DuckDB cannot be
interrupted in a read or an fsync that hangs (a stalled network or FUSE filesystem, a disk
that does not answer), so a stop gives up on them after its grace period and busd still
exits. A job of the writer's is patience for the keeper: a slow disk is no stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from busd import log
from busd.catalog import Catalog
from busd.daemon.keeper import Progress
from busd.daemon.publisher import Publisher
from busd.daemon.stop import leave_behind

T = TypeVar("T")

# what an idle thread gets to stop even when the grace period is spent (something else
# used it up): not reported stuck for not having been given the time to end
IDLE_STOP_S = 1.0


class CallThread:
    """One thread taking calls in order, as the catalog's writer and the exporter's cursor
    need (a one-worker ``ThreadPoolExecutor``, but a daemon thread that exit does not join):
    if DuckDB hangs in a read or an fsync (a stalled network or FUSE filesystem, a disk that
    does not answer), :meth:`stop` gives up on it after a while and busd still exits."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Any] | None]
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((future, lambda: fn(*args)))
        return future

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                future.set_exception(exc)

    def stop(self, timeout_s: float) -> bool:
        """Let the calls queued finish, for up to ``timeout_s``; False if the thread is
        still busy then (stuck in a read)."""
        self._calls.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class CatalogThreads:
    """The writer's and the export cursor's threads (see the module docstring)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._writer = CallThread("busd-writer")
        self._exporter = CallThread("busd-export")
        self.log = log.get()

    async def on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """A job on the catalog's writer thread; while it runs the keeper is patient (a
        slow disk is no stall, whichever transaction meets it first)."""
        self.progress.write_started()
        try:
            return await asyncio.wrap_future(self._writer.submit(fn, *args))
        finally:
            self.progress.write_ended()

    async def on_exporter(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._exporter.submit(fn, *args))

    async def close(
        self,
        catalog: Catalog | None,
        publisher: Publisher | None,
        grace_s: float,
        left: Callable[[], float],
    ) -> None:
        """The export thread, then the catalog and its writer thread, within what is left
        of the grace period (``left()``)."""
        # the export thread's cursor must be idle before the catalog's connection closes;
        # stuck in a read that does not return, it is left behind with the catalog open
        # (what is committed is durable in its WAL), and busd exits all the same
        if not await anyio.to_thread.run_sync(self._exporter.stop, max(left(), IDLE_STOP_S)):
            self.log.error(
                "the export thread is stuck in a read; exiting without it", waited_s=grace_s
            )
            leave_behind((self, catalog))
            catalog = None
        if catalog is not None:
            with anyio.move_on_after(max(left(), IDLE_STOP_S)) as waited:
                if publisher is not None:
                    with contextlib.suppress(Exception):
                        await publisher.record_when_idle(False)
                await self.on_writer(catalog.close)
            if waited.cancelled_caught:  # what it committed is durable in its WAL
                self.log.error(
                    "the catalog's writer is stuck on the disk; exiting without it",
                    waited_s=grace_s,
                )
        if not await anyio.to_thread.run_sync(self._writer.stop, max(left(), IDLE_STOP_S)):
            leave_behind((self, catalog))
