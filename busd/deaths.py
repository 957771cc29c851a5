"""busd's own count of the times it died holding a message: `poison` is judged from it.

The server's delivery count cannot tell an event that kills busd from an outage: it also grows
when NATS is down for longer than the ack wait (busd cannot say it is still working on what it
holds) and when the server restarts. So before busd handles a fetched batch it records, durably,
every sequence it holds; a clean exit clears that record. A busd that starts and finds
sequences recorded as held died holding them: each counts one death. A sequence leaves the
count once it reaches an outcome (acked or terminated).

The record is a small JSON file beside the catalog, replaced atomically (write, fsync, rename).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import msgspec

from busd.durable import replace_synced, write_temp
from busd.errors import FatalStorageError, StorageError


class _Record(msgspec.Struct, forbid_unknown_fields=False):
    held: list[tuple[int, int]] = []  # sequences in hand, as [first, last] ranges
    deaths: dict[int, int] = {}  # sequence → deaths counted so far, not settled yet


def _ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1] = (out[-1][0], seq)
        elif not out or seq > out[-1][1]:
            out.append((seq, seq))
    return out


class Deaths:
    """Owned by the daemon's event loop; :meth:`write` alone runs on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[int, int] = {}
        self.unreadable: str | None = None  # why a record found at start was not used
        self._written: bytes | None = None
        # set (on the event loop) once busd clears the record at a decided exit: a write still
        # in flight on a slow disk then leaves the record alone, whenever its fsync returns
        self.closing = False
        self._renames = threading.Lock()  # a write's check of `closing` and its rename

    @classmethod
    def load(cls, path: Path) -> Deaths:
        """The counts a previous busd left: one more death for each sequence it held."""
        deaths = cls(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return deaths
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            record = msgspec.json.decode(raw, type=_Record)
        except msgspec.DecodeError as exc:  # replaced atomically: only a hand could break it
            deaths.unreadable = f"{path} is not a record of deaths ({exc}); counting from 0"
            return deaths
        deaths.counts = dict(record.deaths)
        for first, last in record.held:
            for seq in range(first, last + 1):
                deaths.counts[seq] = deaths.counts.get(seq, 0) + 1
        return deaths

    def __call__(self, seq: int) -> int:
        return self.counts.get(seq, 0)

    def forget(self, seqs: Iterable[int]) -> None:
        """Settled for good (acked or terminated): never delivered again."""
        if self.counts:
            for seq in seqs:
                self.counts.pop(seq, None)

    def settled_through(self, ack_floor: int) -> None:
        """Every sequence up to the consumer's ack floor is settled."""
        self.counts = {seq: n for seq, n in self.counts.items() if seq > ack_floor}

    def encode(self, held: Iterable[int]) -> bytes | None:
        """The record for ``held`` now (on the event loop), or None if it is written already."""
        data = msgspec.json.encode(_Record(_ranges(held), self.counts))
        return None if data == self._written else data

    def write(self, data: bytes) -> None:
        """Durable before busd handles what it holds (on a thread: two fsyncs). When it
        cannot be written (a full disk), the old record is removed, which needs no space: a
        stale list of what busd held would count deaths for messages it no longer held. The
        counts stay in memory and are written with the next record that fits. A failed fsync
        raises FatalStorageError, as everywhere."""
        self._write(data, final=False)

    def _write(self, data: bytes, *, final: bool) -> None:
        try:
            tmp = write_temp(self.path, data)
            with self._renames:
                if self.closing and not final:  # the exit's record is (being) written
                    tmp.unlink(missing_ok=True)
                    return
                replace_synced(tmp, self.path)
        except FatalStorageError:
            raise
        except StorageError:
            if final or not self.closing:  # else the exit's record is not this write's to drop
                self._remove()
            raise
        self._written = data

    def close(self) -> None:
        """A clean exit: nothing held; the file goes when no count is left either (at once:
        no write of its own to wait for). ``closing`` is set first, so that no write in
        flight lands after this."""
        self.closing = True
        if self.counts:
            data = self.encode(())
            if data is not None:
                self._write(data, final=True)
        else:
            self._remove()

    def _remove(self) -> None:
        self._written = None
        try:
            with self._renames:
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot remove {self.path}: {exc.strerror}") from exc
