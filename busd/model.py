"""The types every stage shares, and nothing else: the base layer.

The artifact event (schema version 1), a delivery from the stream, the rows a batch commits
and what the catalog already knows, a delivery with its outcome, and the wire forms of
settlement and of the daemon's request API. No stage needs another to name a type; this
module imports no stage.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from busd.errors import Outcome, Reason

# ---- the artifact event ---------------------------------------------------------------------
SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_ARTIFACTS = 1000
MAX_DEPTH = 64
IDENT_PATTERN = r"^[A-Za-z0-9._:/-]{1,200}$"
IMPORT_PRODUCER = "busd.import"  # the producer of `busd import`'s events, unless told

Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=IDENT_PATTERN)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
PathText = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Short = Annotated[str, msgspec.Meta(max_length=200)]


class Artifact(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One file a job wrote. ``rows``, ``bytes`` and ``sha256`` are checked when given."""

    name: Ident
    path: PathText
    rows: Count | None = None
    bytes: Count | None = None
    sha256: Sha256Hex | None = None
    meta: dict[str, Any] | None = None


class Run(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The job that produced the artifacts."""

    run_id: Ident
    kind: Ident
    status: Short | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    params: dict[str, Any] | None = None
    code_version: Short | None = None
    parent_run_id: Ident | None = None


class ArtifactEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One finished job: its run and the 1–1000 artifacts it wrote."""

    schema_version: int
    run: Run
    artifacts: Annotated[list[Artifact], msgspec.Meta(min_length=1, max_length=MAX_ARTIFACTS)]
    event_id: Ident | None = None
    producer: Ident | None = None


# ---- a delivery, and how it is settled ------------------------------------------------------
@dataclass(slots=True)
class Delivery:
    """One stream message as delivered to busd."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str
    delivered: int
    published_ns: int

    @property
    def published_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.published_ns / 1e9, dt.UTC)

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id") if self.headers else None


ACK = b"+ACK"
TERM = b"+TERM"
PROGRESS = b"+WPI"


def nak_body(delay_s: float) -> bytes:
    return b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode()


# ---- the catalog's rows and what it knows ---------------------------------------------------
@dataclass
class Batch:
    """Rows of one batch, column-ordered as the ``*_COLUMNS`` tuples above."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    rejections: list[tuple[Any, ...]] = field(default_factory=list)
    artifacts: list[tuple[Any, ...]] = field(default_factory=list)
    runs: list[tuple[Any, ...]] = field(default_factory=list)
    demotions: list[tuple[Any, ...]] = field(default_factory=list)
    exports: list[tuple[Any, ...]] = field(default_factory=list)  # exports_d rows

    def __bool__(self) -> bool:
        return bool(self.events)


@dataclass
class Changed:
    """The ``first_seq`` of every ``runs_d`` and ``artifacts_f`` row transactions changed
    (what a partitioned export rewrites); None: rows may have moved or gone, rewrite all."""

    runs: set[int] | None = field(default_factory=set)
    artifacts: set[int] | None = field(default_factory=set)

    def update(self, other: Changed) -> None:
        self.runs = None if self.runs is None or other.runs is None else self.runs | other.runs
        self.artifacts = (
            None
            if self.artifacts is None or other.artifacts is None
            else self.artifacts | other.artifacts
        )


@dataclass(frozen=True, slots=True)
class Known:
    """What the catalog already holds for a stream sequence."""

    outcome: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    """The committed sequence that holds an event_id, and its payload's hash."""

    payload_hash: str
    seq: int
    in_batch: bool = False


@dataclass(frozen=True, slots=True)
class Sibling:
    """A later sequence that carried the same event_id (committed, duplicate or conflict)."""

    seq: int
    payload_hash: str
    outcome: str
    reason: str | None


# ---- a delivery decided -------------------------------------------------------------------
@dataclass(slots=True)
class Decided:
    """A delivery with its outcome, or none yet: a file still awaited (nak after
    ``nak_delay_s``), or one the machine failed to read (``recheck_s``: kept in hand and
    checked again after that long, which costs no delivery)."""

    d: Delivery
    outcome: Outcome | None
    reason: Reason | None = None
    detail: str = ""
    event_id: str | None = None
    producer: str = ""
    run_id: str | None = None
    payload_hash: str = ""
    n_artifacts: int = 0
    nak_delay_s: float = 0.0
    recheck_s: float | None = None
    known: bool = False  # recorded by an earlier delivery: settle again, change nothing
    traceparent: str | None = None  # the message's valid W3C `traceparent` header


@dataclass
class Folded:
    decided: list[Decided]
    rows: Batch
    touched: set[str] = field(default_factory=set)  # artifact names committed


# ---- the daemon's request API on NATS: its wire form --------------------------------------
SUBJECT = "busd.api.{consumer}.{verb}"


def subject(consumer: str, verb: str) -> str:
    return SUBJECT.format(consumer=consumer, verb=verb)


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def decode(data: bytes) -> Any:
    return msgspec.json.decode(data) if data else {}
