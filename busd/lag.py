"""Lag in time: how old is the oldest message the durable consumer has not settled yet.

Counting messages (``num_pending``, ``num_ack_pending``) does not say whether a backlog is a
second or an hour old. Consumer-lag exporters answer with the age of the oldest unconsumed
message; for a JetStream consumer with explicit acks that is the first stored message after
the consumer's ack floor (everything at or below the floor is acked). It covers a message busd
holds (a slow file check, commit or refresh), one it nak'ed and waits to see again (a file
not there yet), and one not fetched at all (busd stuck before the fetch), which busd's own
in-flight ledger alone would miss.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from nats.js.errors import NotFoundError


async def oldest_unsettled_age_s(js: Any, stream: str, consumer: str,
                                 now: dt.datetime | None = None) -> float:
    """Seconds since the first message after the consumer's ack floor was stored; 0 when the
    consumer has nothing pending or awaiting an ack. Two JetStream API requests, only while
    there is a backlog."""
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
