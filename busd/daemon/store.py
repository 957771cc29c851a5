"""The fold's storage while serving: catalog reads on the writer thread (the one thread
that owns the catalog's connection), payloads read back from the stream. Replay has its
own (:class:`busd.replay.ReplayStore`), so the fold never needs a daemon to run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from busd import source
from busd.catalog import Catalog
from busd.model import Claim, Known, Sibling


class LiveStore:
    def __init__(
        self,
        catalog: Catalog,
        on_writer: Callable[..., Awaitable[Any]],
        nc: source.Client,
        stream: str,
    ) -> None:
        self.catalog, self.on_writer, self.nc, self.stream = catalog, on_writer, nc, stream

    async def lookup(
        self, seqs: Sequence[int], event_ids: Sequence[str]
    ) -> tuple[dict[int, Known], dict[str, Claim]]:
        found: tuple[dict[int, Known], dict[str, Claim]] = await self.on_writer(
            self.catalog.lookup, seqs, event_ids
        )
        return found

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]:
        found: list[Sibling] = await self.on_writer(self.catalog.siblings, event_id, after_seq)
        return found

    async def payload(self, seq: int) -> bytes:
        return await source.stored_payload(self.nc, self.stream, seq)
