"""``busd serve`` with NATS down at start: wait for it, say so, stay unready.

The wait is logged at once and every ``source.WAITING_SAID_EVERY_S``, told to systemd with
``STATUS=`` (and a longer start timeout), and ``/readyz`` stays 503 meanwhile; busd starts
as soon as NATS answers. SIGTERM or SIGINT during the wait ends it cleanly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import anyio

from busd import log, source
from busd.config import NatsSettings
from busd.metrics import Metrics
from busd.sdnotify import SdNotifier


async def connect_when_up(
    n: NatsSettings,
    url: str,
    *,
    metrics: Metrics,
    notify: SdNotifier,
    on_state: Callable[[bool], None],
) -> source.Client | None:
    """A connection, however long NATS takes to answer; None when told to stop first."""
    logger = log.get()
    nc: source.Client | None = None
    said_at: float | None = None
    what = f"waiting for NATS at {url}"
    metrics.nats_connected.set(0)

    async def attempts() -> None:
        nonlocal nc, said_at
        while nc is None:
            try:
                nc = await source.connect(n, url, on_state=on_state)
            except source.NatsUnreachable as exc:
                if said_at is None or time.monotonic() - said_at >= source.WAITING_SAID_EVERY_S:
                    said_at = time.monotonic()
                    logger.warning(what, url=url, error=str(exc))
                    notify.status(what, extend_start_s=2 * source.WAITING_SAID_EVERY_S)
                await anyio.sleep(source.WAITING_RETRY_S)
        tg.cancel_scope.cancel()

    async def stop_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                logger.info("stopping", signal=signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_signal)
        tg.start_soon(attempts)
    if said_at is not None and nc is not None:
        logger.info("NATS answered", url=url)
    return nc
