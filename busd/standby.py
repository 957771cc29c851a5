"""Hot standby: a lease in a NATS KV bucket decides which ``busd serve`` is active.

The active instance owns the durable consumer and acks; it renews the lease from its main
loop and checks the lease's revision before every ack. A standby follows the stream into its
own catalog and exports with an ephemeral consumer (no acks), and tries to take the lease;
the bucket's TTL expires a lease nobody renews, so a dead or cut-off active loses it within
``ha.lease_ttl_s``. A former active that finds it lost the lease stops acking at once and
exits; everything it wrote is harmless because the fold is idempotent.

The server never delivers an acked message again, so the instance that wins the lease
backfills from the stream what its catalog lacks up to the sequence the consumer had
delivered when it won: messages the former active acked beyond its ack floor (an earlier one
waiting for its file holds the floor back), and acks that a paused former active sends late,
after its last lease check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from busd import api as busd_api
from busd import log, source
from busd.catalog import Batch
from busd.checker import Checker
from busd.config import Settings
from busd.errors import BusdError, ConsumerGone, FatalStorageError, StorageError
from busd.fold import Folder, Store


class LeaseLost(BusdError):
    """Another instance holds the lease: this one must not ack anything any more."""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """Create / compare-and-set on one key of a KV bucket whose TTL is the lease period."""

    def __init__(self, nc: Any, s: Settings) -> None:
        self.js = nc.jetstream()
        self.bucket = s.ha.bucket
        self.key = s.nats.consumer
        self.ttl_s = s.ha.lease_ttl_s
        self.me = instance_id()
        self.revision = 0
        self.renewed_at = 0.0
        self.kv: Any = None
        # renewals (the keeper) and checks (before acks) run concurrently: a check that read
        # the key after a renewal landed but before its answer would see "another" revision
        self._one_at_a_time = asyncio.Lock()

    async def open(self) -> None:
        try:
            self.kv = await self.js.key_value(self.bucket)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(api.KeyValueConfig(
                bucket=self.bucket, ttl=self.ttl_s, history=1,
                storage=api.StorageType.FILE))

    async def acquire(self) -> bool:
        try:
            self.revision = await self.kv.create(self.key, self.me.encode())
        except KeyWrongLastSequenceError:
            return False
        self.renewed_at = time.monotonic()
        return True

    async def renew(self) -> None:
        """Extend the lease; raise LeaseLost if someone else holds it now."""
        async with self._one_at_a_time:
            try:
                self.revision = await self.kv.update(self.key, self.me.encode(),
                                                     last=self.revision)
            except KeyWrongLastSequenceError:
                raise LeaseLost(f"lost the lease {self.bucket}/{self.key} to "
                                f"{await self.holder() or 'nobody (expired)'}") from None
            self.renewed_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.renewed_at > self.ttl_s / 3

    async def check(self) -> None:
        """Before an ack: the key must still carry our revision."""
        async with self._one_at_a_time:
            try:
                entry = await self.kv.get(self.key)
            except KeyNotFoundError:
                raise LeaseLost(f"the lease {self.bucket}/{self.key} expired") from None
        if entry.revision != self.revision:
            raise LeaseLost(f"lost the lease {self.bucket}/{self.key} to "
                            f"{(entry.value or b'').decode()}")

    async def holder(self) -> str | None:
        try:
            entry = await self.kv.get(self.key)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None

    async def release(self) -> None:
        """On a clean stop, so a standby takes over at once instead of after the TTL."""
        with contextlib.suppress(Exception):
            await self.kv.delete(self.key, last=self.revision)


class Follower:
    """The standby's loop body: fold what the stream has beyond the catalog, no acks."""

    def __init__(self, s: Settings, nc: Any, store: Store,
                 commit: Callable[[Batch], Awaitable[None]], checker: Checker,
                 quarantined: dict[int, str] | None = None) -> None:
        self.s, self.nc, self.store, self.commit = s, nc, store, commit
        self.name = f"busd-standby-{uuid.uuid4().hex[:10]}"
        self.pull: source.PullSource | None = None
        self.folder = Folder(s, store, replay=True, checker=checker,
                             quarantined=dict(quarantined or {}))
        self._held: list[source.Delivery] = []
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
        await self.nc.jetstream().add_consumer(self.s.nats.stream, api.ConsumerConfig(
            name=self.name, ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1,
            inactive_threshold=30.0, mem_storage=True, num_replicas=1))
        self.through = after_seq
        self.pull = source.PullSource(self.nc, self.s.nats.stream, self.name)
        await self.pull.start()

    async def step(self) -> tuple[int, set[str]]:
        """One batch: returns (messages folded, artifact names committed).

        Only sequences the active has already settled (up to its ack floor) are folded, with
        the active's poison list: a file still being waited for, or a message that crashes
        busd, is decided by the active first and the standby follows that decision.
        Sequences the catalog already holds are skipped before their files are checked."""
        assert self.pull is not None
        c = self.s.consumer
        fetched: list[source.Delivery] = []
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
        js = self.nc.jetstream()
        try:
            info = await js.consumer_info(self.s.nats.stream, self.s.nats.consumer)
            floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
        except Exception:  # noqa: BLE001 - no durable consumer (yet), NATS down: not now
            return self.floor
        if floor <= self.floor:
            return self.floor  # nothing new settled: the poison list we hold covers it
        try:
            reply = await self.nc.request(
                busd_api.subject(self.s.nats.consumer, "poison"), b"{}", timeout=1.0)
            answer = busd_api.decode(reply.data)
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
            await self.nc.jetstream().delete_consumer(self.s.nats.stream, self.name)


