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
import contextlib
import gc
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from busd import faults, log, model, source
from busd.catalog import Catalog
from busd.checker import Checker
from busd.config import Settings, parse_hostport
from busd.daemon.answers import Answers
from busd.daemon.committer import Committer
from busd.daemon.connect import connect_when_up, when_answered, workers_when_up
from busd.daemon.keeper import REFRESH_PATIENCE, Keeper, Progress
from busd.daemon.publisher import CallThread, Publisher
from busd.daemon.store import LiveStore
from busd.deaths import Deaths
from busd.embedded import EmbeddedServer
from busd.errors import (
    BusdError,
    ConsumerGone,
    FatalStorageError,
    LeaseLost,
    StorageError,
)
from busd.exports import Exporter
from busd.fold import Folder
from busd.ha.backfill import Backfill
from busd.ha.follower import Follower, resume_after, stand_by
from busd.ha.lease import Lease
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
        self.stop_event = asyncio.Event()  # set with `stopping`: waits on work give up
        self._writer = CallThread("busd-writer")
        self._export_pool = CallThread("busd-export")
        self.catalog: Catalog | None = None
        self.checker: Checker | None = None
        self.folder: Folder | None = None
        self.store: LiveStore | None = None
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
        self.deaths: Deaths | None = None  # busd's deaths holding a sequence (poison)
        self.rechecks = Rechecks()  # held, not nak'ed: the machine failed to read their files
        self.progress = Progress()
        self._fatal: BaseException | None = None
        self.committer: Committer | None = None
        self.lineage = Lineage(
            settings.lineage,
            self.metrics,
            publish=lambda subject, body: self.nc.publish(subject, body),
        )
        self._active = True
        self._pinged_at = 0.0
        self._ping_every_s = self.notify.watchdog_interval_s() or 1.0
        self._debug = log.debug_enabled()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        if value:
            self.stop_event.set()

    # ---- threads -------------------------------------------------------------------------
    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        """A job on the catalog's writer thread; while it runs the keeper is patient (a
        slow disk is no stall, whichever transaction meets it first)."""
        self.progress.write_started()
        try:
            return await asyncio.wrap_future(self._writer.submit(fn, *args))
        finally:
            self.progress.write_ended()

    async def _on_exporter(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._export_pool.submit(fn, *args))

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
        self.store = LiveStore(self.catalog, self._on_writer, self.nc, s.nats.stream)
        self.deaths = await anyio.to_thread.run_sync(self._load_deaths)
        self.folder = Folder(s, self.store, checker=self.checker, deaths=self.deaths)
        nc = self.nc
        problems = await self._answered(lambda: source.ensure_stream(nc, s), "declare the stream")
        if problems is None:  # stopped while NATS did not answer
            self.stopping = True
            return
        for problem in problems:
            self.log.warning("stream breaks a promise", stream=s.nats.stream, problem=problem)

    def _load_deaths(self) -> Deaths:
        """What the last busd held when it died counts one death each; the record says
        nothing is held at once (a start that fails is no death of a message)."""
        deaths = Deaths.load(self.settings.catalog_path.with_name("held.json"))
        if deaths.unreadable is not None:
            self.log.warning("the record of deaths is unreadable", why=deaths.unreadable)
        held = {seq: n for seq, n in deaths.counts.items() if n}
        if held:
            self.log.warning(
                "busd died holding messages; each counts toward poison",
                messages=len(held),
                most_deaths=max(held.values()),
            )
        data = deaths.encode(())
        if data is not None:
            try:
                deaths.write(data)
            except FatalStorageError:
                raise
            except StorageError as exc:  # a full disk: the old record is gone, counts kept
                self.log.warning("cannot record the messages held", error=str(exc))
        return deaths

    async def _record_held(self) -> None:
        """Before busd handles what it fetched: every sequence it holds, durably (its deaths
        are counted from this record at the next start)."""
        assert self.deaths is not None
        data = self.deaths.encode(self.ledger.seqs())
        if data is None:
            return
        self.progress.write_started()  # a slow disk is no stall (nor is a commit beside it)
        try:
            await anyio.to_thread.run_sync(self.deaths.write, data)
        except FatalStorageError:
            raise
        except StorageError as exc:  # a full disk: this death would go uncounted
            self.log.warning("cannot record the messages held", error=str(exc))
        finally:
            self.progress.write_ended()

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
        assert self.folder is not None and self.deaths is not None
        self.folder.server_max_deliver = int(info.config.max_deliver or -1)
        if info.ack_floor is not None:
            self.deaths.settled_through(int(info.ack_floor.stream_seq or 0))
        seq = await self._on_writer(self.catalog.catalog_seq)
        self.metrics.catalog_seq.set(seq)
        stale = await self._on_exporter(self.exporter.stale, seq)
        if stale:
            self.log.info("refreshing exports older than the catalog", exports=stale)
            await self.publisher.refresh(stale)
        self.src = source.PullSource(self.nc, s.nats.stream, s.nats.consumer)
        await self.src.start()
        self.settler = source.Settler(self.nc)
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
            send=self._send,
            stopping=lambda: self.stopping,
            stopped=self.stop_event,
            record_held=self._record_held,
            forget=self.deaths.forget,
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
            progress=self.progress,
            outcomes=lambda: dict(self.stats.outcomes),
            send=self._send,
            ack_late=lambda: self._ack_through(publisher.exported_generation),
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
                # NATS gone meanwhile: closing raises too (ConnectionResetError), and must not
                # take the place of the reason busd stops
                with contextlib.suppress(Exception):
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
        await anyio.to_thread.run_sync(self.lineage.close)  # its reader, before the catalog
        await self._close_catalog(grace_s, left)
        if self.embedded is not None:
            await anyio.to_thread.run_sync(self.embedded.stop)
        if self.metrics_server is not None:
            self.metrics_server.stop()

    # ---- the main loop -------------------------------------------------------------------
    async def run(self) -> Stats:
        """Serve until SIGTERM/SIGINT (or, in drain mode, until the stream is empty)."""
        died: BaseException | None = None
        before = self._install_signals()
        try:
            await self.start()
            await self._serve()
        except BaseExceptionGroup as group:  # one failure in a task: report it, not the group
            leaves = _leaves(group)
            died = next((leaf for leaf in leaves if _a_death(leaf)), leaves[0])
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
        except BaseException as exc:
            died = exc
            raise
        finally:
            self.notify.stopping()
            try:
                with anyio.CancelScope(shield=True):
                    await self.close()
                    await self._close_deaths(died or self._fatal)
            finally:
                # from here to the exit, a stop signal is ignored by the kernel: Python puts
                # the default action back for its own handlers as the interpreter finalizes
                _restore(before if self.restore_signals else _IGNORED)
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

    async def _close_catalog(self, grace_s: float, left: Callable[[], float]) -> None:
        """The export thread, then the catalog and its writer thread, within what is left
        of the grace period."""
        # the export thread's cursor must be idle before the catalog's connection closes;
        # stuck in a read that does not return, it is left behind with the catalog open
        # (what is committed is durable in its WAL), and busd exits all the same
        if not await anyio.to_thread.run_sync(self._export_pool.stop, left()):
            self.log.error(
                "the export thread is stuck in a read; exiting without it", waited_s=grace_s
            )
            _LEFT_BEHIND.append(self)
            self.catalog = None
        if self.catalog is not None:
            with anyio.move_on_after(left()) as waited:
                if self.publisher is not None:
                    with contextlib.suppress(Exception):
                        await self.publisher.record_when_idle(False)
                await self._on_writer(self.catalog.close)
            if waited.cancelled_caught:  # what it committed is durable in its WAL
                self.log.error(
                    "the catalog's writer is stuck on the disk; exiting without it",
                    waited_s=grace_s,
                )
        if not await anyio.to_thread.run_sync(self._writer.stop, left()):
            _LEFT_BEHIND.append(self)

    async def _close_deaths(self, died: BaseException | None) -> None:
        """Nothing is held any more, unless busd dies of an exception it did not decide on:
        an event that raises one each time (whatever its type: an OSError or a MemoryError is
        no proof that the machine is at fault) must end as `poison` as surely as one that
        crashes busd. busd's own verdicts (a failed fsync, a stall, a lost lease, the consumer
        gone) and a signal are no fault of what it held."""
        if self.deaths is None or (died is not None and _a_death(died)):
            return
        try:
            with anyio.move_on_after(self.settings.consumer.shutdown_grace_s):
                # a disk that does not answer: left behind, and the deaths are counted
                await anyio.to_thread.run_sync(self.deaths.close, abandon_on_cancel=True)
        except StorageError as exc:  # the record is removed if it cannot be rewritten
            self.log.warning("cannot clear the record of messages held", error=str(exc))

    async def _serve(self) -> None:
        async with anyio.create_task_group() as tg:
            # stopped while waiting for NATS, or for the workers (before the lease: a busd
            # that cannot check files must not hold it)
            if self.settings.ha.enabled and not self.stopping and await self._workers_up():
                quarantined = await self._standby()
                if self.lease is not None and not self.stopping:
                    # renewed from the moment it is won: the backfill's start and a refresh of
                    # stale exports come before the keeper runs, and may outlast the TTL
                    tg.start_soon(self._keep_lease, self.lease)
                    tg.start_soon(self._ping_while_starting)
                    await self._start_backfill(quarantined)
            if self.lease is None and not self.stopping:
                tg.start_soon(self._ping_while_starting)
            if not self.stopping and await self._activate():
                assert self.publisher is not None and self.keeper is not None
                tg.start_soon(self.publisher.run, self._ack_through)
                tg.start_soon(self.publisher.sweep_loop, self._committing)
                tg.start_soon(self.keeper.run)
                tg.start_soon(self.lineage.run)
                await self._fetch_loop()
                await self._finish()
                await self.lineage.flush(min(5.0, self.settings.consumer.shutdown_grace_s))
            tg.cancel_scope.cancel()

    # ---- hot standby ---------------------------------------------------------------------
    async def _standby(self) -> dict[int, str]:
        """Follow the stream into our own catalog until we win the lease (or are stopped):
        the poison decisions the follower carries over."""
        assert self.publisher is not None
        self.lease = Lease(self.nc, self.settings)
        await self.lease.open()
        if await self.lease.acquire():
            self._set_active(True)
            return {}
        self._set_active(False)
        self.notify.ready()
        self.notify.status("standby")
        self.log.info("standby: following the stream", holder=await self.lease.holder())
        assert self.catalog is not None and self.folder is not None and self.store is not None
        catalog = self.catalog
        # not the highest sequence: a former active's catalog lacks the ones it was still
        # waiting for (a late file), and a standby resuming past them never folds them
        after_seq = await resume_after(
            self.nc, self.settings, lambda after: self._on_writer(catalog.recorded_through, after)
        )
        quarantined = await stand_by(
            Follower(self.settings, self.nc, self.store, self._commit_rows, self.folder.checker),
            after_seq, self.lease, self.publisher.refresh_changed, self._alive,
            min(1.0, self._ping_every_s), lambda: self.stopping,
        )  # fmt: skip
        if quarantined is None:
            return {}
        self._set_active(True)
        self.log.warning("took over the lease: active now", instance=self.lease.me)
        return quarantined

    async def _keep_lease(self, lease: Lease) -> None:
        """Renew the lease while it is ours; a NATS error is retried at the next tick, a
        lost lease raises (and ends the daemon)."""
        while True:
            await anyio.sleep(min(1.0, lease.ttl_s / 10))
            if lease.due():
                await self._lease_ok(renew=True)

    async def _start_backfill(self, quarantined: dict[int, str] | None = None) -> None:
        assert self.catalog is not None and self.folder is not None
        assert self.publisher is not None and self.store is not None
        catalog = self.catalog
        self._backfill = await Backfill.start(
            self.settings,
            self.nc,
            self.store,
            self._commit_rows,
            self.folder.checker,
            lambda after: self._on_writer(catalog.recorded_through, after),
            quarantined or {},
            self.publisher.touched,
        )

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

    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM and SIGINT stop busd, once; a second one (an impatient Ctrl-C, a second
        `systemctl stop`) is logged and ignored, for as long as the process lives unless
        ``restore_signals``: dying of it would count as a death of every message held. Plain
        handlers, not the event loop's, which puts the default action back as it closes."""
        loop = asyncio.get_running_loop()

        def handler(signum: int, _frame: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: busd is exiting
                loop.call_soon_threadsafe(self._on_signal, signum)

        before: dict[int, Any] = {}
        with contextlib.suppress(ValueError):  # not the main thread (an embedded use)
            for signum in (signal.SIGTERM, signal.SIGINT):
                before[signum] = signal.signal(signum, handler)
        return before

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
                if self._backfill is not None and self._backfill.due():
                    await committer.committed()  # the backfill reads the catalog, then commits
                    if await self._backfill.step():
                        self._backfill = None
                try:
                    batch = await self.src.fetch(
                        c.batch_max, c.batch_wait_ms, prefetch=lambda: not self.stopping
                    )
                except ConsumerGone as exc:
                    await self._recreate_consumer(str(exc))
                    continue
                batch = [*self.rechecks.due(time.monotonic()), *batch]
                if batch:
                    await committer.handle(batch)
                    self.stats.batches += 1
                else:
                    await committer.committed()
                    if self.drain and await self._drained():
                        return
                if self._fatal is not None:
                    return
        finally:
            await committer.committed()

    async def _recreate_consumer(self, why: str) -> None:
        """The durable consumer was deleted under busd: say so and declare it again (the
        catalog recognises what it already holds); if the stream is gone too, exit."""
        self.log.error("the durable consumer is gone; recreating it", reason=why)
        await source.redeclare_consumer(self.nc, self.settings)
        assert self.src is not None
        self.src.reset()

    async def _answered(self, call: Callable[[], Awaitable[T]], what: str) -> T | None:
        """A request of the start, retried while NATS does not answer (None: stopped)."""
        return await when_answered(call, what, notify=self.notify, stopping=lambda: self.stopping)

    async def _measured(self) -> bool:
        assert self.keeper is not None
        await self.keeper.measure_lag()
        return True

    async def _ping_while_starting(self) -> None:
        """The watchdog, from the start or the takeover (a standby has said READY=1 long
        before) until the keeper pings: a backfill's start, a refresh of stale exports and
        requests to NATS run in between. For no longer than the keeper's patience with a
        refresh: a start that hangs past it is not kept alive."""
        patience_s = REFRESH_PATIENCE * self.settings.consumer.stall_s
        until = time.monotonic() + patience_s
        while not (self.keeper is not None and self.keeper.running):
            if time.monotonic() > until:
                self.log.error("still starting; no more watchdog pings", waited_s=patience_s)
                return
            self._alive()
            await anyio.sleep(min(1.0, self._ping_every_s))

    def _alive(self) -> None:
        """Ping systemd's watchdog at most once per quarter watchdog period, from the follow
        loop in standby (the keeper pings while active)."""
        now = time.monotonic()
        # half of ping_every_s: a loop that sleeps ping_every_s never skips a turn on jitter
        if now - self._pinged_at >= self._ping_every_s / 2:
            self._pinged_at = now
            self.notify.watchdog()

    async def _drained(self) -> bool:
        assert self.publisher is not None
        if self.ledger.waiting or self.publisher.pending() or self._backfill is not None:
            return False
        try:
            pending, ack_pending = await source.consumer_state(self.nc, self.settings)
        except Exception:  # noqa: BLE001 - NATS down (it reconnects), the consumer gone (the
            return False  # next fetch meets that and declares it again): not drained
        return pending == 0 and ack_pending == 0

    async def _finish(self) -> None:
        """Shutdown: export and settle everything committed, within the grace period."""
        assert self.publisher is not None
        with anyio.move_on_after(self.settings.consumer.shutdown_grace_s):
            while (self.ledger.waiting or self.publisher.pending()) and self._fatal is None:
                await self.publisher.until_idle()

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
            self.log.warning(
                "could not settle messages now",
                count=len(items),
                error=str(exc) or type(exc).__name__,
            )
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
        if self.deaths is not None:
            self.deaths.forget(w.d.seq for w in done)
        now = time.time()
        for w in done:
            self.metrics.event_latency.observe(max(0.0, now - w.d.published_ns / 1e9))
        self.progress.mark()


# daemons whose threads a stop gave up on, stuck in DuckDB on a hung disk: kept alive, as
# freeing their catalog's connections and cursors would wait for those threads
_LEFT_BEHIND: list[Any] = []


def threads_left_behind() -> bool:
    """A stop left a thread stuck in DuckDB: the process should exit without the
    interpreter's clean-up, which would wait for it (the CLI does)."""
    return bool(_LEFT_BEHIND)


_IGNORED: dict[int, Any] = {signal.SIGTERM: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN}


def _restore(handlers: dict[int, Any]) -> None:
    with contextlib.suppress(ValueError):  # not the main thread (an embedded use)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _a_death(exc: BaseException) -> bool:
    """An exit busd did not decide on: it counts as a death for every message held."""
    decided = (BusdError, KeyboardInterrupt, SystemExit, anyio.get_cancelled_exc_class())
    return not isinstance(exc, decided)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups inside it (task groups nest)."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


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
