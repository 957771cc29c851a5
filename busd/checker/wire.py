"""The file-check workers' wire, and the worker itself (``python -c WORKER_CODE``): a
request is (roots, checksum, settle_s, events) on stdin; the answer comes back on stdout in
frames of consecutive items, one item per event, sent as the checks go (a silent worker is
stuck). Both are length-prefixed msgpack."""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from busd import validate
from busd.errors import FileNotYetThere, FileUnavailable, InvalidEvent, Reason
from busd.model import Artifact
from busd.validate import CheckedArtifact, ChecksumPolicy, check_artifacts

Result = list[CheckedArtifact] | InvalidEvent | FileUnavailable

HEADER = 4  # bytes of length before each message
FLUSH_S = 0.1  # a worker sends what it has checked at least this often, while it checks


def check_one(
    artifacts: Sequence[Artifact],
    roots: Sequence[Path],
    checksum: ChecksumPolicy,
    settle_s: float = 0.0,
) -> Result:
    """One event's artifacts, or why they fail (permanently, for now, or by the machine)."""
    try:
        return check_artifacts(artifacts, roots, checksum, settle_s)
    except (InvalidEvent, FileUnavailable) as exc:
        return exc
    except (OSError, MemoryError) as exc:  # the machine, not the file: check again later
        return FileUnavailable(f"could not be checked: {type(exc).__name__}: {exc}")
    except (ValueError, RuntimeError) as exc:  # odd paths
        return InvalidEvent(
            Reason.NOT_PARQUET, f"could not be checked: {type(exc).__name__}: {exc}"
        )


def check_all(
    events: Sequence[Sequence[Artifact]],
    roots: Sequence[Path],
    checksum: ChecksumPolicy,
    settle_s: float = 0.0,
) -> list[Result]:
    """Check each event's artifacts; an event's result is its artifacts or why it failed."""
    return [check_one(artifacts, roots, checksum, settle_s) for artifacts in events]


# ---- the wire: a request is (roots, checksum, settle_s, events); the answer comes in frames
# of consecutive items, one item per event, sent as the checks go (a silent worker is stuck)
class Request(msgspec.Struct, array_like=True):
    roots: list[str]
    checksum: str
    settle_s: float
    events: list[list[Artifact]]


INVALID, WAIT, UNAVAILABLE = 0, 1, 2  # kinds of failure: final, retried until file_wait_s,
# or the machine's (checked again later)


class Failed(msgspec.Struct, array_like=True, tag=True):
    kind: int
    reason: str
    detail: str


class Checked(msgspec.Struct, array_like=True, tag=True):
    artifacts: list[CheckedArtifact]


Answer = Checked | Failed
encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
answer_decoder = msgspec.msgpack.Decoder(list[Answer])


def to_wire(result: Result) -> Answer:
    if isinstance(result, FileUnavailable):
        return Failed(UNAVAILABLE, "", result.detail)
    if isinstance(result, InvalidEvent):
        kind = WAIT if isinstance(result, FileNotYetThere) else INVALID
        return Failed(kind, result.reason.value, result.detail)
    return Checked(result)


def from_wire(answer: Answer) -> Result:
    if isinstance(answer, Checked):
        return answer.artifacts
    if answer.kind == UNAVAILABLE:
        return FileUnavailable(answer.detail)
    if answer.kind == WAIT:
        return FileNotYetThere(answer.detail, Reason(answer.reason))
    return InvalidEvent(Reason(answer.reason), answer.detail)


def with_meta(result: Result, artifacts: Sequence[Artifact]) -> Result:
    """Put back each artifact's ``meta`` (as JSON), which workers are not sent."""
    if not isinstance(result, list) or all(a.meta is None for a in artifacts):
        return result
    return [
        msgspec.structs.replace(
            checked, meta=None if art.meta is None else msgspec.json.encode(art.meta).decode()
        )
        for checked, art in zip(result, artifacts, strict=True)
    ]


def timed_out(timeout_s: float) -> FileUnavailable:
    return FileUnavailable(
        f"checking its files took longer than {timeout_s:g}s "
        "(verify.check_timeout_s): a stalled read?"
    )


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(HEADER, "little") + payload


# How busd starts a worker: ``python -c WORKER_CODE``. ``python -m busd.checker`` works too,
# but imports the package first: the pool, with asyncio and the logging stack, a third of a
# worker's start (0.3 s of CPU, 7 MiB). Here a bare module stands in for the package, so a
# worker imports only what the checks need.
WORKER_CODE = (
    "import os, sys, types, busd; "
    "package = types.ModuleType('busd.checker'); "
    "package.__path__ = [os.path.join(busd.__path__[0], 'checker')]; "
    "sys.modules['busd.checker'] = package; "
    "from busd.checker.wire import worker_main; worker_main()"
)


def worker_main() -> None:  # pragma: no cover - runs in the worker process
    """A worker (``python -c WORKER_CODE``): answer requests on stdin until it closes."""
    # only stdin's end stops a worker: a Ctrl-C or a SIGTERM for the whole process group
    # must not fail checks that busd is finishing before it exits
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by accident goes to stderr, not into the answers
    inp = sys.stdin.buffer

    items: list[Answer] = []
    sent_at = time.monotonic()

    def send(force: bool = True) -> None:
        """What is checked so far, at least every FLUSH_S while checks go on: during one long
        hash an empty frame, which tells busd the check advances (a stuck read sends none)."""
        nonlocal sent_at
        if force or time.monotonic() - sent_at >= FLUSH_S:
            out.write(frame(encoder.encode(items)))
            out.flush()
            items.clear()
            sent_at = time.monotonic()

    validate.on_read = functools.partial(send, False)
    send()  # ready: imports done (the parent's timeouts start from here)
    while True:
        header = inp.read(HEADER)
        if len(header) < HEADER:
            return
        req = request_decoder.decode(inp.read(int.from_bytes(header, "little")))
        roots = [Path(r) for r in req.roots]
        sent_at = time.monotonic()
        for artifacts in req.events:
            items.append(
                to_wire(
                    check_one(
                        artifacts,
                        roots,
                        req.checksum,  # type: ignore[arg-type]
                        req.settle_s,
                    )
                )
            )
            send(force=False)
        if items or not req.events:
            send()
