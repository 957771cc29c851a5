"""How ``busd serve`` stops: its stop signals, and what a stop may leave behind.

SIGTERM and SIGINT go through plain handlers for the whole run (not the event loop's, which
puts the default action back as it closes); after the stop they are ignored until the
process exits, since dying of one would count as a death of every message held. A stop that
gives up on a thread stuck in DuckDB on a disk that does not answer says so here, and the CLI
then exits without the interpreter's clean-up, which would wait for that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

# daemons whose threads a stop gave up on, stuck in DuckDB on a hung disk: kept alive, as
# freeing their catalog's connections and cursors would wait for those threads
_LEFT_BEHIND: list[Any] = []

IGNORED: dict[int, Any] = {signal.SIGTERM: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN}


def leave_behind(owner: object) -> None:
    """Keep ``owner`` (and its stuck thread's catalog) alive until the process exits."""
    _LEFT_BEHIND.append(owner)


def threads_left_behind() -> bool:
    """A stop left a thread stuck in DuckDB: the process should exit without the
    interpreter's clean-up, which would wait for it (the CLI does)."""
    return bool(_LEFT_BEHIND)


def install_signals(on_signal: Callable[[int], None]) -> dict[int, Any]:
    """SIGTERM and SIGINT call ``on_signal`` on the running loop; the handlers they had
    before are returned (for :func:`restore`)."""
    loop = asyncio.get_running_loop()

    def handler(signum: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: busd is exiting
            loop.call_soon_threadsafe(on_signal, signum)

    before: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread (an embedded use)
        for signum in (signal.SIGTERM, signal.SIGINT):
            before[signum] = signal.signal(signum, handler)
    return before


def restore(handlers: dict[int, Any]) -> None:
    with contextlib.suppress(ValueError):  # not the main thread (an embedded use)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups inside it (task groups nest)."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
