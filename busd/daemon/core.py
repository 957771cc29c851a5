"""The daemon: fetch → decode → validate → commit → export → settle, in batches.

This module orchestrates; the stages it calls (events, validate, catalog, exports) never call
each other. The export loop is the publisher's (:mod:`busd.daemon.publisher`), keep-alives
are the keeper's (:mod:`busd.daemon.keeper`); the fetch loop and the commits are here.
Settlement is decided in one place, :mod:`busd.settle`, and every ack goes out from
``_ack_through``. Nothing is acked before the catalog commit *and* the export refresh
covering it are durable; rejections are terminated once their rejection row is committed. A
transient failure keeps the messages in hand (and tells the server they are in progress)
rather than nak'ing them, so it never eats into max_deliver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from busd import faults, log, model, source
from busd.catalog import Catalog
from busd.config import Settings, parse_hostport
from busd.daemon.answers import Answers
from busd.daemon.keeper import Keeper, Progress
from busd.daemon.publisher import Publisher
from busd.embedded import EmbeddedServer
from busd.errors import (
    ConsumerGone,
    FatalStorageError,
    LeaseLost,
    Outcome,
    StorageError,
    TransientError,
)
from busd.exports import Exporter
from busd.fold import Folder, Prepared, merge
from busd.ha.backfill import Backfill
from busd.ha.follower import Follower, follow_until_leader
from busd.ha.lease import Lease
from busd.inflight import Ledger
from busd.metrics import Metrics, MetricsServer
from busd.model import Batch, Claim, Decided, Folded, Known, Sibling
from busd.sdnotify import SdNotifier
from busd.settle import Rechecks, outcome_line, settle, settlement

T = TypeVar("T")
GROUP_BYTES = 64 << 20  # a group commit stops gathering at this many bytes of payloads
GATHER_CHECKS_S = 5.0  # ... or when the file checks it queued would take longer than this


@dataclass
class Stats:
    outcomes: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    exports: int = 0


class Daemon:
    """``busd serve``: one durable pull consumer feeding one catalog writer."""

    def __init__(self, settings: Settings, *, drain: bool = False,
                 metrics: Metrics | None = None) -> None:
        self.s = settings
        self.drain = drain
        self.metrics = metrics or Metrics()
        self.log = log.get()
        self.notify = SdNotifier()
        self.stats = Stats()
        self.stopping = False
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="busd-writer")
        self._export_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="busd-export")
        self.catalog: Catalog | None = None
        self.folder: Folder | None = None
        self.lease: Lease | None = None
        self._backfill: Backfill | None = None  # after winning the lease, see standby.py
        self.exporter: Exporter | None = None
        self.embedded: EmbeddedServer | None = None
        self.nc: Any = None
        self.src: source.PullSource | None = None
        self.settler: source.Settler | None = None
        self.metrics_server: MetricsServer | None = None
        self.publisher: Publisher | None = None
        self.keeper: Keeper | None = None
        self.ledger = Ledger()  # every delivery held and not settled yet
        self.rechecks = Rechecks()  # held, not nak'ed: the machine failed to read their files
        self.progress = Progress()
        self._fatal: BaseException | None = None
        self._commit_task: asyncio.Future[None] | None = None
        self._active = True
        self._catalog_seq = 0
        self._pinged_at = 0.0
        self._ping_every_s = self.notify.watchdog_interval_s() or 1.0
        self._debug = log.debug_enabled()

    # ---- threads -------------------------------------------------------------------------
    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    async def _on_exporter(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._export_pool.submit(fn, *args))

    # ---- start and stop ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.s
        if s.metrics.listen:
            host, port = parse_hostport(s.metrics.listen, "metrics.listen")
            self.metrics_server = MetricsServer(self.metrics, host, port)
            self.metrics_server.start()
        self.catalog = await self._on_writer(Catalog, s.catalog_path)
        self.exporter = await self._on_writer(Exporter.of, self.catalog.cursor(), s)
        await self._on_exporter(self.exporter.check)
        self.publisher = Publisher(self.exporter, self.catalog, metrics=self.metrics,
                                   on_exporter=self._on_exporter, on_writer=self._on_writer,
                                   progress=self.progress.mark)
        self.metrics.watch_exports(list(self.exporter.exports))
        self.folder = Folder(s, self)
        await self.folder.checker.start()
        url = s.nats.url
        if not url:
            host, port = parse_hostport(s.nats.embedded_listen, "nats.embedded_listen")
            self.embedded = EmbeddedServer(host, port, s.data_path / "nats")
            url = await anyio.to_thread.run_sync(self.embedded.start)
            self.log.info("embedded nats-server started", url=url)
        self.nc = await self._connect_when_up(url)
        if self.nc is None:  # stopped before NATS answered
            return
        for problem in await source.ensure_stream(self.nc, s):
            self.log.warning("stream breaks a promise", stream=s.nats.stream, problem=problem)

    async def _connect_when_up(self, url: str) -> Any:
        """Connect, however long NATS takes to answer (docs/reference/daemon.md: serve waits,
        says so at once and every WAITING_SAID_EVERY_S, in the log and to systemd, and stays
        unready). None when told to stop meanwhile."""
        nc: Any = None
        said_at: float | None = None
        what = f"waiting for NATS at {url}"
        self.metrics.nats_connected.set(0)

        async def attempts() -> None:
            nonlocal nc, said_at
            while nc is None:
                try:
                    nc = await source.connect(self.s.nats, url, on_state=self._on_nats_state)
                except source.NatsUnreachable as exc:
                    if said_at is None or time.monotonic() - said_at >= \
                            source.WAITING_SAID_EVERY_S:
                        said_at = time.monotonic()
                        self.log.warning(what, url=url, error=str(exc))
                        self.notify.status(what, extend_start_s=2 * source.WAITING_SAID_EVERY_S)
                    await anyio.sleep(source.WAITING_RETRY_S)
            tg.cancel_scope.cancel()

        async def stop_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    self.log.info("stopping", signal=signal.Signals(signum).name)
                    self.stopping = True
                    tg.cancel_scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_signal)
            tg.start_soon(attempts)
        if said_at is not None and nc is not None:
            self.log.info("NATS answered", url=url)
        return nc

    async def _activate(self) -> None:
        """Bind the durable consumer and start serving (after winning the lease, with HA)."""
        s = self.s
        assert self.catalog is not None and self.exporter is not None
        assert self.publisher is not None
        await source.ensure_consumer(self.nc, s)
        seq = await self._on_writer(self.catalog.catalog_seq)
        self._catalog_seq = seq
        self.metrics.catalog_seq.set(seq)
        stale = await self._on_exporter(self.exporter.stale, seq)
        if stale:
            self.log.info("refreshing exports older than the catalog", exports=stale)
            await self.publisher.refresh(stale)
        self.src = source.PullSource(self.nc, s.nats.stream, s.nats.consumer)
        await self.src.start()
        self.settler = source.Settler(self.nc)
        answers = Answers(self._on_writer, self.catalog, list(self.exporter.exports),
                          self.ledger.waiting, self.publisher.refresh)
        await self.nc.subscribe(model.subject(s.nats.consumer, "*"), cb=answers.respond)
        publisher = self.publisher
        self.keeper = Keeper(
            s, self.nc, self.src, ledger=self.ledger, exporter=self.exporter,
            metrics=self.metrics, notify=self.notify, progress=self.progress,
            outcomes=lambda: dict(self.stats.outcomes), lease=self.lease,
            lease_ok=lambda renew: self._lease_ok(renew=renew), send=self._send,
            ack_late=lambda: self._ack_through(publisher.exported_generation),
            record_exports=lambda: publisher.record_when_idle(self._commit_task is not None),
            recreate_consumer=self._recreate_consumer)
        await self.keeper.measure_lag()  # before ready: an alert must never see a lag of 0
        self.log.info("busd ready", stream=s.nats.stream, consumer=s.nats.consumer,
                      catalog=str(s.catalog_path), catalog_seq=seq)
        self.metrics.ready.set(1)
        self.notify.ready()

    def _on_nats_state(self, connected: bool) -> None:
        self.metrics.nats_connected.set(1 if connected else 0)
        if self.src is not None:  # ready means bound to the consumer, not just connected
            self.metrics.ready.set(1 if connected else 0)
        self.log.info("nats connected" if connected else "nats disconnected")

    async def close(self) -> None:
        self.metrics.ready.set(0)
        if self.src is not None:
            await self.src.stop()  # unsubscribe first: nothing arrives after the naks below
            # what is held and not acked goes back to the server now, not after ack_wait
            leftovers = [*self.ledger.held(), *self.src.take_buffered()]
            await self._send([(d.reply, model.nak_body(0)) for d in leftovers])
        if self.lease is not None and self._fatal is None and self._active:
            await self.lease.release()
        if self._backfill is not None:
            await self._backfill.stop()
        if self.nc is not None:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()
        task, self._commit_task = self._commit_task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        if self.folder is not None:
            await self.folder.close()
        # the export thread's cursor must be idle before the catalog's connection closes
        await anyio.to_thread.run_sync(self._export_pool.shutdown)
        if self.catalog is not None:
            if self.publisher is not None:
                with contextlib.suppress(Exception):
                    await self.publisher.record_when_idle(False)
            await self._on_writer(self.catalog.close)
        self._writer.shutdown()
        if self.embedded is not None:
            await anyio.to_thread.run_sync(self.embedded.stop)
        if self.metrics_server is not None:
            self.metrics_server.stop()

    # ---- the main loop -------------------------------------------------------------------
    async def run(self) -> Stats:
        """Serve until SIGTERM/SIGINT (or, in drain mode, until the stream is empty)."""
        try:
            await self.start()
            await self._serve()
        except BaseExceptionGroup as group:  # one failure in a task: report it, not the group
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
        finally:
            self.notify.stopping()
            with anyio.CancelScope(shield=True):
                await self.close()
        if self._fatal is not None:
            raise self._fatal
        exports = self.publisher.refreshes if self.publisher is not None else 0
        self.log.info("busd stopped", batches=self.stats.batches, exports=exports,
                      **dict(self.stats.outcomes))
        return self.stats

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals)
            if self.s.ha.enabled and not self.stopping:  # stopped while waiting for NATS
                await self._standby()
            if not self.stopping:
                await self._activate()
                assert self.publisher is not None and self.keeper is not None
                tg.start_soon(self.publisher.run, self._ack_through)
                tg.start_soon(self.publisher.sweep_loop)
                tg.start_soon(self.keeper.run)
                await self._fetch_loop()
                await self._finish()
            tg.cancel_scope.cancel()

    # ---- hot standby ---------------------------------------------------------------------
    async def _standby(self) -> None:
        """Follow the stream into our own catalog until we win the lease (or are stopped)."""
        assert self.publisher is not None
        self.lease = Lease(self.nc, self.s)
        await self.lease.open()
        if await self.lease.acquire():
            self._set_active(True)
            await self._start_backfill()
            return
        self._set_active(False)
        self.notify.ready()
        self.notify.status("standby")
        self.log.info("standby: following the stream", holder=await self.lease.holder())
        assert self.catalog is not None
        assert self.folder is not None
        follower = Follower(self.s, self.nc, self, self._commit_rows, self.folder.checker)
        await follower.start(await self._on_writer(self.catalog.catalog_seq))
        try:
            leader = await follow_until_leader(self.lease, follower,
                                               self.publisher.refresh_changed, self._alive,
                                               lambda: self.stopping)
        finally:
            await follower.stop()
        if leader:
            self._set_active(True)
            self.log.warning("took over the lease: active now", instance=self.lease.me)
            await self._start_backfill(follower.folder.quarantined)

    async def _start_backfill(self, quarantined: dict[int, str] | None = None) -> None:
        assert self.catalog is not None and self.folder is not None
        assert self.publisher is not None
        catalog = self.catalog
        self._backfill = await Backfill.start(
            self.s, self.nc, self, self._commit_rows, self.folder.checker,
            lambda after: self._on_writer(catalog.recorded_through, after), quarantined or {},
            self.publisher.touched)

    async def _lease_ok(self, *, renew: bool = False) -> bool:
        """Renew or check the lease. Lost: stop acking for good and raise LeaseLost, which
        ends the daemon (exit 1). A NATS error: False, not now (nothing is settled; the
        messages wait or are redelivered)."""
        if self.lease is None:
            return False
        try:
            await (self.lease.renew() if renew else self.lease.check())
        except LeaseLost as exc:
            self._lost_lease(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - NATS reconnecting: decide later
            self.log.warning("cannot reach the lease; not settling now", error=str(exc))
            return False
        return True

    def _set_active(self, active: bool) -> None:
        self._active = active
        self.metrics.active.set(1 if active else 0)

    def _lost_lease(self, exc: LeaseLost) -> None:
        """Stop acking at once: another instance owns the stream now. Exit 1 follows."""
        self.log.error("lost the lease; not acking any more", error=str(exc))
        self._fatal = exc
        self.stopping = True
        self.lease = None
        self.settler = None

    async def _commit_rows(self, rows: Batch) -> None:
        assert self.catalog is not None and self.publisher is not None
        # awaited first: the export loop may take the changes while the commit runs, and
        # these belong to the set the next refresh takes, not to the one it took
        changed = await self._on_writer(self.catalog.commit, rows)
        self.publisher.committed(changed)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                self.log.info("stopping", signal=signal.Signals(signum).name)
                self.stopping = True
                self.notify.stopping()
                return

    async def _fetch_loop(self) -> None:
        assert self.src is not None
        c = self.s.consumer
        try:
            while not self.stopping:
                if self._backfill is not None and self._backfill.due():
                    await self._committed()  # the backfill reads the catalog, then commits
                    if await self._backfill.step():
                        self._backfill = None
                try:
                    batch = await self.src.fetch(c.batch_max, c.batch_wait_ms,
                                                 prefetch=lambda: not self.stopping)
                except ConsumerGone as exc:
                    await self._recreate_consumer(str(exc))
                    continue
                batch = [*self.rechecks.due(time.monotonic()), *batch]
                if batch:
                    await self._handle(batch)
                    self.stats.batches += 1
                else:
                    await self._committed()
                    if self.drain and await self._drained():
                        return
                if self._fatal is not None:
                    return
        finally:
            await self._committed()

    async def _recreate_consumer(self, why: str) -> None:
        """The durable consumer was deleted under busd: say so and declare it again (the
        catalog recognises what it already holds); if the stream is gone too, exit."""
        self.log.error("the durable consumer is gone; recreating it", reason=why)
        await source.redeclare_consumer(self.nc, self.s)
        assert self.src is not None
        self.src.reset()

    def _alive(self) -> None:
        """Ping systemd's watchdog at most once per half watchdog period, from the follow
        loop in standby (the keeper pings while active)."""
        now = time.monotonic()
        if now - self._pinged_at >= self._ping_every_s:
            self._pinged_at = now
            self.notify.watchdog()

    async def _committed(self) -> None:
        """Wait for the batch whose commit is under way (and its settlement)."""
        task, self._commit_task = self._commit_task, None
        if task is not None:
            await task

    async def _drained(self) -> bool:
        assert self.publisher is not None
        if self.ledger.waiting or self.publisher.pending() or self._backfill is not None:
            return False
        pending, ack_pending = await source.consumer_state(self.nc, self.s)
        return pending == 0 and ack_pending == 0

    async def _finish(self) -> None:
        """Shutdown: export and settle everything committed, within the grace period."""
        assert self.publisher is not None
        with anyio.move_on_after(self.s.consumer.shutdown_grace_s):
            while (self.ledger.waiting or self.publisher.pending()) and self._fatal is None:
                await self.publisher.until_idle()

    # ---- one batch -----------------------------------------------------------------------
    async def _handle(self, batch: Sequence[model.Delivery]) -> None:
        """Decode a batch and check its files while the previous batch commits; batches
        that arrive during that commit join this one (a group commit: under a backlog one
        transaction, export refresh and ack flush cover up to ``commit_max`` events). The
        group reads the catalog only once the previous commit is done."""
        assert self.folder is not None
        held = list(batch)
        self.ledger.hold(batch, time.monotonic())
        parts = [self.folder.prepare(batch)]
        try:
            await self._gather(held, parts)
            await self._committed()
        except BaseException:
            for p in parts:
                p.cancel()
            raise
        folded = await self.folder.finish(merge(parts))
        self._commit_task = asyncio.ensure_future(self._commit_and_settle(folded, held))

    async def _gather(self, held: list[model.Delivery], parts: list[Prepared]) -> None:
        """While the previous commit runs, fetch and prepare what is already coming: up to
        ``commit_max`` events and ``GROUP_BYTES`` of payloads (events may be 1 MiB each), and
        only while the file checks keep up — slow checks (large files to hash) must not
        queue minutes of work behind one commit, past the watchdog and the ack wait."""
        assert self.folder is not None and self.src is not None
        c, task = self.s.consumer, self._commit_task
        size = sum(len(d.data) for d in held)
        while (task is not None and not task.done() and len(held) < c.commit_max
               and size < GROUP_BYTES and not self.stopping
               and self.folder.checker.seconds_for(
                   sum(len(p.decoded) for p in parts if not p.checks.done())) < GATHER_CHECKS_S):
            try:
                more = await self.src.fetch(c.batch_max, c.batch_wait_ms, until=task,
                                            prefetch=lambda: not self.stopping)
            except ConsumerGone:
                return  # the fetch loop's next fetch meets it again, and declares it again
            if not more:
                return
            self.ledger.hold(more, time.monotonic())
            parts.append(self.folder.prepare(more))
            held.extend(more)
            size += sum(len(d.data) for d in more)

    async def _commit_and_settle(self, folded: Folded, batch: Sequence[model.Delivery]) -> None:
        assert self.publisher is not None
        if folded.rows:
            folded.rows.exports = self.publisher.take_rows()
            await self._commit(folded.rows, batch)
            faults.hit("after_commit")
        await self._settle_batch(folded.decided, folded.touched)

    # the fold's Store: catalog reads on the writer thread, payloads from the stream
    async def lookup(self, seqs: Sequence[int], event_ids: Sequence[str]
                     ) -> tuple[dict[int, Known], dict[str, Claim]]:
        assert self.catalog is not None
        return await self._on_writer(self.catalog.lookup, seqs, event_ids)

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]:
        assert self.catalog is not None
        return await self._on_writer(self.catalog.siblings, event_id, after_seq)

    async def payload(self, seq: int) -> bytes:
        return await source.stored_payload(self.nc, self.s.nats.stream, seq)

    async def _commit(self, rows: Batch, batch: Sequence[model.Delivery]) -> None:
        """One catalog transaction; a transient failure is retried with the batch in hand."""
        assert self.catalog is not None and self.publisher is not None
        delay_s = 0.5
        while True:
            started = time.perf_counter()
            try:
                changed = await self._on_writer(self.catalog.commit, rows)
                self.publisher.committed(changed)  # after the await: see _commit_rows
                break
            except FatalStorageError:
                raise
            except StorageError as exc:
                if self.stopping or self._fatal is not None:
                    raise TransientError(f"stopping with a batch not committed: {exc}") from None
                # everything held stays ours meanwhile (the keeper says it is in progress)
                self.log.error("catalog commit failed; retrying", error=str(exc),
                               retry_in_s=delay_s)
                await anyio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
        self.progress.mark()
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.artifacts.inc(len(rows.artifacts))
        self._catalog_seq = max(self._catalog_seq, max(r[0] for r in rows.events))
        self.metrics.catalog_seq.set(self._catalog_seq)

    async def _settle_batch(self, decided: Sequence[Decided], touched: set[str]) -> None:
        assert self.publisher is not None
        settled = settle(decided, 0, time.monotonic())
        for item in settled.new:
            if item.outcome is not Outcome.COMMITTED or self._debug:
                level, message, fields = outcome_line(item)
                getattr(self.log, level)(message, **fields)
        for item in settled.naks:
            self.log.info("file missing; retrying later", seq=item.d.seq,
                          event_id=item.event_id, delay_s=round(item.nak_delay_s, 1))
        self.stats.outcomes.update(settled.outcomes)
        for outcome, n in settled.outcomes.items():
            self.metrics.events.labels(outcome=outcome).inc(n)
        for reason, n in settled.reasons.items():
            self.metrics.rejections.labels(reason=reason).inc(n)
        if settled.outcomes:  # one line per batch; each committed event at debug
            self.log.info("batch", first_seq=decided[0].d.seq, last_seq=decided[-1].d.seq,
                          **dict(settled.outcomes))
        if settled.waiting:  # acked after the export refresh that covers them
            generation = self.publisher.want(touched)
            self.ledger.wait([w.d for w in settled.waiting], generation, time.monotonic())
        await self._send(settled.now)  # not sent: the server redelivers, the fold decides again
        self.ledger.release(item.d.seq for item in decided
                            if settlement(item.outcome) != "ack" and item.recheck_s is None)
        self.rechecks.hold(settled.held, time.monotonic())  # still in the ledger, kept alive
        if settled.now or settled.held:
            self.progress.mark()

    async def _send(self, items: Sequence[tuple[str, bytes]]) -> bool:
        """Send settlements; False when they could not go out now (the caller keeps acks)."""
        if not items:
            return True
        if self.settler is None:
            return False
        # the lease is checked before anything is settled for good (ack or term); naks and
        # progress never settle, they may go out whoever holds the lease
        final = any(body in (model.ACK, model.TERM) for _, body in items)
        if final and self.lease is not None:
            if not await self._lease_ok():
                return False
            faults.hit("after_lease_check")
        try:
            await self.settler.send(items)
        except Exception as exc:  # noqa: BLE001 - NATS down: retried, or redelivered
            self.log.warning("could not settle messages now", count=len(items),
                             error=str(exc) or type(exc).__name__)
            return False
        return True


    async def _ack_through(self, generation: int) -> None:
        """Ack every committed message a refresh of ``generation`` covers (the only acks)."""
        done = self.ledger.ackable(generation)
        if not done:
            return
        faults.hit("before_ack")
        if not await self._send([(w.d.reply, model.ACK) for w in done]):
            return  # they stay in the ledger: the keeper acks them once it can
        faults.hit("after_ack")
        self.ledger.release(w.d.seq for w in done)
        now = time.time()
        for w in done:
            self.metrics.event_latency.observe(max(0.0, now - w.d.published_ns / 1e9))
        self.progress.mark()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups inside it (task groups nest)."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def serve(settings: Settings, *, drain: bool = False) -> Stats:
    return await Daemon(settings, drain=drain).run()
