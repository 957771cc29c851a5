"""The in-flight ledger: every delivery busd holds and has not settled yet, in one place.

A delivery enters when it is fetched, is marked with the generation of its commit once it
waits for the export refresh that covers it, and leaves when it is acked, terminated or
nak'ed. The ledger is the one source for the in-progress signals that keep the server from
redelivering what busd is still working on (whether a file check, a commit or a refresh is
slow), for the acks after a refresh, and for the naks at shutdown.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from busd.model import Delivery


@dataclass(slots=True)
class Entry:
    d: Delivery
    since: float  # when the server last heard of it: delivered, or told it is in progress
    generation: int = 0  # 0 while being checked or committed; then the commit's generation


class Ledger:
    """Owned by the daemon's event loop; nothing else mutates it."""

    def __init__(self) -> None:
        self._entries: dict[int, Entry] = {}
        # sequences committed and waiting for their export (the request API reads it)
        self.waiting: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def seqs(self) -> list[int]:
        return list(self._entries)

    def hold(self, deliveries: Iterable[Delivery], now: float) -> None:
        for d in deliveries:
            self._entries[d.seq] = Entry(d, now)

    def wait(self, deliveries: Iterable[Delivery], generation: int, now: float) -> None:
        """Committed (or already known): acked after the refresh of ``generation``."""
        for d in deliveries:
            entry = self._entries.get(d.seq)
            if entry is None or entry.d.reply != d.reply:
                entry = self._entries[d.seq] = Entry(d, now)
            entry.generation = generation
            self.waiting.add(d.seq)

    def release(self, seqs: Iterable[int]) -> None:
        """Settled (acked, terminated or nak'ed): the server owns them again."""
        for seq in seqs:
            self._entries.pop(seq, None)
            self.waiting.discard(seq)

    def ackable(self, generation: int) -> list[Entry]:
        """Waiting entries that a refresh covering ``generation`` made ready to ack."""
        return [e for e in self._entries.values() if 0 < e.generation <= generation]

    def waiting_for_export(self) -> bool:
        return bool(self.waiting)

    def due_progress(self, now: float, every_s: float) -> list[str]:
        """Replies of entries the server has not heard of for ``every_s``; they count as
        told from now on."""
        due = [e for e in self._entries.values() if now - e.since >= every_s]
        for e in due:
            e.since = now
        return [e.d.reply for e in due]

    def held(self) -> Sequence[Delivery]:
        return [e.d for e in self._entries.values()]
