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
    """Why an event was rejected; a closed set (contract §4)."""

    MALFORMED = "malformed"
    SCHEMA = "schema"
    UNSUPPORTED_VERSION = "unsupported_version"
    PRODUCER_MISMATCH = "producer_mismatch"
    EVENT_ID_CONFLICT = "event_id_conflict"
    POISON = "poison"
    PATH_OUTSIDE_ROOTS = "path_outside_roots"
    FILE_MISSING = "file_missing"
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
    """A named file does not exist (yet): retried until ``verify.file_wait_s``, then rejected."""

    def __init__(self, detail: str) -> None:
        super().__init__(Reason.FILE_MISSING, detail)


class TransientError(BusdError):
    """Something outside the event failed (NATS, disk); the message is kept and retried."""


class StorageError(BusdError):
    """The catalog or an export could not be made durable (write or fsync failed)."""


class FatalStorageError(StorageError):
    """Durability can no longer be trusted (a failed fsync, a DuckDB fatal error): exit."""


class CatalogLocked(BusdError):
    """Another process holds the catalog's write lock (a second ``busd serve``)."""


class ConsumerGone(TransientError):
    """The durable consumer or its stream was deleted under busd."""


class Stalled(BusdError):
    """There is a backlog but nothing was acked for ``consumer.stall_s``."""


class TimedOut(BusdError):
    """A command waited for longer than its timeout."""

    exit_code = ExitCode.TIMEOUT


class Rejected(BusdError):
    """A submitted event was rejected by busd (``busd submit --wait``)."""

    exit_code = ExitCode.REJECTED
