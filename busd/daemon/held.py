"""The record of the messages busd holds (``held.json`` beside the catalog), kept durable
for :mod:`busd.deaths`, which counts from it how often busd died holding each one (`poison`).

Loaded at the start (each sequence the last busd held when it died counts one death) and
rewritten at once to say nothing is held; written again before busd handles what it fetched
and after it gave messages back (naks); cleared at an exit busd decided on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio

from busd import log
from busd.daemon.keeper import Progress
from busd.deaths import Deaths
from busd.errors import BusdError, FatalStorageError, StorageError
from busd.inflight import Ledger


def a_death(exc: BaseException) -> bool:
    """An exit busd did not decide on: it counts as a death for every message held."""
    decided = (BusdError, KeyboardInterrupt, SystemExit, anyio.get_cancelled_exc_class())
    return not isinstance(exc, decided)


class HeldRecord:
    """``held.json`` for the sequences in ``ledger``; its writes count as progress."""

    def __init__(self, path: Path, ledger: Ledger, progress: Progress) -> None:
        self.path, self.ledger, self.progress = path, ledger, progress
        self.deaths: Deaths | None = None  # once loaded
        self.log = log.get()
        # the fetch loop and a commit's settlement both rewrite it: one write at a time, each
        # of what is held when it begins (an older snapshot never lands after a newer one)
        self._writing = asyncio.Lock()

    def load(self) -> Deaths:
        """What the last busd held when it died counts one death each; the record says
        nothing is held at once (a start that fails is no death of a message). On a thread."""
        deaths = Deaths.load(self.path)
        if deaths.unreadable is not None:
            self.log.warning("the record of deaths is unreadable", why=deaths.unreadable)
        held = {seq: n for seq, n in deaths.counts.items() if n}
        if held:
            self.log.warning(
                "busd died holding messages; each counts toward poison",
                messages=len(held),
                most_deaths=max(held.values()),
            )
        data = deaths.encode(())
        if data is not None:
            try:
                deaths.write(data)
            except FatalStorageError:
                raise
            except StorageError as exc:  # a full disk: the old record is gone, counts kept
                self.log.warning("cannot record the messages held", error=str(exc))
        self.deaths = deaths
        return deaths

    async def record(self) -> None:
        """Every sequence busd holds now, durably (its deaths are counted from this record
        at the next start)."""
        assert self.deaths is not None
        async with self._writing:
            data = self.deaths.encode(self.ledger.seqs())
            if data is None:
                return
            self.progress.write_started()  # a slow disk is no stall (nor a commit beside it)
            try:
                await anyio.to_thread.run_sync(self.deaths.write, data)
            except FatalStorageError:
                raise
            except StorageError as exc:  # a full disk: this death would go uncounted
                self.log.warning("cannot record the messages held", error=str(exc))
            finally:
                self.progress.write_ended()

    async def close(self, died: BaseException | None, grace_s: float) -> None:
        """Nothing is held any more, unless busd dies of an exception it did not decide on:
        an event that raises one each time (whatever its type: an OSError or a MemoryError is
        no proof that the machine is at fault) must end as `poison` as surely as one that
        crashes busd. busd's own verdicts (a failed fsync, a stall, a lost lease, the consumer
        gone) and a signal are no fault of what it held."""
        if self.deaths is None or (died is not None and a_death(died)):
            return
        self.deaths.closing = True  # a write still in flight leaves the record alone
        try:
            with anyio.move_on_after(grace_s):
                # a disk that does not answer: left behind, and the deaths are counted
                await anyio.to_thread.run_sync(self.deaths.close, abandon_on_cancel=True)
        except StorageError as exc:  # the record is removed if it cannot be rewritten
            self.log.warning("cannot clear the record of messages held", error=str(exc))
