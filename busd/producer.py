"""Producer tools: build an artifact event from files and publish it (``busd submit``).

``ArtifactBus`` publishes with ``Nats-Msg-Id`` = the event id and waits for the PubAck (the
event is stored), and can wait until busd committed and exported it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.parquet as pq

from busd import events as ev
from busd import model, source
from busd.config import NatsSettings, Settings, parse_hostport
from busd.errors import BusdError, ConfigError, Rejected, TimedOut, TransientError


def describe(name: str, path: str | Path) -> model.Artifact:
    """An artifact entry with the file's absolute path, size, Parquet rows and SHA-256."""
    p = Path(path).absolute()
    try:
        with open(p, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = p.stat().st_size
    except OSError as exc:
        raise ConfigError(f"artifact {name}: cannot read {path}: {exc.strerror}") from None
    try:
        rows = int(pq.read_metadata(p).num_rows)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        raise ConfigError(f"artifact {name}: {path} is not a Parquet file ({exc})") from None
    return model.Artifact(name=name, path=str(p), rows=rows, bytes=size, sha256=digest)


def build_event(
    run_id: str,
    kind: str,
    files: Mapping[str, str | Path],
    *,
    producer: str | None = None,
    status: str | None = "succeeded",
    params: dict[str, Any] | None = None,
    event_id: str | None = None,
    code_version: str | None = None,
    parent_run_id: str | None = None,
) -> model.ArtifactEvent:
    """An event for one finished run; the default event id is stable for the same files."""
    artifacts = [describe(name, path) for name, path in files.items()]
    if event_id is None:
        fingerprint = hashlib.sha256(
            "".join(f"{a.name}={a.sha256};" for a in artifacts).encode()
        ).hexdigest()[:16]
        event_id = f"{run_id}:{fingerprint}"
    event = model.ArtifactEvent(
        schema_version=model.SCHEMA_VERSION,
        event_id=event_id,
        producer=producer,
        run=model.Run(
            run_id=run_id,
            kind=kind,
            status=status,
            params=params,
            code_version=code_version,
            parent_run_id=parent_run_id,
        ),
        artifacts=artifacts,
    )
    try:  # the same checks busd applies, before anything is sent
        ev.decode(ev.encode(event))
    except BusdError as exc:
        raise ConfigError(f"the event is not valid: {exc}") from None
    return event


def checked_traceparent(value: str | None) -> str | None:
    """A W3C ``traceparent`` for :func:`submit_sync` and ``busd submit --traceparent``: None
    for none or an empty value, a ConfigError for an invalid one (busd itself would ignore it,
    and the trace would silently not lead to the commit)."""
    if value is None or not value.strip():
        return None
    if ev.traceparent_of({ev.TRACEPARENT_HEADER: value}) is None:
        raise ConfigError(
            f"traceparent {value!r}: not a W3C trace context "
            "(00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lower case)"
        )
    return value.strip()


def headers_for(event: model.ArtifactEvent, traceparent: str | None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": event.event_id} if event.event_id else {}
    tp = checked_traceparent(traceparent)
    if tp is not None:
        headers[ev.TRACEPARENT_HEADER] = tp
    return headers


def nats_url(s: Settings) -> str:
    """The configured URL, or the address of the embedded server ``busd serve`` starts."""
    if s.nats.url:
        return s.nats.url
    host, port = parse_hostport(s.nats.embedded_listen, "nats.embedded_listen")
    return f"nats://[{host}]:{port}" if ":" in host else f"nats://{host}:{port}"


class ArtifactBus:
    """Async producer client. ``async with ArtifactBus(settings) as bus: await bus.submit(…)``."""

    def __init__(
        self, settings: Settings, *, producer: str = "busd.submit", prefix: str = "artifacts"
    ) -> None:
        self.settings = settings
        self.producer = producer
        self.prefix = prefix
        self.nc: Any = None

    async def __aenter__(self) -> ArtifactBus:
        self.nc = await source.connect(
            self.settings.nats, nats_url(self.settings), name="busd-submit", reconnect=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def publish(
        self,
        event: model.ArtifactEvent,
        *,
        timeout_s: float = 10.0,
        traceparent: str | None = None,
    ) -> int:
        """Publish and wait for the PubAck; return the stream sequence. ``traceparent``: the
        job's W3C trace context, sent as the ``traceparent`` header (busd keeps it with the
        event's catalog rows and names it in its log lines)."""
        subject = self.subject_for(event)
        payload = ev.encode(event)
        return await self.publish_raw(
            subject, payload, headers_for(event, traceparent) or None, timeout_s=timeout_s
        )

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        *,
        timeout_s: float = 10.0,
    ) -> int:
        try:
            ack = await self.nc.jetstream().publish(
                subject, payload, headers=headers, timeout=timeout_s
            )
        except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds
            refused = source.refusal(self.nc)  # a publish denied goes unanswered: say why
            raise TransientError(
                f"publish to {subject} failed: {exc or type(exc).__name__}"
                + (f" (NATS refused: {refused})" if refused else "")
            ) from None
        return int(ack.seq)

    async def wait(self, seq: int, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """Block until busd settled sequence ``seq``; raise Rejected or TimedOut."""
        subject = model.subject(self.settings.nats.consumer, "outcome")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await self.nc.request(subject, model.encode({"seq": seq}), timeout=2.0)
                answer: dict[str, Any] = msgspec.json.decode(reply.data)
            except Exception:  # noqa: BLE001 - no busd answering yet: keep waiting
                answer = {"state": "pending"}
            if answer.get("state") == "done":
                if answer.get("outcome") == "rejected":
                    raise Rejected(f"rejected: {answer.get('reason')}: {answer.get('detail')}")
                return answer
            if time.monotonic() > deadline:
                raise TimedOut(f"sequence {seq} was not settled within {timeout_s:.0f}s")
            await asyncio.sleep(0.1)

    def subject_for(self, event: model.ArtifactEvent) -> str:
        return f"{self.prefix}.{event.producer or self.producer}"

    async def submit(
        self,
        event: model.ArtifactEvent,
        *,
        wait: bool = False,
        timeout_s: float = 60.0,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        seq = await self.publish(event, timeout_s=min(timeout_s, 10.0), traceparent=traceparent)
        if not wait:
            return {"seq": seq, "event_id": event.event_id, "state": "stored"}
        return await self.wait(seq, timeout_s=timeout_s)


def submit_sync(
    settings: Settings,
    event: model.ArtifactEvent,
    *,
    wait: bool = False,
    timeout_s: float = 60.0,
    producer: str = "busd.submit",
    outbox: Path | None = None,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Blocking form of :meth:`ArtifactBus.submit`, for scripts.

    With ``outbox``, an event that cannot be stored (NATS unreachable) is written there
    instead, to be sent later by :func:`flush_outbox`; it is never lost and never blocks the
    producer for longer than the timeout.
    """

    async def go() -> dict[str, Any]:
        async with ArtifactBus(settings, producer=producer) as bus:
            return await bus.submit(event, wait=wait, timeout_s=timeout_s, traceparent=traceparent)

    try:
        return asyncio.run(asyncio.wait_for(go(), timeout_s + 5))
    except (TransientError, TimeoutError) as exc:
        if outbox is None:
            if isinstance(exc, TimeoutError):
                raise TimedOut(f"no answer from NATS within {timeout_s:.0f}s") from None
            raise
        bus = ArtifactBus(settings, producer=producer)
        headers = {"Nats-Msg-Id": event.event_id or "", **headers_for(event, traceparent)}
        path = to_outbox(outbox, bus.subject_for(event), ev.encode(event), headers)
        return {
            "state": "outbox",
            "path": str(path),
            "event_id": event.event_id,
            "error": str(exc) or type(exc).__name__,
        }


__all__ = ["ArtifactBus", "NatsSettings", "build_event", "describe", "submit_sync"]


class OutboxEntry(msgspec.Struct):
    """An event kept on disk while NATS was unreachable."""

    subject: str
    headers: dict[str, str]
    payload: str


def to_outbox(folder: Path, subject: str, payload: bytes, headers: dict[str, str]) -> Path:
    """Write the event atomically (temp file, fsync, rename); names sort in submission order."""
    from busd.durable import write_bytes_atomic

    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in headers.get("Nats-Msg-Id", ""))
    path = folder / f"{time.time_ns():020d}-{safe[:80] or 'event'}.json"
    entry = OutboxEntry(subject, headers, payload.decode())
    write_bytes_atomic(path, msgspec.json.encode(entry))
    return path


async def flush_outbox(bus: ArtifactBus, folder: Path) -> list[int]:
    """Send what the outbox holds, oldest first; a file is removed only after its PubAck.

    A flush killed between the PubAck and the unlink re-sends that event next time, and
    JetStream's duplicate window (keyed by Nats-Msg-Id) drops the second copy.
    """
    seqs: list[int] = []
    for path in sorted(folder.glob("*.json")):
        entry = msgspec.json.decode(path.read_bytes(), type=OutboxEntry)
        seqs.append(await bus.publish_raw(entry.subject, entry.payload.encode(), entry.headers))
        path.unlink()
    return seqs
