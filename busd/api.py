"""The daemon's request API on NATS, and the catalog reads behind it.

``busd serve`` answers requests on ``busd.api.<consumer>.<verb>`` so the tools work while it
holds the catalog's lock (``submit --wait``, ``rejections``, ``export``, ``verify``). When no
daemon answers, the same reads run on the catalog file directly.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from busd.catalog import Catalog, first_row

SUBJECT = "busd.api.{consumer}.{verb}"


def subject(consumer: str, verb: str) -> str:
    return SUBJECT.format(consumer=consumer, verb=verb)


def outcome_of(catalog: Catalog, seq: int) -> dict[str, Any]:
    row = first_row(catalog.con,
                    "SELECT e.outcome, e.reason, r.detail, e.event_id FROM catalog.events_f e "
                    "LEFT JOIN catalog.rejections_f r USING (seq) WHERE e.seq = ?", [seq])
    if row is None:
        return {"seq": seq, "state": "pending"}
    return {"seq": seq, "state": "done", "outcome": row[0], "reason": row[1], "detail": row[2],
            "event_id": row[3]}


def poison_of(catalog: Catalog) -> dict[int, str]:
    """Sequences quarantined as poison, with their details (replay keeps them quarantined)."""
    rows = catalog.con.execute(
        "SELECT seq, detail FROM catalog.rejections_f WHERE reason = 'poison'").fetchall()
    return {int(seq): str(detail) for seq, detail in rows}


def list_rejections(catalog: Catalog, *, reason: str | None = None,
                    producer: str | None = None, since: str | None = None,
                    limit: int = 100) -> list[dict[str, Any]]:
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
        "ORDER BY r.seq LIMIT ?", [*params, limit]).fetchall()
    keys = ("seq", "subject", "event_id", "reason", "detail", "deliveries", "published_at",
            "rejected_at", "producer")
    return [dict(zip(keys, _plain(r), strict=True)) for r in rows]


def get_rejection(catalog: Catalog, seq: int) -> dict[str, Any] | None:
    row = first_row(catalog.con,
                    "SELECT seq, subject, event_id, reason, detail, deliveries, published_at, "
                    "rejected_at, payload FROM catalog.rejections_f WHERE seq = ?", [seq])
    if row is None:
        return None
    keys = ("seq", "subject", "event_id", "reason", "detail", "deliveries", "published_at",
            "rejected_at")
    out = dict(zip(keys, _plain(row[:-1]), strict=True))
    payload = bytes(row[-1])
    out["payload"] = payload.decode("utf-8", errors="replace")
    out["payload_hex"] = None if _is_utf8(payload) else payload.hex()
    return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _plain(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(v.isoformat() if isinstance(v, dt.datetime) else v for v in row)


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def decode(data: bytes) -> Any:
    return msgspec.json.decode(data) if data else {}
