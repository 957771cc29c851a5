"""The only module that talks to nats-py: connect, declare the stream and consumer, pull.

The pull loop is thin on purpose (measured: nats-py's stock ``fetch`` costs 80–100 µs of CPU
per message and raises TimeoutError on an empty stream): one pull request per batch on one
inbox subscription, status replies parsed here, an empty batch when nothing is there. The next
request is sent as soon as a batch is handed out, so the server fills it while busd works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import nats
from nats.aio.client import Client as Client  # the type of a connection, for callers
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from busd.config import NatsSettings, Settings, is_nkey_seed
from busd.errors import (
    BusdError,
    ConfigError,
    ConsumerGone,
    KeyConflict,
    KeyMissing,
    TransientError,
)
from busd.model import Delivery

MAX_MSG_BYTES = 1024 * 1024
DUPLICATE_WINDOW_S = 3600.0


def parse_ack_subject(reply: str) -> tuple[int, int, int]:
    """``$JS.ACK...`` → (delivered count, stream sequence, timestamp in ns), v1 or v2 form."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 2]), int(tokens[base + 3]), int(tokens[base + 5])


def _tls_context(n: NatsSettings) -> ssl.SSLContext | None:
    """Verify the server against ``tls_ca`` (else the system's CAs), present ``tls_cert``."""
    if not (n.tls_ca or n.tls_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=n.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"bad value for nats.tls_ca: {n.tls_ca}: {_why(exc)}") from None
    if n.tls_cert:
        try:
            ctx.load_cert_chain(n.tls_cert, n.tls_key or None, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"bad value for nats.tls_cert/nats.tls_key: {n.tls_cert}: "
                              f"{_why(exc)}") from None
    return ctx


def _no_password() -> str:
    raise ssl.SSLError("the key is encrypted: busd needs an unencrypted nats.tls_key")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # set by OpenSSL, not on an SSLError made here
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(exc, ssl.SSLError) and exc.args:
        return str(exc.args[-1])
    return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)


def _refusal(n: NatsSettings, exc: BaseException) -> str | None:
    """Why the server turned busd away for good (credentials, certificates), or None when
    trying again may help (no server yet, a timeout)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's TLS certificate is not trusted ({exc.verify_message}): "
                "check nats.tls_ca and the host name in nats.url")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS refused ({_why(exc)}): check nats.tls_ca, nats.tls_cert and "
                "nats.tls_key")
    text = str(exc)
    if isinstance(exc, nats.errors.Error) and ("authorization" in text.lower()
                                               or "authentication" in text.lower()):
        keys = [k for k in ("creds", "nkey_seed", "user", "token") if getattr(n, k)]
        used = ", ".join(f"nats.{k}" for k in keys) if keys else "no credentials configured"
        return f"credentials refused ({text.removeprefix('nats: ').strip()}; {used})"
    return None


class _Client(Client):
    """nats-py decodes a message's subject strictly, but the server relays subjects that are
    not UTF-8: one such publish would end nats-py's read loop and busd with it. Decode with
    replacement instead; the event is then rejected like any other bad input."""

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: dict[str, str] | None) -> Msg:
        return self.msg_class(subject=subject.decode(errors="replace"),
                              reply=reply.decode(errors="replace"), data=data, headers=headers,
                              _client=self, _sid=sid)


async def _close_quietly(nc: Client) -> None:
    """Release a connection that failed to open; nats-py can hang closing one whose TLS
    handshake failed, so this is bounded."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 2.0)


WAITING_SAID_EVERY_S = 30.0  # busd serve repeats "waiting for NATS" at least this often
WAITING_RETRY_S = 0.5  # between two connection attempts while NATS is down


class NatsUnreachable(TransientError):
    """No NATS server answered within ``nats.connect_timeout_s``."""

    def __init__(self, url: str, timeout_s: float, cause: BaseException) -> None:
        super().__init__(f"cannot reach NATS at {url} within {float(timeout_s)}s "
                         f"({_unreachable_why(cause)})")
        self.url = url


def _unreachable_why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc).removeprefix("nats: ").strip() or type(exc).__name__


