"""One error tree for busd, and the closed set of rejection reasons.

The same :class:`Reason` enum fills ``catalog.rejections_f.reason`` and labels the
``busd_rejections_total`` metric, so the three can never disagree.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, part of the command-line contract."""

    OK = 0
    RUNTIME = 1
    USAGE = 2
    REJECTED = 3
    TIMEOUT = 4


class Reason(enum.StrEnum):
    """Why an event was rejected; a closed set (docs/reference/reasons.md)."""

    MALFORMED = "malformed"
    SCHEMA = "schema"
    UNSUPPORTED_VERSION = "unsupported_version"
    PRODUCER_MISMATCH = "producer_mismatch"
    EVENT_ID_CONFLICT = "event_id_conflict"
    POISON = "poison"
    PATH_OUTSIDE_ROOTS = "path_outside_roots"
    FILE_MISSING = "file_missing"
    FILE_UNREADABLE = "file_unreadable"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    NOT_PARQUET = "not_parquet"
    ROWS_MISMATCH = "rows_mismatch"
    TOO_LARGE = "too_large"


class Outcome(enum.StrEnum):
    """The one outcome every stream message ends in."""

    COMMITTED = "committed"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class BusdError(Exception):
    """Base of every error busd raises on purpose."""

    exit_code: ExitCode = ExitCode.RUNTIME


class ConfigError(BusdError):
    """A bad configuration value or command-line argument; the message names the key."""

    exit_code = ExitCode.USAGE


class InvalidEvent(BusdError):
    """An event that is permanently invalid: it is rejected with ``reason`` and never retried."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class FileNotYetThere(InvalidEvent):
    """A named file that may still be on its way: missing (``file_missing``), not readable by
    busd yet (``file_unreadable``), or with a content verdict reached while the file was still
    changing (the verdict's reason). Retried until ``verify.file_wait_s``, then rejected with
    ``reason`` and ``detail``."""

    def __init__(self, detail: str, reason: Reason = Reason.FILE_MISSING) -> None:
        super().__init__(reason, detail)


class TransientError(BusdError):
    """Something outside the event failed (NATS, disk); the message is kept and retried."""


class FileUnavailable(TransientError):
    """The machine failed while reading an artifact's file (EIO, EMFILE, ENFILE, ENOMEM,
    ESTALE, a check that took longer than ``verify.check_timeout_s``): nothing is known
    about the event. It is checked again later while busd keeps the message in hand, so this
    never rejects it and never costs a delivery."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class StorageError(BusdError):
    """The catalog or an export could not be made durable (write or fsync failed)."""


class FatalStorageError(StorageError):
    """Durability can no longer be trusted (a failed fsync, a DuckDB fatal error): exit."""


class CatalogLocked(BusdError):
    """Another process holds the catalog's write lock (a second ``busd serve``)."""


class ConsumerGone(TransientError):
    """The durable consumer or its stream was deleted under busd."""


class PullUnanswered(ConsumerGone):
    """A pull request answered 503 (no responders): the consumer is gone, or has no leader
    now (a cluster that lost its quorum); declaring it again tells which."""


class Stalled(BusdError):
    """There is a backlog but nothing was acked for ``consumer.stall_s``."""


class TimedOut(BusdError):
    """A command waited for longer than its timeout."""

    exit_code = ExitCode.TIMEOUT


class Rejected(BusdError):
    """A submitted event was rejected by busd (``busd submit --wait``)."""

    exit_code = ExitCode.REJECTED


class LeaseLost(BusdError):
    """Another instance holds the HA lease: this one must not ack anything any more."""


class KeyConflict(BusdError):
    """A KV key was created or changed by someone else first (compare-and-set failed)."""


class KeyMissing(BusdError):
    """A KV key does not exist (never created, deleted, or expired by the bucket's TTL)."""
