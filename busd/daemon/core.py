"""The daemon: fetch → decode → validate → commit → export → settle, in batches.

This module orchestrates; the stages it calls (events, validate, catalog, exports) never call
each other. Each piece of state has one owner: the export loop is the publisher's
(:mod:`busd.daemon.publisher`), keep-alives the keeper's (:mod:`busd.daemon.keeper`), commits
and settlement decisions the committer's (:mod:`busd.daemon.committer`), what goes out on the
wire :mod:`busd.daemon.acks`'s, the record of messages held :mod:`busd.daemon.held`'s, the
lease and the backfill :mod:`busd.ha.role`'s; the fetch loop, the start and the stop are here.
Nothing is acked before the catalog commit *and* the export refresh covering it are durable;
rejections are terminated once their rejection row is committed. A transient failure keeps
the messages in hand (and tells the server they are in progress) rather than nak'ing them, so
it never eats into max_deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from busd import log, model, source
from busd.catalog import Catalog
from busd.checker import Checker
from busd.config import Settings, parse_hostport
from busd.daemon.acks import Acks
from busd.daemon.answers import Answers
from busd.daemon.committer import Committer
from busd.daemon.connect import connect_when_up, when_answered, workers_when_up
from busd.daemon.held import HeldRecord, a_death
from busd.daemon.keeper import REFRESH_PATIENCE, Keeper, Progress, Watchdog
from busd.daemon.publisher import PAUSE_MAX_S, Publisher
from busd.daemon.stop import IGNORED, install_signals, leave_behind, leaves, restore
from busd.daemon.store import LiveStore
from busd.daemon.threads import IDLE_STOP_S, CatalogThreads
from busd.embedded import EmbeddedServer
from busd.errors import (
    ConsumerGone,
    FatalStorageError,
    LeaseLost,
    PullUnanswered,
    StorageError,
)
from busd.exports import Exporter
from busd.fold import Folder
from busd.ha.role import Role
from busd.inflight import Ledger
from busd.lineage import Lineage
from busd.metrics import Metrics, MetricsServer
from busd.model import Batch
from busd.sdnotify import SdNotifier
from busd.settle import Rechecks

T = TypeVar("T")


@dataclass
class Stats:
    outcomes: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    exports: int = 0  # export refreshes (the publisher counts them)


class Daemon:
    """``busd serve``: one durable pull consumer feeding one catalog writer."""

    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool = False,
        metrics: Metrics | None = None,
        restore_signals: bool = True,
    ) -> None:
        self.settings = settings
        self.drain = drain
        self.restore_signals = restore_signals
        self.metrics = metrics or Metrics()
        self.log = log.get()
        self.notify = SdNotifier()
        self.stats = Stats()
        self._stopping = False
        self._stop_at: float | None = None
        self.stop_event = asyncio.Event()  # set with `stopping`: waits on work give up
        self.catalog: Catalog | None = None
        self.checker: Checker | None = None
        self.folder: Folder | None = None
        self.store: LiveStore | None = None
        self.role: Role | None = None  # active or standby: the lease, the backfill
        self.exporter: Exporter | None = None
        self.embedded: EmbeddedServer | None = None
        self.nc: Any = None
        self.src: source.PullSource | None = None
        self.acks: Acks | None = None  # what settles messages goes out there
        self.metrics_server: MetricsServer | None = None
        self.publisher: Publisher | None = None
        self.keeper: Keeper | None = None
        self.ledger = Ledger()  # every delivery held and not settled yet
        self.rechecks = Rechecks()  # held, not nak'ed: the machine failed to read their files
        self.progress = Progress()
        self._unanswered_said_at = -math.inf  # "pull requests unanswered", last said
        self.threads = CatalogThreads(self.progress)
        self._on_writer = self.threads.on_writer
        self._on_exporter = self.threads.on_exporter
        self.held = HeldRecord(
            settings.catalog_path.with_name("held.json"), self.ledger, self.progress
        )
        self._fatal: BaseException | None = None
        self.committer: Committer | None = None
        self.lineage = Lineage(
            settings.lineage,
            self.metrics,
            publish=lambda subject, body: self.nc.publish(subject, body),
        )
        self.watchdog = Watchdog(self.notify)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        if value:
            self.stop_event.set()
            self._grace_left()

    def _grace_left(self) -> float:
        """What is left of the grace period that began with the stop (now, if not yet): the
        waits of a stop for a commit, file checks and the last refresh share it."""
        now = time.monotonic()
        if self._stop_at is None:
            self._stop_at = now
        return max(0.0, self._stop_at + self.settings.consumer.shutdown_grace_s - now)

    # ---- start and stop ------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        v = s.verify
        self.checker = Checker(
            s.roots,
            v.checksum,
            processes=v.processes,
            threads=v.threads,
            settle_s=v.settle_s,
            timeout_s=v.check_timeout_s,
        )
        await self.checker.start()  # they import pyarrow while the catalog opens
        if s.metrics.listen:
            host, port = parse_hostport(s.metrics.listen, "metrics.listen")
            self.metrics_server = MetricsServer(self.metrics, host, port)
            self.metrics_server.start()
        self.catalog = await self._on_writer(
            lambda: Catalog(s.catalog_path, memory_limit_mb=s.catalog.memory_limit_mb)
        )
        if self.lineage.enabled:  # a reader of its own: the kinds of parent runs
            self.lineage.cursor = await self._on_writer(self.catalog.cursor)
        self.exporter = await self._on_writer(Exporter.of, self.catalog.cursor(), s)
        await self._on_exporter(self.exporter.check)
        self.publisher = Publisher(
            self.exporter,
            self.catalog,
            metrics=self.metrics,
            on_exporter=self._on_exporter,
            on_writer=self._on_writer,
            progress=self.progress.mark,
            # the pause that coalesces batches is no progress: well inside a stall period
            pause_max_s=min(PAUSE_MAX_S, s.consumer.stall_s / 4),
        )
        self.metrics.watch_exports(list(self.exporter.exports))
        url = s.nats.url
        if not url:
            host, port = parse_hostport(s.nats.embedded_listen, "nats.embedded_listen")
            self.embedded = EmbeddedServer(host, port, s.data_path / "nats")
            url = await anyio.to_thread.run_sync(self.embedded.start)
            self.log.info("embedded nats-server started", url=url)
        self.nc = await connect_when_up(
            s.nats,
            url,
            metrics=self.metrics,
            notify=self.notify,
            on_state=self._on_nats_state,
            stopped=self.stop_event,
        )
        if self.nc is None:  # stopped before NATS answered
            self.stopping = True
            return
        self.store = LiveStore(
            self.catalog, self._on_writer, self.nc, s.nats.stream, self._jetstream_patience_s()
        )
        deaths = await anyio.to_thread.run_sync(self.held.load)  # busd's deaths holding each
        self.folder = Folder(s, self.store, checker=self.checker, deaths=deaths)
        catalog = self.catalog
        self.role = Role(
            s,
            self.nc,
            self.store,
            self.checker,
            commit_rows=self._commit_rows,
            recorded_through=lambda after: self._on_writer(catalog.recorded_through, after),
            refresh_changed=self.publisher.refresh_changed,
            touched=self.publisher.touched,
            notify=self.notify,
            metrics=self.metrics,
            alive=self.watchdog.alive,
            ping_every_s=self.watchdog.every_s,
            stopping=lambda: self.stopping,
            on_lost=self._lost_lease,
            answered=self._answered,
            patience_s=REFRESH_PATIENCE * s.consumer.stall_s,
        )
        nc = self.nc
        problems = await self._answered(lambda: source.ensure_stream(nc, s), "declare the stream")
        if problems is None:  # stopped while NATS did not answer
            self.stopping = True
            return
        for problem in problems:
            self.log.warning("stream breaks a promise", stream=s.nats.stream, problem=problem)

    async def _activate(self) -> bool:
        """Bind the durable consumer and start serving (after winning the lease, with HA);
        False when stopped while NATS did not answer."""
        s = self.settings
        assert self.catalog is not None and self.exporter is not None
        assert self.publisher is not None
        nc = self.nc
        info = await self._answered(lambda: source.ensure_consumer(nc, s), "bind the consumer")
        if info is None:
            return False
        deaths = self.held.deaths
        assert self.folder is not None and deaths is not None
        self.folder.server_max_deliver = int(info.config.max_deliver or -1)
        if info.ack_floor is not None:
            deaths.settled_through(int(info.ack_floor.stream_seq or 0))
        seq = await self._on_writer(self.catalog.catalog_seq)
        self.metrics.catalog_seq.set(seq)
        stale = await self._on_exporter(self.exporter.stale, seq)
        if stale:
            self.log.info("refreshing exports older than the catalog", exports=stale)
            try:
                await self.publisher.refresh(stale)
            except FatalStorageError:
                raise
            except StorageError as exc:  # a full disk: no reason not to start; acks wait
                self.log.error("export refresh failed at start; retried, acks wait", error=str(exc))
                self.publisher.stale(stale)
        self.src = source.PullSource(self.nc, s.nats.stream, s.nats.consumer)
        await self.src.start()
        self.acks = acks = Acks(
            source.Settler(self.nc),
            self.ledger,
            deaths,
            self.role,
            self.metrics,
            self.progress,
        )
        answers = Answers(
            self._on_writer,
            self.catalog,
            list(self.exporter.exports),
            self.ledger.waiting,
            self.publisher.refresh,
        )
        await self.nc.subscribe(model.subject(s.nats.consumer, "*"), cb=answers.respond)
        publisher = self.publisher
        assert self.folder is not None
        self.committer = Committer(
            s.consumer,
            self.src,
            folder=self.folder,
            catalog=self.catalog,
            on_writer=self._on_writer,
            publisher=publisher,
            lineage=self.lineage,
            ledger=self.ledger,
            rechecks=self.rechecks,
            metrics=self.metrics,
            progress=self.progress,
            outcomes=self.stats.outcomes,
            catalog_seq=seq,
            send=acks.send,
            stopping=lambda: self.stopping,
            stopped=self.stop_event,
            grace_left=self._grace_left,
            record_held=self.held.record,
            forget=deaths.forget,
        )
        self.keeper = Keeper(
            s,
            self.nc,
            self.src,
            ledger=self.ledger,
            exporter=self.exporter,
            checker=self.folder.checker,
            metrics=self.metrics,
            notify=self.notify,
            watchdog=self.watchdog,
            progress=self.progress,
            outcomes=lambda: dict(self.stats.outcomes),
            send=acks.send,
            ack_late=lambda: acks.ack_through(publisher.exported_generation),
            recreate_consumer=self._recreate_consumer,
        )
        # before ready: an alert must never see a lag of 0
        if await self._answered(self._measured, "measure the lag") is None:
            return False
        self.log.info(
            "busd ready",
            stream=s.nats.stream,
            consumer=s.nats.consumer,
            catalog=str(s.catalog_path),
            catalog_seq=seq,
        )
        for root in s.roots:
            if not os.access(root, os.X_OK) or not root.is_dir():
                self.log.warning(
                    "busd cannot enter an artifact root: events naming files under it are "
                    "held in hand until it can (they take up consumer.max_ack_pending)",
                    root=str(root),
                )
        self.metrics.ready.set(1)
        self.notify.ready()
        return True

    async def _workers_up(self) -> bool:
        """Wait until the file-check workers answer (False: stopped first); at once as a
        rule, they were started with busd. Nothing is fetched, and no lease taken, before: a
        busd that exits or nak's because workers cannot run would use up deliveries toward
        poison at each restart. ``/readyz`` says 503 meanwhile."""
        assert self.checker is not None

        def waiting() -> None:
            self.metrics.ready.set(0)

        up = await workers_when_up(
            self.checker, notify=self.notify, stopping=lambda: self.stopping, waiting=waiting
        )
        if self.src is not None:  # bound: ready again (as far as NATS goes)
            self.metrics.ready.set(1 if up and self.nc.is_connected else 0)
        return up

    def _on_nats_state(self, connected: bool) -> None:
        self.metrics.nats_connected.set(1 if connected else 0)
        if self.src is not None:  # ready means bound to the consumer, not just connected
            self.metrics.ready.set(1 if connected else 0)
        self.log.info("nats connected" if connected else "nats disconnected")

    async def close(self) -> None:
        self.metrics.ready.set(0)
        # one grace period for what goes to NATS: a server that does not answer (stopped, a
        # network that drops everything) must not hold the stop; what was not sent is
        # redelivered after the ack wait, and a standby takes the lease after its TTL
        with anyio.move_on_after(self.settings.consumer.shutdown_grace_s) as waited:
            await self._close_nats()
        if waited.cancelled_caught:
            self.log.warning("NATS does not answer the stop; closing without it")
        if self.nc is not None and not self.nc.is_closed:
            with anyio.move_on_after(IDLE_STOP_S), contextlib.suppress(Exception):
                # NATS gone meanwhile: closing raises too (ConnectionResetError), and must
                # not take the place of the reason busd stops
                await self.nc.close()
        # one grace period for what waits on the disk below (a commit, the export thread,
        # the catalog's close): a disk that does not answer must not keep busd from exiting
        grace_s = self.settings.consumer.shutdown_grace_s
        deadline = time.monotonic() + grace_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self.committer is not None:
            with anyio.move_on_after(left()), contextlib.suppress(Exception):
                await self.committer.committed()  # given up: never acked, redelivered
        if self.folder is not None:
            await self.folder.close()
        elif self.checker is not None:
            await self.checker.close()
        # its reader, before the catalog; stuck in a read of a disk that does not answer, it
        # is left behind (its pool's threads would hold the interpreter's exit)
        with anyio.move_on_after(left()) as waited:
            await anyio.to_thread.run_sync(self.lineage.close, abandon_on_cancel=True)
        if waited.cancelled_caught:
            self.log.error("the lineage thread is stuck in a read; exiting without it")
            leave_behind(self.lineage)
        await self.threads.close(self.catalog, self.publisher, grace_s, left)
        if self.embedded is not None:
            await anyio.to_thread.run_sync(self.embedded.stop)
        if self.metrics_server is not None:
            self.metrics_server.stop()

    async def _close_nats(self) -> None:
        if self.src is not None:
            await self.src.stop()  # unsubscribe first: nothing arrives after the naks below
            # what is held and not acked goes back to the server now, not after ack_wait
            leftovers = [*self.ledger.held(), *self.src.take_buffered()]
            if self.acks is not None:
                await self.acks.send([(d.reply, model.nak_body(0)) for d in leftovers])
        if self.role is not None:
            await self.role.close(failed=self._fatal is not None)
        if self.nc is not None:
            with contextlib.suppress(Exception):  # closed below all the same
                await self.nc.drain()

    # ---- the main loop -------------------------------------------------------------------
    async def run(self) -> Stats:
        """Serve until SIGTERM/SIGINT (or, in drain mode, until the stream is empty)."""
        died: BaseException | None = None
        before = install_signals(self._on_signal)
        try:
            await self.start()
            await self._serve()
        except BaseExceptionGroup as group:  # one failure in a task: report it, not the group
            found = leaves(group)
            died = next((leaf for leaf in found if a_death(leaf)), found[0])
            if len(found) == 1 and isinstance(found[0], Exception):
                raise found[0] from None
            raise
        except BaseException as exc:
            died = exc
            raise
        finally:
            self.notify.stopping()
            try:
                with anyio.CancelScope(shield=True):
                    await self.close()
                    await self.held.close(
                        died or self._fatal, self.settings.consumer.shutdown_grace_s
                    )
            finally:
                # from here to the exit, a stop signal is ignored by the kernel: Python puts
                # the default action back for its own handlers as the interpreter finalizes
                restore(before if self.restore_signals else IGNORED)
        if self._fatal is not None:
            raise self._fatal
        self.stats.exports = self.publisher.refreshes if self.publisher is not None else 0
        self.log.info(
            "busd stopped",
            batches=self.stats.batches,
            exports=self.stats.exports,
            **dict(self.stats.outcomes),
        )
        return self.stats

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            # stopped while waiting for NATS, or for the workers (before the lease: a busd
            # that cannot check files must not hold it)
            role, ha = self.role, self.settings.ha.enabled
            if role is not None and ha and not self.stopping and await self._workers_up():
                quarantined = await role.stand_by()
                if role.lease is not None and not self.stopping:
                    # renewed from the moment it is won: the backfill's start and a refresh of
                    # stale exports come before the keeper runs, and may outlast the TTL
                    tg.start_soon(role.keep_lease)
                    tg.start_soon(self._ping_while_starting)
                    await role.start_backfill(quarantined)
            if not ha and not self.stopping:
                tg.start_soon(self._ping_while_starting)
            if not self.stopping and await self._activate():
                assert self.publisher is not None and self.keeper is not None
                assert self.acks is not None
                tg.start_soon(self.publisher.run, self.acks.ack_through)
                tg.start_soon(self.publisher.sweep_loop, self._committing)
                tg.start_soon(self.keeper.run)
                tg.start_soon(self.lineage.run)
                await self._fetch_loop()
                await self._finish()
                await self.lineage.flush(min(5.0, self.settings.consumer.shutdown_grace_s))
            tg.cancel_scope.cancel()

    def _lost_lease(self, exc: LeaseLost) -> None:
        """Stop acking at once: another instance owns the stream now. Exit 1 follows."""
        self._fatal = exc
        self.stopping = True
        if self.acks is not None:
            self.acks.settler = None

    async def _commit_rows(self, rows: Batch) -> None:
        assert self.catalog is not None and self.publisher is not None
        # awaited first: the export loop may take the changes while the commit runs, and
        # these belong to the set the next refresh takes, not to the one it took
        changed = await self._on_writer(self.catalog.commit, rows)
        self.publisher.committed(changed)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            self.log.info("already stopping", signal=name)
            return
        self.log.info("stopping", signal=name)
        self.stopping = True
        self.notify.stopping()

    def _committing(self) -> bool:
        return self.committer is not None and self.committer.committing()

    async def _fetch_loop(self) -> None:
        assert self.src is not None and self.committer is not None
        committer = self.committer
        c = self.settings.consumer
        try:
            if not await self._workers_up():  # before the first fetch
                return
            while not self.stopping:
                backfill = self.role.backfill if self.role is not None else None
                if backfill is not None and backfill.due():
                    # the backfill reads the catalog, then commits
                    await committer.committed_unless_stopped()
                    if await backfill.step() and self.role is not None:
                        self.role.backfill = None
                try:
                    batch = await self.src.fetch(
                        c.batch_max, c.batch_wait_ms, prefetch=lambda: not self.stopping
                    )
                except ConsumerGone as exc:
                    await self._recreate_consumer(exc)
                    continue
                batch = [*self.rechecks.due(time.monotonic()), *batch]
                if batch:
                    await committer.handle(batch)
                    self.stats.batches += 1
                else:  # a stop does not wait for a commit on a disk that does not answer
                    await committer.committed_unless_stopped()
                    if self.drain and await self._drained():
                        return
                if self._fatal is not None:
                    return
        except BaseException:
            self.stopping = True  # going down: the wait below is bounded by the grace period
            raise
        finally:
            # given up at a stop after the grace period: never acked, its messages nak'ed
            await committer.committed_unless_stopped()

    async def _recreate_consumer(self, gone: ConsumerGone) -> None:
        """The durable consumer was deleted under busd, or its pull requests go unanswered
        (a cluster without a leader): declare it again (the catalog recognises what it
        already holds), waiting while NATS does not answer; if the stream is gone, exit."""
        if isinstance(gone, PullUnanswered):
            now = time.monotonic()
            if now - self._unanswered_said_at >= source.WAITING_SAID_EVERY_S:
                self._unanswered_said_at = now
                self.log.warning(
                    "pull requests unanswered; declaring the consumer again", reason=str(gone)
                )
        else:
            self.log.error("the durable consumer is gone; recreating it", reason=str(gone))
        waited = source.Waiting(self._jetstream_patience_s())
        patience_s = REFRESH_PATIENCE * self.settings.consumer.stall_s

        def waiting(exc: BaseException) -> None:
            # an outage: busd waits and is not stuck, for as long as the stall check gives a
            # refresh; a JetStream silent past its patience is a BusdError (exit 1)
            if waited.lasted_s() < patience_s:
                self.progress.mark()
            if waited.unanswered(exc, "declare the consumer again"):
                refused = source.refusal(self.nc)
                self.log.warning(
                    "NATS does not answer; declaring the consumer again",
                    error=repr(exc),
                    **({"nats_refused": refused} if refused else {}),
                )

        declared = await source.redeclare_consumer(
            self.nc, self.settings, stopping=lambda: self.stopping, turned=waiting
        )
        assert self.src is not None
        self.src.reset()
        if declared and isinstance(gone, PullUnanswered):  # no new request at once
            await anyio.sleep(source.WAITING_RETRY_S)

    async def _answered(self, call: Callable[[], Awaitable[T]], what: str) -> T | None:
        """A request of the start, retried while NATS does not answer (None: stopped)."""
        return await when_answered(
            call,
            what,
            notify=self.notify,
            stopping=lambda: self.stopping,
            jetstream_patience_s=self._jetstream_patience_s(),
            refusal=lambda: source.refusal(self.nc),
        )

    def _jetstream_patience_s(self) -> float:
        return source.jetstream_patience_s(self.settings.nats)

    async def _measured(self) -> bool:
        assert self.keeper is not None
        await self.keeper.measure_lag()
        return True

    async def _ping_while_starting(self) -> None:
        """Until the keeper pings; as patient as the keeper is with a refresh."""
        await self.watchdog.while_starting(
            lambda: self.keeper is not None and self.keeper.running,
            REFRESH_PATIENCE * self.settings.consumer.stall_s,
        )

    async def _drained(self) -> bool:
        assert self.publisher is not None
        backfilling = self.role is not None and self.role.backfill is not None
        if self.ledger.waiting or self.publisher.pending() or backfilling:
            return False
        try:
            pending, ack_pending = await source.consumer_state(self.nc, self.settings)
        except Exception:  # noqa: BLE001 - NATS down (it reconnects), the consumer gone (the
            return False  # next fetch meets that and declares it again): not drained
        return pending == 0 and ack_pending == 0

    async def _finish(self) -> None:
        """Shutdown: export and settle everything committed, within the grace period."""
        assert self.publisher is not None
        with anyio.move_on_after(self._grace_left()):
            while (self.ledger.waiting or self.publisher.pending()) and self._fatal is None:
                await self.publisher.until_idle()


async def serve(settings: Settings, *, drain: bool = False, restore_signals: bool = True) -> Stats:
    """``restore_signals=False`` for the CLI: a stop signal after busd stopped is ignored too
    (the process is about to exit; dying of it would tell systemd of a failure)."""
    # Python's cyclic collector, tuned as a replay's (busd.replay.fewer_collections): busd
    # makes no cycles of its own while it folds, so what exists once it starts is frozen out of
    # the collector's passes and a pass comes every 50,000 allocations, not 700 (a catch-up:
    # 12 % less CPU in busd). Restored after, for a process that goes on (tests).
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        return await Daemon(settings, drain=drain, restore_signals=restore_signals).run()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