async def connect(
    n: NatsSettings,
    url: str,
    *,
    name: str = "busd",
    on_state: Callable[[bool], None] | None = None,
    reconnect: bool = True,
) -> Client:
    """Connect with the configured credentials; reconnect forever when ``reconnect``.

    The first connection fails at once when the server refuses the credentials or the TLS
    certificates (a :class:`BusdError`, exit 1): retrying cannot fix them. Any other failure
    of the first connection is retried for at most ``nats.connect_timeout_s`` in all, then
    :class:`NatsUnreachable`: a caller that must wait for NATS (``busd serve``) calls again.
    """
    connecting = True
    last_error: list[BaseException] = []

    async def disconnected() -> None:
        if on_state and not connecting:
            on_state(False)

    async def reconnected() -> None:
        if on_state:
            on_state(True)

    async def error(exc: Exception) -> None:
        # nats-py reports each failed attempt here; raising ends its first-connect loop.
        if connecting:
            last_error[:] = [exc]
            if _refusal(n, exc) is not None:
                raise exc

    servers = [u.strip() for u in url.split(",") if u.strip()]
    options: dict[str, Any] = {
        "servers": servers,
        "name": name,
        # each server gets its share of the deadline: one that drops packets must not use it
        # all before a live one of the same cluster is tried
        "connect_timeout": n.connect_timeout_s / max(1, len(servers)),
        # For the first connect: every server of the list, one retry each, and the deadline
        # below bounds it all (without allow_reconnect nats-py gives up after the first
        # server; max_reconnect_attempts=0 would retry a refusing server forever). Once
        # connected, the caller's choice applies (set below).
        "allow_reconnect": True,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "pending_size": 64 * 1024 * 1024,
    }
    if n.creds:
        options["user_credentials"] = n.creds
    if n.nkey_seed:
        if is_nkey_seed(n.nkey_seed):
            options["nkeys_seed_str"] = n.nkey_seed.strip()
        else:
            options["nkeys_seed"] = n.nkey_seed
    if n.user:
        options["user"] = n.user
        options["password"] = n.password
    if n.token:
        options["token"] = n.token
    tls = _tls_context(n)
    if tls is not None:
        options["tls"] = tls
    nc = _Client()
    try:
        # nats-py bounds each attempt, not the loop over attempts and servers around them.
        async with asyncio.timeout(n.connect_timeout_s):
            await nc.connect(**options)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await _close_quietly(nc)
        refused = _refusal(n, exc)
        if refused is not None:
            raise BusdError(f"NATS at {url} refused busd: {refused}") from None
        raise NatsUnreachable(url, n.connect_timeout_s,
                              last_error[0] if last_error else exc) from None
    except Exception as exc:
        await _close_quietly(nc)
        if type(exc).__module__.split(".")[0] == "nkeys":  # a seed nkeys cannot decode
            key = "nats.creds" if n.creds else "nats.nkey_seed"
            raise ConfigError(f"bad value for {key}: not a valid nkey seed "
                              f"({type(exc).__name__})") from None
        raise
    connecting = False
    # nats-py reads both at each disconnection
    nc.options["allow_reconnect"] = reconnect
    nc.options["max_reconnect_attempts"] = -1 if reconnect else 0
    if on_state:
        on_state(True)
    return nc


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
        max_deliver=c.max_deliver,
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
    """Create the stream if missing; return the promises an existing one breaks."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(s.nats.stream)
    except NotFoundError:
        await js.add_stream(stream_config(s))
        return []
    return broken_promises(info, s)


async def ensure_consumer(nc: Client, s: Settings) -> api.ConsumerInfo:
    """Create or update the durable pull consumer (create-or-update is idempotent)."""
    js = nc.jetstream()
    info: api.ConsumerInfo = await js.add_consumer(s.nats.stream, consumer_config(s))
    return info


async def redeclare_consumer(nc: Client, s: Settings, *, within_s: float = 30.0) -> None:
    """Declare the durable consumer again, retrying while JetStream restarts; ConsumerGone
    when the stream itself is gone or nothing worked within ``within_s``."""
    delay_s, deadline = 0.2, time.monotonic() + within_s
    while True:
        try:
            await ensure_consumer(nc, s)
            return
        except Exception as exc:  # noqa: BLE001 - JetStream restarting, NATS down, stream gone
            if "stream not found" in str(exc).lower() or time.monotonic() > deadline:
                raise ConsumerGone(
                    f"the consumer is gone and cannot be recreated: {exc}") from None
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)


class PullSource:
    """A lean pull loop on one inbox subscription (see the module docstring)."""

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self.nc = nc
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self._sub: Any = None
        self._buf: list[Msg] = []
        self._token = 0
        self._want = 0
        self._wake = asyncio.Event()
        self._done_token = -1
        self._gone: str | None = None
        self._outstanding = False

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_msg,
                                            pending_msgs_limit=1_000_000,
                                            pending_bytes_limit=1 << 30)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            status = headers["Status"]
            if status == "100":  # idle heartbeat or flow control
                return
            token = msg.subject.rsplit(".", 1)[-1]
            description = headers.get("Description", "")
            if status == "409" and "deleted" in description.lower():
                self._gone = description
            elif status == "503" or (status == "404" and "consumer" in description.lower()):
                self._gone = f"{status} {description}".strip()
            if token == str(self._token):
                self._done_token = self._token
                self._wake.set()
            return
        self._buf.append(msg)
        if len(self._buf) >= self._want:
            self._wake.set()

    async def _request(self, batch: int, wait_ms: int, *, want: int) -> None:
        """Ask the server for ``batch`` more; wake the fetch once ``want`` are buffered."""
        self._token += 1
        self._want = want
        self._outstanding = True
        body = json.dumps({"batch": batch, "expires": wait_ms * 1_000_000}).encode()
        await self.nc.publish(self.next_subject, body, reply=f"{self.inbox}.{self._token}")

    async def fetch(self, batch: int, wait_ms: int, *,
                    prefetch: Callable[[], bool] | None = None,
                    until: asyncio.Future[Any] | None = None) -> list[Delivery]:
        """Up to ``batch`` messages within about ``wait_ms``; an empty list when none came.
        Then the next request goes out at once unless ``prefetch()`` says no (stopping).

        With ``until``: an empty list as soon as that future is done before a full batch is
        buffered; the request in flight stays in flight for the next call."""
        if self._gone:
            raise ConsumerGone(f"the consumer is gone: {self._gone}")
        if not self.nc.is_connected and not self._buf:
            # no pull requests while NATS is away: nats-py would queue each one and send
            # them all in a burst on reconnect; the server forgot the one in flight anyway
            self._outstanding = False
            await asyncio.sleep(wait_ms / 1000)
            return []
        if not self._outstanding and len(self._buf) < batch:
            await self._request(batch - len(self._buf), wait_ms, want=batch)
        if len(self._buf) < batch:
            self._wake.clear()
            if self._done_token != self._token:
                # a lost status reply times out: take what came
                waiter = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait([waiter] if until is None else [waiter, until],
                                       timeout=wait_ms / 1000 + 2.0,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if until is not None and until.done() and not self._wake.is_set():
                    return []
        self._outstanding = False
        if self._gone:
            raise ConsumerGone(f"the consumer is gone: {self._gone}")
        msgs, self._buf = self._buf[:batch], self._buf[batch:]
        if (prefetch is None or prefetch()) and self.nc.is_connected and len(self._buf) < batch:
            await self._request(batch - len(self._buf), wait_ms, want=batch)
        return [self._delivery(m) for m in msgs]

    def buffered(self) -> list[Delivery]:
        """Messages delivered and not handed out yet (kept in progress during an outage)."""
        return [self._delivery(m) for m in self._buf]

    def reset(self) -> None:
        """Forget the pull request in flight (after the consumer was declared again)."""
        self._gone = None
        self._outstanding = False
        self._done_token = self._token

    def take_buffered(self) -> list[Delivery]:
        """Messages delivered but not handed out (at shutdown: to be nak'ed)."""
        msgs, self._buf = self._buf, []
        return [self._delivery(m) for m in msgs]

    @staticmethod
    def _delivery(m: Msg) -> Delivery:
        delivered, seq, ts = parse_ack_subject(m.reply)
        return Delivery(seq, m.subject, m.data, m.headers, m.reply, delivered, ts)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


class Settler:
    """Sends acks, naks, terms and progress; the wire side of settlement (one flush a batch)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def send(self, items: Sequence[tuple[str, bytes]]) -> None:
        for reply, body in items:
            await self.nc.publish(reply, body)
        if items:
            await self.nc.flush(timeout=10)


async def consumer_state(nc: Client, s: Settings) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the durable consumer; ConsumerGone when it (or its
    stream) no longer exists."""
    try:
        info = await nc.jetstream().consumer_info(s.nats.stream, s.nats.consumer)
    except NotFoundError as exc:
        raise ConsumerGone(f"consumer {s.nats.consumer} not found: {exc}") from None
    return int(info.num_pending or 0), int(info.num_ack_pending or 0)



async def stored_payload(nc: Client, stream: str, seq: int) -> bytes:
    """The payload of one stored message, read back from the stream by sequence."""
    msg = await nc.jetstream().get_msg(stream, seq)
    return bytes(msg.data or b"")


# ---- the rest of what busd asks of NATS: readers, the HA lease's bucket, requests --------
async def add_reader(nc: Client, stream: str, name: str, start_seq: int, *,
                     idle_s: float) -> None:
    """An ephemeral, ack-less consumer from ``start_seq`` (replay, the standby, backfill);
    the server deletes it after ``idle_s`` without a pull."""
    await nc.jetstream().add_consumer(stream, api.ConsumerConfig(
        name=name, ack_policy=api.AckPolicy.NONE,
        deliver_policy=(api.DeliverPolicy.BY_START_SEQUENCE if start_seq > 1
                        else api.DeliverPolicy.ALL),
        opt_start_seq=start_seq if start_seq > 1 else None,
        inactive_threshold=idle_s, mem_storage=True, num_replicas=1))


async def delete_consumer(nc: Client, stream: str, name: str) -> None:
    await nc.jetstream().delete_consumer(stream, name)


async def stream_bounds(nc: Client, stream: str) -> tuple[int, int]:
    """(first, last) sequence the stream holds now."""
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.first_seq or 0), int(info.state.last_seq or 0)


