"""Active or standby (``ha.enabled``): the lease, following the stream until it is won, its
renewal, and the backfill of what the former active acked. Without HA busd is active and
holds no lease.

The daemon asks two things of it while active: whether it may settle for good now
(:meth:`Role.lease_ok`, before every ack or term) and the backfill's next step. A lost lease
raises :class:`~busd.errors.LeaseLost` after ``on_lost`` has stopped the daemon's acks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import anyio

from busd import log, source
from busd.checker import Checker
from busd.config import Settings
from busd.errors import LeaseLost
from busd.fold import Store
from busd.ha.backfill import Backfill
from busd.ha.follower import Follower, resume_after, stand_by
from busd.ha.lease import Lease
from busd.metrics import Metrics
from busd.model import Batch
from busd.sdnotify import SdNotifier

T = TypeVar("T")


class Answered(Protocol):
    """``call()``, a request to NATS, asked again while NATS does not answer; None when busd
    stops first (the daemon's ``when_answered``)."""

    async def __call__(self, call: Callable[[], Awaitable[T]], what: str) -> T | None: ...


class Role:
    """The lease (None without HA, or once lost) and the backfill after a takeover (None
    once done); ``active`` says which side busd is on."""

    def __init__(
        self,
        settings: Settings,
        nc: source.Client,
        store: Store,
        checker: Checker,
        *,
        commit_rows: Callable[[Batch], Awaitable[None]],
        recorded_through: Callable[[int], Awaitable[int]],
        refresh_changed: Callable[[set[str]], Awaitable[None]],
        touched: Callable[[set[str]], None],
        notify: SdNotifier,
        metrics: Metrics,
        alive: Callable[[], None],
        ping_every_s: float,
        stopping: Callable[[], bool],
        on_lost: Callable[[LeaseLost], None],
        answered: Answered,
        patience_s: float,
    ) -> None:
        self.settings, self.nc, self.store, self.checker = settings, nc, store, checker
        self.commit_rows, self.recorded_through = commit_rows, recorded_through
        self.refresh_changed, self.touched = refresh_changed, touched
        self.notify, self.metrics, self.alive = notify, metrics, alive
        self.ping_every_s, self.stopping, self.on_lost = ping_every_s, stopping, on_lost
        self.answered = answered
        self.patience_s = patience_s  # a standby's follow loop stuck longer: no more pings
        self.lease: Lease | None = None
        self.backfill: Backfill | None = None
        self.active = True
        self.log = log.get()

    async def stand_by(self) -> dict[int, str]:
        """Follow the stream into our own catalog until we win the lease (or are stopped):
        the poison decisions the follower carries over. Each request to NATS here is asked
        again while NATS does not answer; stopped meanwhile: nothing."""
        lease = self.lease = Lease(self.nc, self.settings)
        self._set_active(False)  # until the lease is won: a stop before then releases nothing
        won = None
        if await self.answered(self._open, "open the lease's bucket"):
            won = await self.answered(lease.acquire, "try the lease")
        if won is None:
            return {}
        if won:
            self._set_active(True)
            return {}
        holder = await self.answered(self._holder, "read the lease")
        # not the highest sequence: a former active's catalog lacks the ones it was still
        # waiting for (a late file), and a standby resuming past them never folds them
        after_seq = await self.answered(
            lambda: resume_after(self.nc, self.settings, self.recorded_through),
            "find where to follow from",
        )
        if after_seq is None:
            return {}
        # ready once it follows, and pinged from then on: before, a wait for NATS is the
        # start's (whose timeout the waits extend), not a watchdog's gap
        self.notify.ready()
        self.notify.status("standby")
        self.log.info("standby: following the stream", holder=holder)
        quarantined = await stand_by(
            Follower(self.settings, self.nc, self.store, self.commit_rows, self.checker),
            after_seq, self.lease, self.refresh_changed, self.alive,
            min(1.0, self.ping_every_s), self.stopping, self.patience_s,
        )  # fmt: skip
        if quarantined is None:
            return {}
        self._set_active(True)
        self.log.warning("took over the lease: active now", instance=self.lease.me)
        return quarantined

    async def _open(self) -> bool:
        assert self.lease is not None
        await self.lease.open()
        return True

    async def _holder(self) -> str:
        assert self.lease is not None
        return await self.lease.holder() or "nobody"

    async def keep_lease(self) -> None:
        """Renew the lease while it is ours; a NATS error is retried at the next tick, a
        lost lease raises (and ends the daemon)."""
        lease = self.lease
        assert lease is not None
        while True:
            await anyio.sleep(min(1.0, lease.ttl_s / 10))
            if lease.due():
                await self.lease_ok(renew=True)

    async def start_backfill(self, quarantined: dict[int, str]) -> None:
        """Asked again while NATS does not answer (stopped meanwhile: none)."""

        async def start() -> tuple[Backfill | None]:
            return (
                await Backfill.start(
                    self.settings,
                    self.nc,
                    self.store,
                    self.commit_rows,
                    self.checker,
                    self.recorded_through,
                    quarantined,
                    self.touched,
                ),
            )

        started = await self.answered(start, "start the backfill")
        self.backfill = started[0] if started is not None else None

    async def lease_ok(self, *, renew: bool = False) -> bool:
        """Renew or check the lease. Lost: ``on_lost`` stops acking for good, and LeaseLost
        is raised, which ends the daemon (exit 1). A NATS error: False, not now (nothing is
        settled; the messages wait or are redelivered)."""
        if self.lease is None:
            return False
        try:
            await (self.lease.renew() if renew else self.lease.check())
        except LeaseLost as exc:
            self.log.error("lost the lease; not acking any more", error=str(exc))
            self.lease = None
            self.on_lost(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - NATS reconnecting: decide later
            self.log.warning("cannot reach the lease; not settling now", error=str(exc))
            return False
        return True

    async def close(self, *, failed: bool) -> None:
        """Hand the lease on at a clean stop (not after a failure: the next holder waits out
        its TTL), and stop the backfill."""
        if self.lease is not None and not failed and self.active:
            await self.lease.release()
        if self.backfill is not None:
            await self.backfill.stop()

    def _set_active(self, active: bool) -> None:
        self.active = active
        self.metrics.active.set(1 if active else 0)
