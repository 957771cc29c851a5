"""The new active's catch-up from the stream.

The server never delivers an acked message again, so the instance that wins the lease
backfills from the stream what its catalog lacks up to the sequence the consumer had
delivered when it won: messages the former active acked beyond its ack floor (an earlier one
waiting for its file holds the floor back), and acks that a paused former active sends late,
after its last lease check.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from busd import log, source
from busd.checker import Checker
from busd.config import Settings
from busd.errors import FatalStorageError, StorageError
from busd.fold import Store
from busd.ha.follower import MAX_DELETED_RUNS, Follower
from busd.model import Batch


class Backfill:
    """The new active's catch-up from the stream (see the module docstring): a follower from
    the first sequence the catalog lacks, until it has passed ``to_seq``, the highest
    sequence the consumer had delivered when the lease was won."""

    def __init__(
        self, follower: Follower, from_seq: int, to_seq: int, committed: Callable[[set[str]], None]
    ) -> None:
        self.follower, self.from_seq, self.to_seq = follower, from_seq, to_seq
        self.committed = committed  # the artifact names a step committed: exports to refresh
        self.recorded = 0
        self._next_at = 0.0
        self.log = log.get()

    @classmethod
    async def start(
        cls,
        s: Settings,
        nc: source.Client,
        store: Store,
        commit: Callable[[Batch], Awaitable[None]],
        checker: Checker,
        recorded_through: Callable[[int], Awaitable[int]],
        quarantined: dict[int, str],
        committed: Callable[[set[str]], None],
    ) -> Backfill | None:
        """None when the catalog already holds everything anyone could have acked.
        ``quarantined``: the poison decisions the standby had from the former active."""
        delivered = await source.delivered_seq(nc, s)
        start = await recorded_through(0)
        # a sequence no longer in the stream (deleted, or aged out at its head) is no gap
        for _ in range(MAX_DELETED_RUNS):
            if start >= delivered:
                return None
            there = await source.next_stored_seq(nc, s.nats.stream, start + 1)
            if there is None:
                return None
            if there == start + 1:
                break
            start = await recorded_through(there - 1)
        if start >= delivered:
            return None
        follower = Follower(s, nc, store, commit, checker, quarantined)
        try:
            await follower.start(start)
        except BaseException:
            await follower.stop()
            raise
        backfill = cls(follower, start + 1, delivered, committed)
        backfill.log.info(
            "backfilling from the stream what the former active may have acked",
            from_seq=backfill.from_seq,
            through_seq=delivered,
        )
        return backfill

    def due(self) -> bool:
        return time.monotonic() >= self._next_at

    async def step(self) -> bool:
        """One batch, as :meth:`Follower.step`; True once done. The caller makes sure no
        other commit runs meanwhile. When it got no further (the ack floor has not passed
        the next sequence yet) the next step waits a second; after a failed commit (the
        batch stays held), five."""
        through = self.follower.through
        try:
            n, touched = await self.follower.step()
        except FatalStorageError:
            raise
        except StorageError as exc:
            self.log.error("backfill commit failed; retrying", error=str(exc), retry_in_s=5)
            self._next_at = time.monotonic() + 5.0
            return False
        except Exception as exc:
            if not source.unanswered(exc):
                raise
            if self.follower.waiting.unanswered(exc, "backfill"):
                self.log.warning(
                    "NATS does not answer; the backfill goes on later", error=repr(exc)
                )
            self._next_at = time.monotonic() + 1.0
            return False
        if self.follower.reader_lost:  # NATS did not answer its reader: not an answer
            self._next_at = time.monotonic() + 1.0
            return False
        self.follower.waiting.answered()
        self.recorded += n
        if n:
            self.committed(touched)
        if self.follower.reached(self.to_seq):
            self.log.info(
                "backfilled from the stream", recorded=self.recorded, through_seq=self.to_seq
            )
            await self.stop()
            return True
        if self.follower.through == through:
            self._next_at = time.monotonic() + 1.0
        return False

    async def stop(self) -> None:
        await self.follower.stop()
