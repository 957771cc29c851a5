"""The fold's storage while serving: catalog reads on the writer thread (the one thread
that owns the catalog's connection), payloads read back from the stream. Replay has its
own (:class:`busd.replay.ReplayStore`), so the fold never needs a daemon to run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from busd import log, source
from busd.catalog import Catalog
from busd.errors import FatalStorageError, StorageError
from busd.model import Claim, Known, Sibling

PAYLOAD_RETRY_S = (0.5, 5.0)  # the first and the longest pause between two reads
READ_RETRY_S = (0.5, 10.0)  # ... of the catalog, as between two commits


class LiveStore:
    def __init__(
        self,
        catalog: Catalog,
        on_writer: Callable[..., Awaitable[Any]],
        nc: source.Client,
        stream: str,
        patience_s: float = float("inf"),
    ) -> None:
        self.catalog, self.on_writer, self.nc, self.stream = catalog, on_writer, nc, stream
        self.patience_s = patience_s  # of a JetStream that is not there (source.Waiting)

    async def lookup(
        self, seqs: Sequence[int], event_ids: Sequence[str]
    ) -> tuple[dict[int, Known], dict[str, Claim]]:
        found: tuple[dict[int, Known], dict[str, Claim]] = await self._read(
            self.catalog.lookup, seqs, event_ids
        )
        return found

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]:
        found: list[Sibling] = await self._read(self.catalog.siblings, event_id, after_seq)
        return found

    async def _read(self, read: Callable[..., Any], *args: Any) -> Any:
        """A catalog read, asked again while it fails (a disk that returns EIO): the batch
        stays in hand meanwhile, as for a failing commit; an exit would count a death of
        every message held, and enough of them make a valid event `poison`."""
        delay_s = READ_RETRY_S[0]
        while True:
            try:
                return await self.on_writer(read, *args)
            except FatalStorageError:
                raise
            except StorageError as exc:
                log.get().error("catalog read failed; retrying", error=str(exc), retry_in_s=delay_s)
            await anyio.sleep(delay_s)
            delay_s = min(delay_s * 2, READ_RETRY_S[1])

    async def payload(self, seq: int) -> bytes:
        """A stored payload (an event_id taken over: the demoted one's, for its rejection).
        Asked again while NATS does not answer: the batch stays in hand meanwhile (a stop
        gives it up after its grace period), never an exit that counts as a death."""
        delay_s = PAYLOAD_RETRY_S[0]
        waiting = source.Waiting(self.patience_s)
        while True:
            try:
                return await source.stored_payload(self.nc, self.stream, seq)
            except Exception as exc:
                if not source.unanswered(exc):
                    raise
                if waiting.unanswered(exc, "read a payload back"):
                    log.get().warning(
                        "NATS does not answer; reading a payload again", seq=seq, error=repr(exc)
                    )
            await anyio.sleep(delay_s)
            delay_s = min(delay_s * 2, PAYLOAD_RETRY_S[1])