async def delivered_seq(nc: Any, s: Settings) -> int:
    """The highest sequence the durable consumer has delivered: whoever held the lease before
    could ack, even late, any message up to here."""
    try:
        info = await nc.jetstream().consumer_info(s.nats.stream, s.nats.consumer)
    except NotFoundError:  # never bound: nobody has acked anything
        return 0
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


MAX_DELETED_RUNS = 100  # runs of sequences gone from the stream skipped before a backfill


class Backfill:
    """The new active's catch-up from the stream (see the module docstring): a follower from
    the first sequence the catalog lacks, until it has passed ``to_seq``, the highest
    sequence the consumer had delivered when the lease was won."""

    def __init__(self, follower: Follower, from_seq: int, to_seq: int,
                 committed: Callable[[set[str]], None]) -> None:
        self.follower, self.from_seq, self.to_seq = follower, from_seq, to_seq
        self.committed = committed  # the artifact names a step committed: exports to refresh
        self.recorded = 0
        self._next_at = 0.0
        self.log = log.get()

    @classmethod
    async def start(cls, s: Settings, nc: Any, store: Store,
                    commit: Callable[[Batch], Awaitable[None]], checker: Checker,
                    recorded_through: Callable[[int], Awaitable[int]],
                    quarantined: dict[int, str],
                    committed: Callable[[set[str]], None]) -> Backfill | None:
        """None when the catalog already holds everything anyone could have acked.
        ``quarantined``: the poison decisions the standby had from the former active."""
        delivered = await delivered_seq(nc, s)
        start = await recorded_through(0)
        js = nc.jetstream()
        # a sequence no longer in the stream (deleted, or aged out at its head) is no gap
        for _ in range(MAX_DELETED_RUNS):
            if start >= delivered:
                return None
            try:
                there = (await js.get_msg(s.nats.stream, start + 1, subject=">", next=True)).seq
            except NotFoundError:
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
        backfill.log.info("backfilling from the stream what the former active may have acked",
                          from_seq=backfill.from_seq, through_seq=delivered)
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
        self.recorded += n
        if n:
            self.committed(touched)
        if self.follower.reached(self.to_seq):
            self.log.info("backfilled from the stream", recorded=self.recorded,
                          through_seq=self.to_seq)
            await self.stop()
            return True
        if self.follower.through == through:
            self._next_at = time.monotonic() + 1.0
        return False

    async def stop(self) -> None:
        await self.follower.stop()


async def follow_until_leader(lease: Lease, follower: Follower,
                              refresh: Callable[[set[str]], Awaitable[None]],
                              alive: Callable[[], None], stopping: Callable[[], bool]) -> bool:
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
