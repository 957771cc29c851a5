"""Declaring the stream and the durable consumer (or, bind-only, finding them), and the rest
of what busd asks of JetStream: readers, lag lookups, the HA lease's bucket.

Every JetStream context comes from :func:`busd.source.connect.jetstream`: the configured domain
or API prefix. Errors are told apart by their types and JetStream error codes, not their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from busd.config import Settings
from busd.errors import BusdError, ConsumerGone, KeyConflict, KeyMissing
from busd.source.connect import Client, jetstream, js_api_prefix, unanswered

MAX_MSG_BYTES = 1024 * 1024
DUPLICATE_WINDOW_S = 3600.0
# JetStream API error codes (nats-server's errors.json)
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
GENERAL_ERROR = 10012  # JetStream's "general error": a 500, here the server's own storage


def files_lost(exc: BaseException) -> bool:
    """A 500 from a server holding the consumer without its files (a create that raced the
    removal of the deleted consumer's directory): every later create or update fails the
    same way until that consumer is deleted."""
    return getattr(exc, "err_code", None) == GENERAL_ERROR and "no such file or directory" in str(
        getattr(exc, "description", "")
    )


class BindOnlyMissing(BusdError):
    """``nats.bind_only`` is set and the stream or the consumer does not exist."""


def stream_config(s: Settings) -> api.StreamConfig:
    return api.StreamConfig(
        name=s.nats.stream,
        subjects=list(s.nats.subjects),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=0,
        max_msg_size=MAX_MSG_BYTES,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        deny_purge=True,
        discard=api.DiscardPolicy.OLD,
        num_replicas=s.nats.stream_replicas,
    )


def backoff_s(ack_wait_s: float, max_deliver: int) -> list[float]:
    """Redelivery delays after a crash: ack_wait, then doubling, capped at 10 minutes."""
    return [min(ack_wait_s * 2**i, max(600.0, ack_wait_s)) for i in range(min(max_deliver - 1, 6))]


def consumer_config(s: Settings) -> api.ConsumerConfig:
    c = s.consumer
    return api.ConsumerConfig(
        durable_name=s.nats.consumer,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=c.ack_wait_s,
        # unlimited: busd judges `poison` from its own count of deaths (busd.deaths), as the
        # server's count also grows with every NATS outage longer than the ack wait
        max_deliver=-1,
        backoff=backoff_s(c.ack_wait_s, c.max_deliver),
        max_ack_pending=c.max_ack_pending,
        max_waiting=512,
    )


def broken_promises(info: api.StreamInfo, s: Settings) -> list[str]:
    """Settings of an existing stream that break the contract's promises (reported only)."""
    cfg = info.config
    problems = []
    if cfg.retention != api.RetentionPolicy.LIMITS:
        problems.append(f"retention is {cfg.retention}, replay needs limits")
    if cfg.max_age:
        problems.append(f"max_age is {cfg.max_age}s, replay needs no max age")
    if cfg.max_msgs not in (None, -1) or cfg.max_bytes not in (None, -1):
        problems.append("max_msgs/max_bytes limits drop history that replay needs")
    if not cfg.deny_delete or not cfg.deny_purge:
        problems.append("deny_delete/deny_purge are off: history can be erased")
    if (cfg.duplicate_window or 0) < DUPLICATE_WINDOW_S:
        problems.append(f"duplicate_window is {cfg.duplicate_window}s, expected 3600s")
    return problems


async def ensure_stream(nc: Client, s: Settings) -> list[str]:
    """Create the stream if missing; return the promises an existing one breaks.

    With ``nats.bind_only`` the stream is never created: :class:`BindOnlyMissing` names it."""
    js = jetstream(nc)
    try:
        info = await js.stream_info(s.nats.stream)
    except NotFoundError:
        if s.nats.bind_only:
            raise BindOnlyMissing(
                f"stream {s.nats.stream} not found (nats.bind_only: busd does not create it; "
                "create it where the stream is managed, or turn nats.bind_only off)"
            ) from None
        await js.add_stream(stream_config(s))
        return []
    return broken_promises(info, s)


async def ensure_consumer(nc: Client, s: Settings) -> api.ConsumerInfo:
    """Create or update the durable pull consumer (create-or-update is idempotent).

    With ``nats.bind_only`` it is only looked up, never created or updated:
    :class:`BindOnlyMissing` names what is missing (the stream or the consumer)."""
    js = jetstream(nc)
    if s.nats.bind_only:
        try:
            found: api.ConsumerInfo = await js.consumer_info(s.nats.stream, s.nats.consumer)
        except NotFoundError as exc:
            what = (
                f"stream {s.nats.stream}"
                if exc.err_code == STREAM_NOT_FOUND
                else f"consumer {s.nats.consumer} on stream {s.nats.stream}"
            )
            raise BindOnlyMissing(
                f"{what} not found (nats.bind_only: busd does not create it; create it where "
                "the stream and consumer are managed, or turn nats.bind_only off)"
            ) from None
        return found
    info: api.ConsumerInfo = await js.add_consumer(s.nats.stream, consumer_config(s))
    return info


async def redeclare_consumer(
    nc: Client,
    s: Settings,
    *,
    within_s: float = 30.0,
    stopping: Callable[[], bool] = lambda: False,
    turned: Callable[[BaseException], None] = lambda exc: None,
) -> bool:
    """Declare the durable consumer again; False when ``stopping()`` first. While NATS or
    JetStream does not answer (an outage, a cluster without a leader) it is asked again for
    as long as that lasts, each try a turn (``turned(error)``: busd is waiting, not stuck).
    ConsumerGone when the stream itself is gone, the consumer is not busd's to create
    (bind-only), or JetStream kept refusing for ``within_s`` (counted from the first
    refusal since NATS last failed to answer: a server that just came back may refuse for a
    moment). A server left holding the consumer without its files (its create raced the
    removal of the deleted one's) has that consumer deleted before the next try."""
    delay_s = 0.2
    refused_since: float | None = None
    while True:
        try:
            await ensure_consumer(nc, s)
            return True
        except BindOnlyMissing as exc:
            raise ConsumerGone(f"the consumer is gone: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - JetStream restarting, NATS down
            if isinstance(exc, NotFoundError) and exc.err_code == STREAM_NOT_FOUND:
                raise ConsumerGone(f"the consumer is gone and cannot be recreated: {exc}") from None
            if unanswered(exc):
                refused_since = None
                turned(exc)
            else:
                now = time.monotonic()
                refused_since = now if refused_since is None else refused_since
                if now - refused_since > within_s:
                    raise ConsumerGone(
                        f"the consumer is gone and cannot be recreated: {exc}"
                    ) from None
                if files_lost(exc):  # it was gone already: nothing of it is lost
                    with contextlib.suppress(Exception):
                        await jetstream(nc).delete_consumer(s.nats.stream, s.nats.consumer)
        pause_until = time.monotonic() + delay_s
        while time.monotonic() < pause_until:
            if stopping():
                return False
            await asyncio.sleep(0.1)
        delay_s = min(delay_s * 2, 5.0)


async def consumer_state(nc: Client, s: Settings) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the durable consumer; ConsumerGone when it (or its
    stream) no longer exists."""
    info = await consumer_limits(nc, s)
    return info[0], info[1]


async def consumer_limits(nc: Client, s: Settings) -> tuple[int, int, int]:
    """(num_pending, num_ack_pending, max_ack_pending) of the durable consumer as the
    server has it (a bound consumer keeps a limit of its own); ConsumerGone when gone."""
    try:
        info = await jetstream(nc).consumer_info(s.nats.stream, s.nats.consumer)
    except NotFoundError as exc:
        raise ConsumerGone(f"consumer {s.nats.consumer} not found: {exc}") from None
    limit = info.config.max_ack_pending if info.config else None
    return (
        int(info.num_pending or 0),
        int(info.num_ack_pending or 0),
        int(limit) if limit and limit > 0 else s.consumer.max_ack_pending,
    )


async def stored_payload(nc: Client, stream: str, seq: int) -> bytes:
    """The payload of one stored message, read back from the stream by sequence."""
    msg = await jetstream(nc).get_msg(stream, seq)
    return bytes(msg.data or b"")


# ---- the rest of what busd asks of NATS: readers, the HA lease's bucket, requests --------
async def add_reader(nc: Client, stream: str, name: str, start_seq: int, *, idle_s: float) -> None:
    """An ephemeral, ack-less consumer from ``start_seq`` (replay, the standby, backfill);
    the server deletes it after ``idle_s`` without a pull."""
    await jetstream(nc).add_consumer(
        stream,
        api.ConsumerConfig(
            name=name,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=(
                api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else api.DeliverPolicy.ALL
            ),
            opt_start_seq=start_seq if start_seq > 1 else None,
            inactive_threshold=idle_s,
            mem_storage=True,
            num_replicas=1,
        ),
    )


async def delete_consumer(nc: Client, stream: str, name: str) -> None:
    await jetstream(nc).delete_consumer(stream, name)


async def stream_bounds(nc: Client, stream: str) -> tuple[int, int]:
    """(first, last) sequence the stream holds now."""
    info = await jetstream(nc).stream_info(stream)
    return int(info.state.first_seq or 0), int(info.state.last_seq or 0)


async def ack_floor(nc: Client, s: Settings) -> int:
    """The durable consumer's ack floor: every sequence up to it is settled."""
    info = await jetstream(nc).consumer_info(s.nats.stream, s.nats.consumer)
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def delivered_seq(nc: Client, s: Settings) -> int:
    """The highest sequence the durable consumer has delivered (0 if it was never bound):
    whoever held the lease before could ack, even late, any message up to here."""
    try:
        info = await jetstream(nc).consumer_info(s.nats.stream, s.nats.consumer)
    except NotFoundError:
        return 0
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


async def next_stored_seq(nc: Client, stream: str, seq: int) -> int | None:
    """The first sequence at or after ``seq`` still in the stream; None past its end."""
    try:
        found = (await jetstream(nc).get_msg(stream, seq, subject=">", next=True)).seq
    except NotFoundError:
        return None
    return None if found is None else int(found)


class _PutThrough:
    """A JetStream context whose publishes to ``$KV.`` go through ``prefix`` (the KV
    write subject of another JetStream domain: ``$JS.<domain>.API.$KV.<bucket>.<key>``)."""

    def __init__(self, js: Any, prefix: str) -> None:
        self._js = js
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.startswith("$KV."):
            subject = f"{self._prefix}.{subject}"
        return await self._js.publish(subject, *args, **kwargs)


class Bucket:
    """One KV bucket (the HA lease): compare-and-set on keys, busd's errors, no nats types."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client, bucket: str, ttl_s: float) -> Bucket:
        """The bucket, created with this TTL (file storage, no history) if it is missing."""
        js = jetstream(nc)
        try:
            kv: Any = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket, ttl=ttl_s, history=1, storage=api.StorageType.FILE
                )
            )
        prefix = js_api_prefix(nc)
        if prefix != api.DEFAULT_PREFIX:
            # nats-py writes a key to $KV.<bucket>.<key> on the local server; in another
            # domain (or account) the write goes through its API prefix, as nats.go does
            kv._js = _PutThrough(kv._js, prefix)
        return cls(kv)

    async def create(self, key: str, value: bytes) -> int:
        """Create the key; its revision. KeyConflict when it exists."""
        try:
            return int(await self._kv.create(key, value))
        except KeyWrongLastSequenceError:
            raise KeyConflict(key) from None

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        """Set the key if its revision is still ``last``; the new revision, or KeyConflict."""
        try:
            return int(await self._kv.update(key, value, last=last))
        except KeyWrongLastSequenceError:
            raise KeyConflict(key) from None

    async def get(self, key: str) -> tuple[int, bytes]:
        """(revision, value); KeyMissing when it is not there."""
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            raise KeyMissing(key) from None
        return int(entry.revision), bytes(entry.value or b"")

    async def delete(self, key: str, *, last: int) -> None:
        await self._kv.delete(key, last=last)


# ---- lag in time (see busd.lag) -------------------------------------------------------------
async def oldest_unsettled_age_s(
    js: Any, stream: str, consumer: str, now: dt.datetime | None = None
) -> float:
    """Seconds since the first message after the consumer's ack floor was stored; 0 when the
    consumer has nothing pending or awaiting an ack. Two JetStream API requests, only while
    there is a backlog. ``js``: a JetStream context (:func:`lag_age_s` passes busd's)."""
    info = await js.consumer_info(stream, consumer)
    if not (info.num_pending or info.num_ack_pending):
        return 0.0
    floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor is not None else 0
    # the next message at or after floor + 1 that the consumer reads: a deleted sequence (or
    # one of another subject than the consumer's filter) is skipped, not an error
    wanted = (info.config.filter_subject if info.config is not None else None) or ">"
    try:
        msg = await js.get_msg(stream, seq=floor + 1, subject=wanted, next=True)
    except NotFoundError:  # acked or removed meanwhile: nothing older is waiting
        return 0.0
    if msg.time is None:
        return 0.0
    stored: dt.datetime = msg.time
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=dt.UTC)
    return max(0.0, ((now or dt.datetime.now(dt.UTC)) - stored).total_seconds())


async def lag_age_s(nc: Client, s: Settings, now: dt.datetime | None = None) -> float:
    """:func:`oldest_unsettled_age_s` of busd's durable consumer, on the configured JetStream."""
    return await oldest_unsettled_age_s(jetstream(nc), s.nats.stream, s.nats.consumer, now)
