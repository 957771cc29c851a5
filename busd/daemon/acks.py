"""Settlement on the wire: every ack, term, nak and in-progress signal goes out here.

Acks go out only from :meth:`Acks.ack_through`, for the messages a finished export refresh
covers (their commit came before it); an ack or a term is sent only after the lease check,
with HA. What cannot go out now stays in the ledger and is sent later (the keeper retries).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from busd import faults, log, model, source
from busd.daemon.keeper import Progress
from busd.deaths import Deaths
from busd.ha.role import Role
from busd.inflight import Ledger
from busd.metrics import Metrics


class Acks:
    """Sends what settles the messages in ``ledger`` (``settler`` None: nothing goes out,
    after the lease was lost)."""

    def __init__(
        self,
        settler: source.Settler,
        ledger: Ledger,
        deaths: Deaths,
        role: Role | None,
        metrics: Metrics,
        progress: Progress,
    ) -> None:
        self.settler: source.Settler | None = settler
        self.ledger, self.deaths, self.role = ledger, deaths, role
        self.metrics, self.progress = metrics, progress
        self.log = log.get()

    async def send(self, items: Sequence[tuple[str, bytes]]) -> bool:
        """Send settlements; False when they could not go out now (the caller keeps acks)."""
        if not items:
            return True
        if self.settler is None:
            return False
        # the lease is checked before anything is settled for good (ack or term); naks and
        # progress never settle, they may go out whoever holds the lease
        final = any(body in (model.ACK, model.TERM) for _, body in items)
        if final and self.role is not None and self.role.lease is not None:
            if not await self.role.lease_ok():
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

    async def ack_through(self, generation: int) -> None:
        """Ack every committed message a refresh of ``generation`` covers (the only acks)."""
        done = self.ledger.ackable(generation)
        if not done:
            return
        faults.hit("before_ack")
        if not await self.send([(w.d.reply, model.ACK) for w in done]):
            return  # they stay in the ledger: the keeper acks them once it can
        faults.hit("after_ack")
        self.ledger.release(w.d.seq for w in done)
        self.deaths.forget(w.d.seq for w in done)
        now = time.time()
        for w in done:
            self.metrics.event_latency.observe(max(0.0, now - w.d.published_ns / 1e9))
        self.progress.mark()
