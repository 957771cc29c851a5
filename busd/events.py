"""The artifact event, schema version 1 (docs/reference/events.md): types, decoding, JSON Schema.

``decode`` turns raw message bytes into an :class:`ArtifactEvent` or raises
:class:`~busd.errors.InvalidEvent` with one of the closed-set reasons. Decoding runs on the
caller's thread; the nesting depth is bounded *before* msgspec sees the bytes (msgspec#1033).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import msgspec

from busd.errors import InvalidEvent, Reason
from busd.model import (
    IDENT_PATTERN,
    MAX_ARTIFACTS,
    MAX_DEPTH,
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    ArtifactEvent,
)

_decoder = msgspec.json.Decoder(ArtifactEvent)
_loose = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
# A string runs to its closing quote or to the end of the payload: a match at a quote never
# fails, so the scan stays linear (a failing one made unclosed `"\"\"…` quadratic).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\[\s\S])*(?:"|\\?\Z)|[\[\]{}]')


def nesting_depth_exceeds(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when JSON ``payload`` nests deeper than ``limit`` (strings are skipped)."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    depth = 0
    for match in _TOKENS.finditer(payload):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def decode(payload: bytes) -> ArtifactEvent:
    """Decode and check one event; raise InvalidEvent with the reason on any violation."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidEvent(Reason.TOO_LARGE, f"payload of {len(payload)} bytes is over 1 MiB")
    if nesting_depth_exceeds(payload):
        raise InvalidEvent(Reason.TOO_LARGE, f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        event = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _explain(payload, str(exc)) from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # incl. bad UTF-8
        raise InvalidEvent(Reason.MALFORMED, f"not a JSON object: {exc}") from None
    if event.schema_version != SCHEMA_VERSION:
        raise InvalidEvent(
            Reason.UNSUPPORTED_VERSION,
            f"schema_version {event.schema_version} (busd reads {SCHEMA_VERSION})",
        )
    run = event.run
    for where, text in (
        ("event_id", event.event_id),
        ("producer", event.producer),
        ("run.run_id", run.run_id),
        ("run.kind", run.kind),
        ("run.parent_run_id", run.parent_run_id),
    ):
        if text is not None and text.endswith("\n"):
            raise _newline(f"$.{where}")
    seen: set[str] = set()
    for i, artifact in enumerate(event.artifacts):
        if artifact.name.endswith("\n") or (artifact.sha256 or "").endswith("\n"):
            raise _newline(f"$.artifacts[{i}]")
        if artifact.name in seen:
            raise InvalidEvent(Reason.SCHEMA, f"artifact name {artifact.name!r} appears twice")
        seen.add(artifact.name)
    return event


def _newline(where: str) -> InvalidEvent:
    """msgspec matches patterns with Python's ``re``, whose ``$`` also matches before a final
    newline: ``"run-1\\n"`` passes ``IDENT_PATTERN`` there (not in the published JSON Schema)."""
    return InvalidEvent(Reason.SCHEMA, f"an identifier ends in a newline - at `{where}`")


def _explain(payload: bytes, message: str) -> InvalidEvent:
    """Pick the reason for a payload that is JSON but not a valid event (the slow path)."""
    message = message.replace("Object contains unknown field", "unknown field")
    try:
        loose = _loose.decode(payload)
    except msgspec.ValidationError as exc:  # JSON, but a number out of range (1e999)
        if payload.lstrip(b" \t\r\n").startswith(b"{"):
            return InvalidEvent(Reason.SCHEMA, message)
        return InvalidEvent(Reason.MALFORMED, f"not a JSON object: {exc}")
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        return InvalidEvent(Reason.MALFORMED, f"not a JSON object: {exc}")
    if not isinstance(loose, dict):
        return InvalidEvent(Reason.MALFORMED, f"not a JSON object but {type(loose).__name__}")
    version = loose.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        return InvalidEvent(
            Reason.UNSUPPORTED_VERSION, f"schema_version {version} (busd reads {SCHEMA_VERSION})"
        )
    artifacts = loose.get("artifacts")
    if isinstance(artifacts, list) and len(artifacts) > MAX_ARTIFACTS:
        return InvalidEvent(
            Reason.TOO_LARGE, f"{len(artifacts)} artifacts (at most {MAX_ARTIFACTS})"
        )
    return InvalidEvent(Reason.SCHEMA, message)


def payload_sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def producer_of(subject: str) -> str:
    """``artifacts.lab.simulation`` → ``lab.simulation``: everything after the first token."""
    _, _, rest = subject.partition(".")
    return rest


def resolve_identity(
    event: ArtifactEvent, subject: str, msg_id: str | None, payload_hash: str
) -> tuple[str, str]:
    """Return (event_id, producer) for an event, checking the producer against the subject."""
    producer = producer_of(subject)
    if event.producer is not None and event.producer != producer:
        raise InvalidEvent(
            Reason.PRODUCER_MISMATCH,
            f"event says producer {event.producer!r}, subject {subject!r} says {producer!r}",
        )
    event_id = event.event_id or usable_msg_id(msg_id) or payload_hash
    return event_id, producer


_IDENT_FULL = re.compile(IDENT_PATTERN.removeprefix("^").removesuffix("$"))


def usable_msg_id(msg_id: str | None) -> str | None:
    """The ``Nats-Msg-Id`` header as an event id, only when it is a valid identifier; a header
    that is not (spaces, 300 characters, bytes that are not UTF-8) falls back to the payload's
    hash rather than costing the producer a good event."""
    if msg_id is not None and _IDENT_FULL.fullmatch(msg_id):
        return msg_id
    return None


# W3C Trace Context, level 1 (https://www.w3.org/TR/trace-context/#traceparent-header):
# version-traceid-parentid-flags in lowercase hex. A later version may append fields after a
# dash; its first four are read the same way.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
TRACEPARENT_HEADER = "traceparent"


def traceparent_of(headers: dict[str, str] | None) -> str | None:
    """The message's ``traceparent`` header when it is a valid W3C trace context, else None.

    An invalid one is ignored, never a rejection (a vendor restarts the trace, says the
    spec): version ``ff``, an all-zero trace or parent id, upper case, a version-00 value that
    is not exactly 55 characters. A later version keeps the 55 characters busd understands.
    The header name is matched without regard to case, as HTTP does."""
    if not headers:
        return None
    value = headers.get(TRACEPARENT_HEADER)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == TRACEPARENT_HEADER), None)
    if value is None:
        return None
    value = value.strip(" \t")
    found = _TRACEPARENT.match(value)
    if found is None:
        return None
    version, trace_id, parent_id, _ = found.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    return value[:55]


def encode(event: ArtifactEvent) -> bytes:
    return _encoder.encode(event)


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of the event, generated from the types above."""
    schema: dict[str, Any] = msgspec.json.schema(ArtifactEvent)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://busd.dev/schemas/artifact-event.v1.schema.json",
        "title": "busd artifact event, schema version 1",
        **schema,
    }


def json_schema_text() -> str:
    return msgspec.json.format(msgspec.json.encode(json_schema()), indent=2).decode() + "\n"
