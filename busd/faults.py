"""A test-only fault hook: ``BUSD_TEST_FAULT=<point>`` makes busd SIGKILL itself at that point.

Points: ``after_decode``, ``during_validate``, ``after_commit``, ``during_export``,
``after_rename``, ``before_ack``, ``after_ack``; at ``after_lease_check`` (between the lease
check and the acks it allows) busd SIGSTOPs itself instead, a pause the test ends with
SIGCONT. ``BUSD_TEST_FAULT_SKIP=N`` lets the point
pass N times first. ``BUSD_TEST_FAULT=in_checker:<text>`` kills the process that checks a
file whose path contains ``<text>`` (a worker process, by default). Fault tests use it to
crash a real process at a named moment; it costs one comparison when unset.
"""

from __future__ import annotations

import os
import signal
from typing import Literal, get_args

Point = Literal[
    "after_decode",
    "during_validate",
    "after_commit",
    "during_export",
    "after_rename",
    "before_ack",
    "after_ack",
    "after_lease_check",
]
POINTS: tuple[Point, ...] = get_args(Point)
PAUSES: tuple[Point, ...] = ("after_lease_check",)

_armed: str | None = None
_skip = 0
_loaded = False


def _load() -> None:
    global _armed, _skip, _loaded
    _armed = os.environ.get("BUSD_TEST_FAULT") or None
    _skip = int(os.environ.get("BUSD_TEST_FAULT_SKIP", "0") or 0)
    _loaded = True


def hit(point: Point) -> None:
    global _skip
    if not _loaded:
        _load()
    if _armed != point:
        return
    if _skip > 0:
        _skip -= 1
        return
    os.kill(os.getpid(), signal.SIGSTOP if point in PAUSES else signal.SIGKILL)


def hit_for(point: str, key: str) -> None:
    """``point`` armed as ``point:<text>``: a crash (SIGSEGV, as a file that breaks the
    Parquet reader would cause; no core file) when ``key`` contains ``<text>``."""
    if not _loaded:
        _load()
    if _armed is not None and _armed.startswith(point + ":") and _armed[len(point) + 1 :] in key:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), signal.SIGSEGV)
