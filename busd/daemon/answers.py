"""The daemon's request API on NATS, and the catalog reads behind it.

``busd serve`` answers requests on ``busd.api.<consumer>.<verb>`` so the tools work while it
holds the catalog's lock (``submit --wait``, ``rejections``, ``export``, ``verify``). When no
daemon answers, the same reads run on the catalog file directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from busd.catalog import Catalog
from busd.model import decode, encode
from busd.sql import first_row


def outcome_of(catalog: Catalog, seq: int) -> dict[str, Any]:
    row = first_row(
        catalog.con,
        "SELECT e.outcome, e.reason, r.detail, e.event_id FROM catalog.events_f e "
        "LEFT JOIN catalog.rejections_f r USING (seq) WHERE e.seq = ?",
        [seq],
    )
    if row is None:
        return {"seq": seq, "state": "pending"}
    return {
        "seq": seq,
        "state": "done",
        "outcome": row[0],
        "reason": row[1],
        "detail": row[2],
        "event_id": row[3],
    }


def poison_of(catalog: Catalog) -> dict[int, str]:
    """Sequences quarantined as poison, with their details (replay keeps them quarantined)."""
    rows = catalog.con.execute(
        "SELECT seq, detail FROM catalog.rejections_f WHERE reason = 'poison'"
    ).fetchall()
    return {int(seq): str(detail) for seq, detail in rows}


# the columns of a rejection as the request API and `busd rejections` show it
_REJECTION_KEYS = (
    "seq", "subject", "event_id", "reason", "detail", "deliveries", "published_at", "rejected_at",
)  # fmt: skip


def list_rejections(
    catalog: Catalog,
    *,
    reason: str | None = None,
    producer: str | None = None,
    since: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    where, params = ["true"], []
    if reason:
        where.append("r.reason = ?")
        params.append(reason)
    if producer:
        where.append("e.producer = ?")
        params.append(producer)
    if since:
        where.append("r.published_at >= ?::TIMESTAMPTZ")
        params.append(since)
    rows = catalog.con.execute(
        "SELECT r.seq, r.subject, r.event_id, r.reason, r.detail, r.deliveries, "
        "r.published_at, r.rejected_at, e.producer FROM catalog.rejections_f r "
        f"LEFT JOIN catalog.events_f e USING (seq) WHERE {' AND '.join(where)} "
        "ORDER BY r.seq LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [dict(zip((*_REJECTION_KEYS, "producer"), _plain(r), strict=True)) for r in rows]


def get_rejection(catalog: Catalog, seq: int) -> dict[str, Any] | None:
    row = first_row(
        catalog.con,
        "SELECT seq, subject, event_id, reason, detail, deliveries, published_at, "
        "rejected_at, payload FROM catalog.rejections_f WHERE seq = ?",
        [seq],
    )
    if row is None:
        return None
    out = dict(zip(_REJECTION_KEYS, _plain(row[:-1]), strict=True))
    payload = bytes(row[-1])
    out["payload"] = payload.decode("utf-8", errors="replace")
    out["payload_hex"] = None if _is_utf8(payload) else payload.hex()
    return out


def memory_of(catalog: Catalog) -> dict[str, int]:
    """DuckDB's memory by tag, in bytes (indexes, cached blocks, …): its share of the RSS."""
    rows = catalog.con.execute(
        "SELECT tag, memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes > 0"
    ).fetchall()
    return {str(tag): int(size) for tag, size in rows}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _plain(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v.isoformat() if isinstance(v, dt.datetime) else v for v in row)


class Answers:
    """The daemon's side: one handler for every verb, catalog reads on the writer thread."""

    def __init__(
        self,
        on_writer: Callable[..., Awaitable[Any]],
        catalog: Catalog,
        exports: Sequence[str],
        waiting: Collection[int],
        refresh: Callable[[Sequence[str]], Awaitable[None]],
    ) -> None:
        self.on_writer = on_writer
        self.catalog = catalog
        self.exports = list(exports)
        self.waiting = waiting  # sequences committed but not yet acked (export pending)
        self.refresh = refresh

    async def respond(self, msg: Any) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        try:
            answer = await self.call(verb, decode(msg.data))
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the daemon
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(Exception):
            await msg.respond(encode(answer))

    async def call(self, verb: str, args: Any) -> Any:
        catalog = self.catalog
        if verb == "outcome":
            seq = int(args["seq"])
            answer = await self.on_writer(outcome_of, catalog, seq)
            # asked after the read: a commit settles (and marks what waits for the export)
            # before the writer thread runs this read, so this cannot miss a waiting sequence
            if seq in self.waiting:
                return {"seq": seq, "state": "pending"}
            return answer
        if verb == "rejections":
            return await self.on_writer(functools.partial(list_rejections, catalog, **args))
        if verb == "rejection":
            return await self.on_writer(get_rejection, catalog, int(args["seq"]))
        if verb == "poison":
            return {str(k): v for k, v in (await self.on_writer(poison_of, catalog)).items()}
        if verb == "memory":
            return await self.on_writer(memory_of, catalog)
        if verb == "export":
            names = args.get("names") or self.exports
            unknown = sorted(set(names) - set(self.exports))
            if unknown:
                return {"error": f"no such export: {', '.join(unknown)}"}
            await self.refresh(names)
            return {"refreshed": names}
        return {"error": f"unknown verb {verb!r}"}
