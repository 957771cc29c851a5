"""The committer: a batch's files checked while the previous batch commits, group commits,
one catalog transaction per group, and the settlement each delivery gets (terms and naks at
once; acks wait in the ledger for the publisher's refresh).

It owns the commit in flight; the fetch loop hands it batches and waits for it at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import anyio

from busd import faults, log, model
from busd.catalog import Catalog
from busd.config import ConsumerSettings
from busd.daemon.keeper import Progress
from busd.daemon.publisher import Publisher
from busd.errors import ConsumerGone, FatalStorageError, Outcome, StorageError, TransientError
from busd.fold import Folder, Prepared, merge
from busd.inflight import Ledger
from busd.lineage import Lineage
from busd.metrics import Metrics
from busd.model import Batch, Decided, Folded
from busd.settle import Rechecks, outcome_line, settle, settlement

T = TypeVar("T")

GROUP_BYTES = 64 << 20  # a group commit stops gathering at this many bytes of payloads
GATHER_CHECKS_S = 5.0  # ... or when the file checks it queued would take longer than this


class Committer:
    def __init__(
        self,
        consumer: ConsumerSettings,
        src: Any,
        *,
        folder: Folder,
        catalog: Catalog,
        on_writer: Callable[..., Awaitable[Any]],
        publisher: Publisher,
        lineage: Lineage,
        ledger: Ledger,
        rechecks: Rechecks,
        metrics: Metrics,
        progress: Progress,
        outcomes: Any,
        catalog_seq: int,
        send: Callable[[Sequence[tuple[str, bytes]]], Awaitable[bool]],
        stopping: Callable[[], bool],
        stopped: asyncio.Event,
        grace_left: Callable[[], float],
        record_held: Callable[[], Awaitable[None]],
        forget: Callable[[Iterable[int]], None],
    ) -> None:
        self.consumer, self.src, self.folder, self.catalog = consumer, src, folder, catalog
        self.on_writer, self.publisher, self.ledger = on_writer, publisher, ledger
        self.lineage = lineage
        self.rechecks, self.metrics, self.progress = rechecks, metrics, progress
        self.outcomes, self.send, self.stopping = outcomes, send, stopping
        self.stopped = stopped  # set once busd stops: file checks under way are given up
        self.grace_left = grace_left  # ... once what is left of the stop's grace period ends
        self.record_held, self.forget = record_held, forget  # busd's deaths holding them
        self.log = log.get()
        self.debug = log.debug_enabled()
        self._catalog_seq = catalog_seq
        self._commit_task: asyncio.Future[None] | None = None

    def committing(self) -> bool:
        return self._commit_task is not None

    async def committed(self) -> None:
        """Wait for the batch whose commit is under way (and its settlement)."""
        task, self._commit_task = self._commit_task, None
        if task is not None:
            await task

    async def handle(self, batch: Sequence[model.Delivery]) -> None:
        """Decode a batch and check its files while the previous batch commits; batches
        that arrive during that commit join this one (a group commit: under a backlog one
        transaction, export refresh and ack flush cover up to ``commit_max`` events). The
        group reads the catalog only once the previous commit is done."""
        held = list(batch)
        self.ledger.hold(batch, time.monotonic())
        await self.record_held()
        parts = [await self.folder.prepare(batch)]
        try:
            await self._gather(held, parts)
            # stopped while the commit before it or its files' checks outlast the grace
            # period (a disk that does not answer, a read that hangs): nak'ed as busd closes
            folded = None
            if await self.committed_unless_stopped():
                folded = await self._unless_stopped(self.folder.finish(merge(parts)))
        except BaseException:
            for p in parts:
                p.cancel()
            raise
        if folded is None:
            for p in parts:
                p.cancel()
            return
        self._commit_task = asyncio.ensure_future(self._commit_and_settle(folded, held))

    async def committed_unless_stopped(self) -> bool:
        """Wait for the commit under way, unless busd stops and it outlasts what is left of
        the grace period (False: given up, never acked)."""

        async def done() -> bool:
            await self.committed()
            return True

        return await self._unless_stopped(done()) is not None

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        """What ``work`` gives, or None when busd stops and it does not end within what is
        left of the stop's grace period (``consumer.shutdown_grace_s``): a stop waits for slow
        checks and commits, not for a read or an fsync that hangs. Nothing of a batch given
        up is acked, and what busd holds is nak'ed as it closes (a nak: a delivery on a
        consumer with a limit of its own)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=self.grace_left())
        except BaseException:
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return None

    async def _gather(self, held: list[model.Delivery], parts: list[Prepared]) -> None:
        """While the previous commit runs, fetch and prepare what is already coming: up to
        ``commit_max`` events and ``GROUP_BYTES`` of payloads (events may be 1 MiB each), and
        only while the file checks keep up — slow checks (large files to hash) must not
        queue minutes of work behind one commit, past the watchdog and the ack wait."""
        c, task = self.consumer, self._commit_task
        size = sum(len(d.data) for d in held)
        while (
            task is not None
            and not task.done()
            and len(held) < c.commit_max
            and size < GROUP_BYTES
            and not self.stopping()
            and self.folder.checker.seconds_for(
                sum(len(p.decoded) for p in parts if not p.checks.done())
            )
            < GATHER_CHECKS_S
        ):
            try:
                more = await self.src.fetch(
                    c.batch_max, c.batch_wait_ms, until=task, prefetch=lambda: not self.stopping()
                )
            except ConsumerGone:
                return  # the fetch loop's next fetch meets it again, and declares it again
            if not more:
                return
            self.ledger.hold(more, time.monotonic())
            await self.record_held()
            parts.append(await self.folder.prepare(more))
            held.extend(more)
            size += sum(len(d.data) for d in more)

    async def _commit_and_settle(self, folded: Folded, batch: Sequence[model.Delivery]) -> None:
        if folded.rows:
            folded.rows.exports = self.publisher.take_rows()
            await self._commit(folded.rows, batch)
            faults.hit("after_commit")
            self.lineage.offer(folded.rows)  # queued, never waited for
        await self._settle_batch(folded.decided, folded.touched)

    async def _commit(self, rows: Batch, batch: Sequence[model.Delivery]) -> None:
        """One catalog transaction; a transient failure is retried with the batch in hand."""
        delay_s = 0.5
        while True:
            started = time.perf_counter()
            self.progress.committing_since = time.monotonic()  # the keeper is patient
            try:
                changed = await self.on_writer(self.catalog.commit, rows)
                self.publisher.committed(changed)  # after the await: see Daemon._commit_rows
                break
            except FatalStorageError:
                raise
            except StorageError as exc:
                if self.stopping():
                    raise TransientError(f"stopping with a batch not committed: {exc}") from None
                # everything held stays ours meanwhile (the keeper says it is in progress)
                self.log.error(
                    "catalog commit failed; retrying", error=str(exc), retry_in_s=delay_s
                )
                self.progress.committing_since = None  # a failing commit is no progress
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
            finally:
                self.progress.committing_since = None
        self.progress.mark()
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.artifacts.inc(len(rows.artifacts))
        self._catalog_seq = max(self._catalog_seq, max(r[0] for r in rows.events))
        self.metrics.catalog_seq.set(self._catalog_seq)

    async def _settle_batch(self, decided: Sequence[Decided], touched: set[str]) -> None:
        settled = settle(decided, 0, time.monotonic())
        for item in settled.new:
            if item.outcome is not Outcome.COMMITTED or self.debug:
                level, message, fields = outcome_line(item)
                getattr(self.log, level)(message, **fields)
        for item in settled.naks:
            self.log.info(
                "file missing; retrying later",
                seq=item.d.seq,
                event_id=item.event_id,
                delay_s=round(item.nak_delay_s, 1),
            )
        self.outcomes.update(settled.outcomes)
        for outcome, n in settled.outcomes.items():
            self.metrics.events.labels(outcome=outcome).inc(n)
        for reason, n in settled.reasons.items():
            self.metrics.rejections.labels(reason=reason).inc(n)
        if settled.outcomes:  # one line per batch; each committed event at debug
            traced = trace_ids(settled.new)
            self.log.info(
                "batch",
                first_seq=decided[0].d.seq,
                last_seq=decided[-1].d.seq,
                **dict(settled.outcomes),
                **({"trace_ids": traced} if traced else {}),
            )
        if settled.waiting:  # acked after the export refresh that covers them
            generation = self.publisher.want(touched)
            self.ledger.wait([w.d for w in settled.waiting], generation, time.monotonic())
        # not sent: the server redelivers, the fold decides again (with its deaths counted)
        if await self.send(settled.now):
            self.forget(item.d.seq for item in decided if settlement(item.outcome) == "term")
        released = [
            item for item in decided if settlement(item.outcome) != "ack" and item.recheck_s is None
        ]
        self.ledger.release(item.d.seq for item in released)
        if any(settlement(item.outcome) == "nak" for item in released):
            # a nak'ed message comes back: the record must not say busd still holds it, or
            # a death before the next fetch counts one for it (toward poison)
            await self.record_held()
        self.rechecks.hold(settled.held, time.monotonic())  # still in the ledger, kept alive
        if settled.now or settled.held:
            self.progress.mark()


def trace_ids(items: Sequence[Decided]) -> list[str]:
    """The W3C trace ids of the events a batch decided, once each, in stream order: a job's
    trace leads to the line of the batch that committed it."""
    seen: dict[str, None] = {}
    for item in items:
        if item.traceparent is not None:
            seen.setdefault(item.traceparent[3:35], None)
    return list(seen)
