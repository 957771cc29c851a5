"""The keeper: keep-alives that never wait for a batch.

Loops of their own: the systemd watchdog and the stall check (no network at all),
in-progress signals for everything in the in-flight ledger (and acks that could not go out),
and the lag gauges with the ``STATUS=`` line. (The HA lease is renewed by the daemon from the
moment it is won, before the keeper runs.) None does catalog I/O, so a
slow file check, commit, refresh, disk or NATS request delays none of the others. A stall (a
backlog and, for ``consumer.stall_s``, no ack, no file check, commit or export refresh
advancing)
raises :class:`~busd.errors.Stalled`, which ends the daemon's task group.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import anyio

from busd import lag, log, model, sdnotify, source
from busd.checker import Checker
from busd.config import Settings
from busd.errors import ConsumerGone, Stalled
from busd.exports import Exporter
from busd.inflight import Ledger
from busd.metrics import Metrics
from busd.sdnotify import SdNotifier

REFRESH_PATIENCE = 10  # a refresh that shows no progress counts as working this many stall_s
COMMIT_PATIENCE = 10  # ... and a catalog commit (DuckDB says nothing while it commits)


@dataclass
class Progress:
    """When the daemon last made progress: an ack, a commit, or a refresh done; since when
    a catalog commit runs (None: none does); and since when the disk has been busy with the
    write under way (a job of the catalog's writer thread, or the record of what is held)."""

    at: float = field(default_factory=time.monotonic)
    committing_since: float | None = None
    writing_since: float | None = None
    writes: int = 0  # writes queued or running

    def mark(self) -> None:
        self.at = time.monotonic()

    def write_started(self) -> None:
        if self.writes == 0:
            self.writing_since = time.monotonic()
        self.writes += 1

    def write_ended(self) -> None:
        self.writes -= 1
        self.writing_since = time.monotonic() if self.writes else None

    def busy_since(self) -> float | None:
        """Since when a commit, or the writer's job under way, runs (None: neither)."""
        if self.committing_since is not None:
            return self.committing_since
        return self.writing_since


class Watchdog:
    """systemd's watchdog (``WATCHDOG_USEC``), pinged by whoever shows busd alive: the
    follower in standby, the start until the keeper runs, then the keeper's loop."""

    def __init__(self, notify: SdNotifier) -> None:
        self.notify = notify
        self.every_s = notify.watchdog_interval_s() or 1.0  # half the watchdog's period
        self._pinged_at = 0.0

    def alive(self) -> None:
        """A ping, at most once per quarter of the watchdog's period."""
        now = time.monotonic()
        # half of every_s: a loop that sleeps every_s never skips a turn on jitter
        if now - self._pinged_at >= self.every_s / 2:
            self._pinged_at = now
            self.notify.watchdog()

    async def while_starting(self, started: Callable[[], bool], patience_s: float) -> None:
        """Pings from the start or a takeover (a standby has said READY=1 long before)
        until ``started()``: a backfill's start, a refresh of stale exports and requests to
        NATS run in between. For no longer than ``patience_s``: a start that hangs past it
        is not kept alive."""
        until = time.monotonic() + patience_s
        while not started():
            if time.monotonic() > until:
                log.get().error("still starting; no more watchdog pings", waited_s=patience_s)
                return
            self.alive()
            await anyio.sleep(min(1.0, self.every_s))


class Keeper:
    """Built once the consumer is bound; :meth:`run` runs until the daemon stops."""

    def __init__(
        self,
        s: Settings,
        nc: source.Client,
        src: source.PullSource,
        *,
        ledger: Ledger,
        exporter: Exporter,
        checker: Checker,
        metrics: Metrics,
        notify: SdNotifier,
        watchdog: Watchdog,
        progress: Progress,
        outcomes: Callable[[], dict[str, int]],
        send: Callable[[Sequence[tuple[str, bytes]]], Awaitable[bool]],
        ack_late: Callable[[], Awaitable[None]],
        recreate_consumer: Callable[[ConsumerGone], Awaitable[None]],
    ) -> None:
        self.settings, self.nc, self.src = s, nc, src
        self.ledger, self.exporter, self.metrics, self.notify = ledger, exporter, metrics, notify
        self.progress, self.outcomes, self.checker = progress, outcomes, checker
        self.send, self.ack_late = send, ack_late
        self.recreate_consumer = recreate_consumer
        self.watchdog = watchdog
        self.pending = self.ack_pending = 0  # the consumer's, as last measured
        self.max_ack_pending = s.consumer.max_ack_pending  # the consumer's, as read
        self.backlog_asked_at = 0.0  # when the request that measured it went out
        self.running = False  # its watchdog loop pings (before: the daemon's start does)

    async def run(self) -> None:
        self.running = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchdog_loop)
            tg.start_soon(self._progress_loop)
            tg.start_soon(self._lag_loop)

    @property
    def backlog(self) -> int:
        """Messages not settled yet (pending + ack pending), as last measured."""
        return self.pending + self.ack_pending

    async def measure_lag(self) -> None:
        s, asked_at = self.settings, time.monotonic()
        pending, ack_pending, self.max_ack_pending = await source.consumer_limits(self.nc, s)
        self.pending, self.ack_pending, self.backlog_asked_at = pending, ack_pending, asked_at
        self.metrics.pending.set(pending)
        self.metrics.ack_pending.set(ack_pending)
        self.metrics.bound(s.nats.stream, s.nats.consumer)
        age_s = 0.0
        if self.backlog:  # the age needs two more requests: only while something waits
            age_s = await lag.lag_age_s(self.nc, s)
        self.metrics.oldest_unsettled_age.set(age_s)

    async def _watchdog_loop(self) -> None:
        stall_s, exported = self.settings.consumer.stall_s, self.exporter.progress()
        checked = self.checker.progress()
        while True:
            await anyio.sleep(min(1.0, self.watchdog.every_s))
            self.watchdog.alive()
            # a long refresh is progress while it advances (files written, query progress),
            # and for up to REFRESH_PATIENCE stall periods while it runs at all: DuckDB gives
            # no progress for some queries (a recursive CTE), or plateaus (a sort)
            advanced, since = self.exporter.progress(), self.exporter.refreshing_since
            if advanced != exported or (
                since is not None and time.monotonic() - since < REFRESH_PATIENCE * stall_s
            ):
                exported = advanced
                self.progress.mark()
            # file checks that answer (or read on through a large file), and a commit for up
            # to COMMIT_PATIENCE stall periods: a slow disk is not a stuck daemon
            advanced_checks, since = self.checker.progress(), self.progress.busy_since()
            if advanced_checks != checked or (
                since is not None and time.monotonic() - since < COMMIT_PATIENCE * stall_s
            ):
                checked = advanced_checks
                self.progress.mark()
            # nothing waits, or NATS is away (nats-py reconnects; nothing could progress
            # meanwhile, and the backlog is as last measured): no stall
            if (refused := source.turned_away(self.nc)) is not None:  # no way back in
                if time.monotonic() - self.progress.at > stall_s:
                    raise Stalled(
                        f"NATS has refused busd's reconnects for {stall_s:.0f}s: {refused}"
                    )
            elif (self.backlog == 0 and not self.ledger) or not self.nc.is_connected:
                self.progress.mark()
            elif time.monotonic() - self.progress.at > stall_s and self._waiting_since_progress():
                refused = source.refusal(self.nc)
                raise Stalled(
                    f"no progress for {stall_s:.0f}s with {self.backlog} messages waiting"
                    + (f" (NATS refused busd: {refused})" if refused else "")
                )

    def _waiting_since_progress(self) -> bool:
        """Whether NATS, asked since the last progress, answered that messages wait for
        busd: some not delivered yet, or delivered and unacked while busd holds some (or
        while NATS refuses busd a subject). One asked before may count messages acked
        since; none answered (a frozen server, the connection still up) is NATS's outage,
        as is NATS away; delivered messages busd does not hold wait for the server to
        deliver them again (a nak's delay, the back-off after a crash), not for busd."""
        if self.backlog_asked_at <= self.progress.at:
            return False
        held = bool(self.ledger) or bool(self.src.buffered()) or source.refusal(self.nc)
        # past max_ack_pending the server delivers nothing new until those are settled
        deliverable = self.ack_pending < self.max_ack_pending
        return (self.pending > 0 and deliverable) or (bool(held) and self.backlog > 0)

    async def _progress_loop(self) -> None:
        """In-progress signals for everything in hand, and acks that could not go out: no
        catalog I/O, no lag requests in the way, each send bounded in time."""
        every_s = self.settings.consumer.ack_wait_s / 3
        buffered_told = time.monotonic()
        while True:
            await anyio.sleep(min(1.0, every_s / 2))
            if not self.nc.is_connected:
                continue
            now = time.monotonic()
            replies = self.ledger.due_progress(now, every_s)
            if now - buffered_told >= every_s:
                buffered_told = now
                replies += [d.reply for d in self.src.buffered()]
            with anyio.move_on_after(every_s):
                await self.send([(r, model.PROGRESS) for r in replies])
            with anyio.move_on_after(every_s):
                await self.ack_late()

    async def _lag_loop(self) -> None:
        """Lag gauges and the STATUS= line (NATS requests that may be slow)."""
        while True:
            await anyio.sleep(1.0)
            try:
                await self.measure_lag()
            except ConsumerGone as exc:  # deleted under busd: declared again, or raised
                await self.recreate_consumer(exc)
            except Exception:  # noqa: BLE001 - NATS down: it reconnects
                pass
            self.notify.status_every(sdnotify.active_status(self.outcomes(), *self.metrics.lag()))
