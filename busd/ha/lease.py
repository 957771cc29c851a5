"""The hot-standby lease: one key in a NATS KV bucket whose TTL is the lease period.

The active instance renews it (from the keeper, never waiting for a batch) and checks its
revision before every ack or term; a standby tries to create it. The bucket's TTL expires a
lease nobody renews, so a dead or cut-off active loses it within ``ha.lease_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid

from busd import source
from busd.config import Settings
from busd.errors import BusdError, KeyConflict, KeyMissing, LeaseLost


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """Create / compare-and-set on one key of a KV bucket whose TTL is the lease period."""

    def __init__(self, nc: source.Client, s: Settings) -> None:
        self.nc = nc
        self.bucket = s.ha.bucket
        self.key = s.nats.consumer
        self.ttl_s = s.ha.lease_ttl_s
        self.me = instance_id()
        self.revision = 0
        self.renewed_at = 0.0
        self.kv: source.Bucket | None = None
        # renewals (the keeper) and checks (before acks) run concurrently: a check that read
        # the key after a renewal landed but before its answer would see "another" revision
        self._one_at_a_time = asyncio.Lock()

    async def open(self) -> None:
        self.kv = await source.Bucket.open(self.nc, self.bucket, self.ttl_s)

    @property
    def _kv(self) -> source.Bucket:
        if self.kv is None:
            raise BusdError("the lease is used before open()")
        return self.kv

    async def acquire(self) -> bool:
        try:
            self.revision = await self._kv.create(self.key, self.me.encode())
        except KeyConflict:
            # ours all the same when a create that timed out here reached the server later
            # (nats-py sends what it buffered during an outage once it reconnects)
            return await self._adopted()
        self.renewed_at = time.monotonic()
        return True

    async def _adopted(self) -> bool:
        """The key carries our own name at another revision (a write of ours that timed out
        was applied after all): take that revision and write again from it. False when the
        key is someone else's or gone."""
        try:
            revision, value = await self._kv.get(self.key)
        except KeyMissing:
            return False
        if value.decode() != self.me:
            return False
        try:
            self.revision = await self._kv.update(self.key, self.me.encode(), last=revision)
        except KeyConflict:
            return False
        self.renewed_at = time.monotonic()
        return True

    async def renew(self) -> None:
        """Extend the lease; raise LeaseLost if someone else holds it now."""
        async with self._one_at_a_time:
            try:
                self.revision = await self._kv.update(
                    self.key, self.me.encode(), last=self.revision
                )
            except KeyConflict:
                if await self._adopted():
                    return
                raise LeaseLost(
                    f"lost the lease {self.bucket}/{self.key} to "
                    f"{await self.holder() or 'nobody (expired)'}"
                ) from None
            self.renewed_at = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.renewed_at > self.ttl_s / 3

    async def check(self) -> None:
        """Before an ack: the key must still carry our revision."""
        async with self._one_at_a_time:
            try:
                entry = await self._kv.get(self.key)
            except KeyMissing:
                raise LeaseLost(f"the lease {self.bucket}/{self.key} expired") from None
        if entry[0] != self.revision:
            if entry[1].decode() == self.me:  # a renewal that timed out, applied after all
                self.revision = entry[0]
                return
            raise LeaseLost(f"lost the lease {self.bucket}/{self.key} to {entry[1].decode()}")

    async def holder(self) -> str | None:
        try:
            entry = await self._kv.get(self.key)
        except KeyMissing:
            return None
        return entry[1].decode() or None

    async def release(self) -> None:
        """On a clean stop, so a standby takes over at once instead of after the TTL. Only a
        lease this process holds: a delete at revision 0 would be unconditional (nats-py
        checks the revision only above 0) and remove another instance's lease."""
        if self.revision <= 0:
            return
        with contextlib.suppress(Exception):
            await self._kv.delete(self.key, last=self.revision)
