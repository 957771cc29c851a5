"""Lag in time: how old is the oldest message the durable consumer has not settled yet.

Counting messages (``num_pending``, ``num_ack_pending``) does not say whether a backlog is a
second or an hour old. Consumer-lag exporters answer with the age of the oldest unconsumed
message; for a JetStream consumer with explicit acks that is the first stored message after
the consumer's ack floor (everything at or below the floor is acked). It covers a message busd
holds (a slow file check, commit or refresh), one it nak'ed and waits to see again (a file
not there yet), and one not fetched at all (busd stuck before the fetch), which busd's own
in-flight ledger alone would miss.

The JetStream lookups live in :mod:`busd.source` (the only door to NATS); this module names
them for the metrics side.
"""

from __future__ import annotations

from busd.source import lag_age_s as lag_age_s
from busd.source import oldest_unsettled_age_s as oldest_unsettled_age_s
