"""The pull loop: one pull request per batch on one inbox subscription, and settlement.

The pull loop is thin on purpose (measured: nats-py's stock ``fetch`` costs 80–100 µs of CPU
per message and raises TimeoutError on an empty stream): one pull request per batch on one
inbox subscription, status replies parsed here, an empty batch when nothing is there. The next
request is sent as soon as a batch is handed out, so the server fills it while busd works.
The inbox has busd's private prefix (``nats.inbox_prefix``) and the request goes to the
configured JetStream API prefix (domain).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import nats
from nats.aio.msg import Msg

from busd.errors import ConsumerGone, PullUnanswered
from busd.model import Delivery
from busd.source.connect import Client, js_api_prefix

# Bytes one pull request may bring (the server ends it with a 409 status past this). The
# server cuts a client whose outbound buffer passes its max_pending (64 MiB by default) as
# a slow consumer: a replay's 5,000-message request of 100 KB events asked for 500 MB and
# lost its connection. Two requests can be in flight (the prefetch); an event is <= 1 MiB.
REQUEST_BYTES = 16 << 20


def parse_ack_subject(reply: str) -> tuple[int, int, int]:
    """``$JS.ACK...`` → (delivered count, stream sequence, timestamp in ns), v1 or v2 form."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    return int(tokens[base + 2]), int(tokens[base + 3]), int(tokens[base + 5])


class PullSource:
    """A lean pull loop on one inbox subscription (see the module docstring)."""

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
        self.nc = nc
        self.next_subject = f"{js_api_prefix(nc)}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self._sub: Any = None
        self._buf: list[Msg] = []
        self._token = 0
        self._want = 0
        self._wake = asyncio.Event()
        self._done_token = -1
        self._gone: ConsumerGone | None = None
        self._outstanding = False
        self.max_bytes = REQUEST_BYTES  # 0: none, after a message larger than it
        self._since_request = 0  # messages since the last request went out

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{self.inbox}.*",
            cb=self._on_msg,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        # A status reply of the server has no ack subject; a stored message always has one,
        # whatever headers and body its producer gave it (an empty body with a 'Status'
        # header is an event to reject, not the server speaking).
        if (
            headers
            and "Status" in headers
            and not msg.data
            and not (msg.reply or "").startswith("$JS.ACK.")
        ):
            status = headers["Status"]
            if status == "100":  # idle heartbeat or flow control
                return
            token = msg.subject.rsplit(".", 1)[-1]
            # a status reply is typed by its code; 409 and 404 carry several meanings that
            # only the server's description tells apart (there is no error code in them)
            description = headers.get("Description", "")
            if (
                status == "409"
                and "maxbytes" in description.lower()
                and self.max_bytes
                and token == str(self._token)  # not a late end of an earlier request
                and not self._since_request
            ):
                # the usual end of a request that brought its bytes' worth; with nothing
                # brought, the next message alone is larger than a request may bring (a
                # stream busd did not create, on a server that takes larger payloads)
                self.max_bytes = 0
                logging.getLogger("busd.nats").warning(
                    "a message is larger than a pull request's byte limit (%d); asking without it",
                    REQUEST_BYTES,
                )
            if status == "409" and "deleted" in description.lower():
                self._gone = ConsumerGone(f"the consumer is gone: {description}")
            elif status == "404" and "consumer" in description.lower():
                self._gone = ConsumerGone(f"the consumer is gone: {status} {description}")
            elif status == "503":
                self._gone = PullUnanswered(f"pull requests unanswered: {status} {description}")
            if token == str(self._token):
                self._done_token = self._token
                self._wake.set()
            return
        self._buf.append(msg)
        self._since_request += 1
        if len(self._buf) >= self._want:
            self._wake.set()

    async def _request(self, batch: int, wait_ms: int, *, want: int) -> None:
        """Ask the server for ``batch`` more; wake the fetch once ``want`` are buffered."""
        self._token += 1
        self._since_request = 0
        self._want = want
        self._outstanding = True
        request = {"batch": batch, "expires": wait_ms * 1_000_000}
        if self.max_bytes:
            request["max_bytes"] = self.max_bytes
        body = json.dumps(request).encode()
        await self.nc.publish(self.next_subject, body, reply=f"{self.inbox}.{self._token}")

    async def fetch(
        self,
        batch: int,
        wait_ms: int,
        *,
        prefetch: Callable[[], bool] | None = None,
        until: asyncio.Future[Any] | None = None,
    ) -> list[Delivery]:
        """Up to ``batch`` messages within about ``wait_ms``; an empty list when none came.
        Then the next request goes out at once unless ``prefetch()`` says no (stopping).

        With ``until``: an empty list as soon as that future is done before a full batch is
        buffered; the request in flight stays in flight for the next call."""
        if self._gone is not None:
            raise self._gone
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
                    await asyncio.wait(
                        [waiter] if until is None else [waiter, until],
                        timeout=wait_ms / 1000 + 2.0,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                if until is not None and until.done() and not self._wake.is_set():
                    return []
        self._outstanding = False
        if self._gone is not None:
            raise self._gone
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
