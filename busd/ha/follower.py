"""The standby's side of hot standby: follow the stream into our own catalog, no acks.

A standby folds, with an ephemeral consumer, only what the active has settled (up to its ack
floor), with the active's poison decisions, so the two catalogs never diverge; and it tries to
take the lease every third of its TTL.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio

from busd import model, source
from busd.checker import Checker
from busd.config import Settings
from busd.errors import ConsumerGone
from busd.fold import Folder, Store
from busd.ha.lease import Lease
from busd.model import Batch


class Follower:
    """The standby's loop body: fold what the stream has beyond the catalog, no acks."""

    def __init__(
        self,
        s: Settings,
        nc: source.Client,
        store: Store,
        commit: Callable[[Batch], Awaitable[None]],
        checker: Checker,
        quarantined: dict[int, str] | None = None,
    ) -> None:
        self.settings, self.nc, self.store, self.commit = s, nc, store, commit
        self.name = f"busd-standby-{uuid.uuid4().hex[:10]}"
        self.pull: source.PullSource | None = None
        self.folder = Folder(
            s, store, replay=True, checker=checker, quarantined=dict(quarantined or {})
        )
        self._held: list[model.Delivery] = []
        self.through = 0  # every sequence up to here has been folded (or was already recorded)
        self.floor = 0  # the active's ack floor, as last read
        self._floor_at = 0.0
        self.idle = False  # the last step found nothing to fetch or hold

    def reached(self, seq: int) -> bool:
        """Everything up to ``seq`` that the stream still holds is in the catalog."""
        return self.through >= seq or (self.idle and self.floor >= seq)

    async def start(self, after_seq: int) -> None:
        """Follow from the sequence after the last one our catalog holds."""
        self._held = []
        await source.add_reader(
            self.nc, self.settings.nats.stream, self.name, after_seq + 1, idle_s=30.0
        )
        self.through = after_seq
        self.pull = source.PullSource(self.nc, self.settings.nats.stream, self.name)
        await self.pull.start()

    async def step(self) -> tuple[int, set[str]]:
        """One batch: returns (messages folded, artifact names committed).

        Only sequences the active has already settled (up to its ack floor) are folded, with
        the active's poison list: a file still being waited for, or a message that crashes
        busd, is decided by the active first and the standby follows that decision.
        Sequences the catalog already holds are skipped before their files are checked."""
        assert self.pull is not None
        c = self.settings.consumer
        fetched: list[model.Delivery] = []
        if len(self._held) < c.batch_max:
            try:
                fetched = await self.pull.fetch(c.batch_max, c.batch_wait_ms)
            except ConsumerGone:  # idle past its inactive threshold (a floor held for long)
                await self.pull.stop()
                await self.start(self.through)
                return 0, set()
            self._held += fetched
        self.idle = not fetched and not self._held
        if self._held or time.monotonic() - self._floor_at > 1.0:  # idle: once a second
            self._floor_at = time.monotonic()
            self.floor = await self._active_floor()
        batch = [d for d in self._held if d.seq <= self.floor]
        if not batch:
            return 0, set()
        known, _ = await self.store.lookup([d.seq for d in batch], [])
        fresh = [d for d in batch if d.seq not in known]
        touched: set[str] = set()
        if fresh:
            folded = await self.folder.fold(fresh)
            await self.commit(folded.rows)
            touched = folded.touched
        # only once committed: a failed commit leaves the batch held, for the next step
        self._held = [d for d in self._held if d.seq > self.floor]
        self.through = max(self.through, batch[-1].seq)
        return len(fresh), touched

    async def _active_floor(self) -> int:
        """The active's ack floor, trusted only together with a poison list read after it.

        The active records a poison decision in its catalog before it terminates the
        message, so a list read after the floor holds every poison sequence below that floor.
        A list read before it (or not at all) may miss one, and the standby would fold, and
        check the files of, a message the active quarantined: then the floor stays where it
        was, and nothing new is folded until both reads succeed in that order."""
        try:
            floor = await source.ack_floor(self.nc, self.settings)
        except Exception:  # noqa: BLE001 - no durable consumer (yet), NATS down: not now
            return self.floor
        if floor <= self.floor:
            return self.floor  # nothing new settled: the poison list we hold covers it
        try:
            subject = model.subject(self.settings.nats.consumer, "poison")
            answer = model.decode(await source.request(self.nc, subject, b"{}", timeout_s=1.0))
        except Exception:  # noqa: BLE001 - the active does not answer: fold nothing new
            return self.floor
        if not isinstance(answer, dict) or "error" in answer:
            return self.floor
        self.folder.quarantined.update((int(k), str(v)) for k, v in answer.items())
        return floor

    async def stop(self) -> None:
        if self.pull is not None:
            await self.pull.stop()
        with contextlib.suppress(Exception):
            await source.delete_consumer(self.nc, self.settings.nats.stream, self.name)


async def follow_until_leader(
    lease: Lease,
    follower: Follower,
    refresh: Callable[[set[str]], Awaitable[None]],
    alive: Callable[[], None],
    stopping: Callable[[], bool],
) -> bool:
    """The standby's loop: follow, refresh the exports, try the lease every third of its TTL.
    True once the lease is ours; False when stopped first. The caller stops the follower."""
    tried = time.monotonic()
    while not stopping():
        n, touched = await follower.step()
        if n:
            await refresh(touched)
        alive()
        if time.monotonic() - tried > lease.ttl_s / 3:
            tried = time.monotonic()
            if await lease.acquire():
                return True
    return False


async def stand_by(
    follower: Follower,
    after_seq: int,
    lease: Lease,
    refresh: Callable[[set[str]], Awaitable[None]],
    alive: Callable[[], None],
    ping_every_s: float,
    stopping: Callable[[], bool],
) -> dict[int, str] | None:
    """Follow from ``after_seq`` as a standby until the lease is ours: the poison decisions
    the follower carries over, or None when stopped first. The watchdog is pinged from a
    task of its own, so a slow batch or refresh never starves it."""

    async def ping() -> None:
        while True:
            await anyio.sleep(ping_every_s)
            alive()

    await follower.start(after_seq)
    try:
        async with anyio.create_task_group() as pings:
            pings.start_soon(ping)
            leader = await follow_until_leader(lease, follower, refresh, alive, stopping)
            pings.cancel_scope.cancel()
    finally:
        await follower.stop()
    return follower.folder.quarantined if leader else None