async def ack_floor(nc: Client, s: Settings) -> int:
    """The durable consumer's ack floor: every sequence up to it is settled."""
    info = await nc.jetstream().consumer_info(s.nats.stream, s.nats.consumer)
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def delivered_seq(nc: Client, s: Settings) -> int:
    """The highest sequence the durable consumer has delivered (0 if it was never bound):
    whoever held the lease before could ack, even late, any message up to here."""
    try:
        info = await nc.jetstream().consumer_info(s.nats.stream, s.nats.consumer)
    except NotFoundError:
        return 0
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


async def next_stored_seq(nc: Client, stream: str, seq: int) -> int | None:
    """The first sequence at or after ``seq`` still in the stream; None past its end."""
    try:
        found = (await nc.jetstream().get_msg(stream, seq, subject=">", next=True)).seq
    except NotFoundError:
        return None
    return None if found is None else int(found)


async def request(nc: Client, subject: str, data: bytes, *, timeout_s: float) -> bytes:
    """A core NATS request; its answer's payload."""
    reply = await nc.request(subject, data, timeout=timeout_s)
    return bytes(reply.data or b"")


class Bucket:
    """One KV bucket (the HA lease): compare-and-set on keys, busd's errors, no nats types."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client, bucket: str, ttl_s: float) -> Bucket:
        """The bucket, created with this TTL (file storage, no history) if it is missing."""
        js = nc.jetstream()
        try:
            return cls(await js.key_value(bucket))
        except BucketNotFoundError:
            return cls(await js.create_key_value(api.KeyValueConfig(
                bucket=bucket, ttl=ttl_s, history=1, storage=api.StorageType.FILE)))

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
