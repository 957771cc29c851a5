"""``busd serve`` waiting for what it cannot start without: NATS, and its file-check workers.

NATS down at start: the wait is logged at once and every ``source.WAITING_SAID_EVERY_S``,
told to systemd with ``STATUS=`` (and a longer start timeout), and ``/readyz`` stays 503
meanwhile; busd starts as soon as NATS answers. SIGTERM or SIGINT during the wait ends it
cleanly.

File-check workers that cannot start (their interpreter cannot be executed, a process limit,
a crash as they import): the same, before the lease is taken and before anything is fetched,
so that an error of the machine never uses up a message's deliveries (a restart loop under
systemd used to cost one each, until a valid event became ``poison``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from busd import log, source
from busd.checker import Checker
from busd.config import NatsSettings
from busd.errors import TransientError
from busd.metrics import Metrics
from busd.sdnotify import SdNotifier


async def connect_when_up(
    n: NatsSettings,
    url: str,
    *,
    metrics: Metrics,
    notify: SdNotifier,
    on_state: Callable[[bool], None],
    stopped: asyncio.Event,
) -> source.Client | None:
    """A connection, however long NATS takes to answer; None when ``stopped`` is set first
    (the daemon's signal handler sets it)."""
    logger = log.get()
    nc: source.Client | None = None
    said_at: float | None = None
    what = f"waiting for NATS at {url}"
    metrics.nats_connected.set(0)

    def refused(violation: str, times: int) -> None:
        logger.error(
            "NATS refused busd; check its credentials and permissions",
            error=violation,
            times=times,
        )

    async def attempts() -> None:
        nonlocal nc, said_at
        while nc is None:
            try:
                nc = await source.connect(n, url, on_state=on_state, on_refused=refused)
            except source.NatsUnreachable as exc:
                if said_at is None or time.monotonic() - said_at >= source.WAITING_SAID_EVERY_S:
                    said_at = time.monotonic()
                    logger.warning(what, url=url, error=str(exc))
                    notify.status(what, extend_start_s=2 * source.WAITING_SAID_EVERY_S)
                await anyio.sleep(source.WAITING_RETRY_S)
        tg.cancel_scope.cancel()

    async def stop_signal() -> None:
        await stopped.wait()
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_signal)
        tg.start_soon(attempts)
    if said_at is not None and nc is not None:
        logger.info("NATS answered", url=url)
    return nc


T = TypeVar("T")


async def when_answered(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    notify: SdNotifier,
    stopping: Callable[[], bool],
    jetstream_patience_s: float,
    refusal: Callable[[], str | None] = lambda: None,
) -> T | None:
    """``call()`` (a request to NATS while busd starts), retried while NATS does not answer
    it: a NATS that goes away just after busd connected is waited for like one that was
    not there yet, not an unexpected error. None when ``stopping()`` first. A NATS that
    answers while JetStream does not, for ``jetstream_patience_s``, is a mistake of the
    setup (no JetStream for this account or domain): BusdError, exit 1."""
    logger = log.get()
    waiting = source.Waiting(jetstream_patience_s)
    while True:
        try:
            return await call()
        except Exception as exc:
            if not source.unanswered(exc):
                raise
            if waiting.unanswered(exc, what):
                refused = refusal()  # a request denied goes unanswered: say why, if known
                logger.warning(
                    "NATS does not answer; retrying",
                    waiting_to=what,
                    error=repr(exc),
                    **({"nats_refused": refused} if refused else {}),
                )
                notify.status(
                    f"NATS does not answer; waiting to {what}",
                    extend_start_s=2 * source.WAITING_SAID_EVERY_S,
                )
        pause_until = time.monotonic() + source.WAITING_RETRY_S
        while time.monotonic() < pause_until:
            if stopping():
                return None
            await anyio.sleep(0.1)


WORKERS_RETRY_S = (1.0, 10.0)  # the first and the longest pause between two tries


async def workers_when_up(
    checker: Checker,
    *,
    notify: SdNotifier,
    stopping: Callable[[], bool],
    waiting: Callable[[], None],
) -> bool:
    """True once every file-check worker answers (at once, as a rule: they were started
    with busd and have imported meanwhile); False when ``stopping()`` first. The daemon's
    own signal handler sets it: no second receiver here. ``waiting()`` is called when they
    cannot start."""
    logger = log.get()
    what = "file-check workers cannot start; fetching nothing until they can"
    said_at: float | None = None
    tries = 0
    while not stopping():
        try:
            await checker.ready()
        except TransientError as exc:
            tries += 1
            waiting()
            if said_at is None or time.monotonic() - said_at >= source.WAITING_SAID_EVERY_S:
                said_at = time.monotonic()
                logger.warning(what, error=str(exc))
                notify.status(what, extend_start_s=2 * source.WAITING_SAID_EVERY_S)
            first_s, longest_s = WORKERS_RETRY_S
            retry_at = time.monotonic() + min(longest_s, first_s * 2.0 ** (tries - 1))
            while not stopping() and time.monotonic() < retry_at:
                await anyio.sleep(0.1)
            continue
        if said_at is not None:
            logger.info("file-check workers started")
        return True
    return False
