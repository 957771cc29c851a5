"""Lag in time and the standard collectors, on a real `busd serve` and a real nats-server.

`busd_oldest_unsettled_age_seconds` must count a message busd does not hold: an event whose
file is not there yet is nak'ed and waits on the server for its redelivery, and its age still
shows; it falls back to 0 once the event commits.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import nats
import pytest
from opsfiles import free_port
from support import Bus, wait_for

from busd import lag

pytestmark = pytest.mark.timeout(180)


def scrape(address: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
            return bytes(reply.read()).decode()
    except OSError:
        return ""


def value(text: str, series: str) -> float | None:
    found = re.search(rf"(?m)^{re.escape(series)} (\S+)$", text)
    return float(found.group(1)) if found else None


def test_age_of_the_oldest_unacked_message_from_the_server(bus: Bus) -> None:
    async def age() -> float:
        nc = await nats.connect(bus.url)
        try:
            return await lag.oldest_unsettled_age_s(nc.jetstream(), "ARTIFACTS", "busd")
        finally:
            await nc.close()

    assert asyncio.run(age()) == 0.0  # nothing pending: no lag
    bus.publish([bus.event("a"), bus.event("b")])
    time.sleep(1.2)
    first = asyncio.run(age())
    assert 1.0 <= first < 30, first
    time.sleep(0.5)
    assert asyncio.run(age()) > first  # the same message, older now


def test_serve_reports_lag_in_time_process_metrics_and_consumer_labels(bus: Bus) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    cfg = bus.write_config(metrics={"listen": address}, verify={"file_wait_s": 60})
    proc = bus.spawn("serve", "--config", str(cfg))
    wait_for(lambda: value(scrape(address), "busd_ready") == 1.0, 60, "busd ready")

    text = scrape(address)
    for series in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        'python_gc_collections_total{generation="0"}',
    ):
        assert value(text, series) is not None, series
    assert 'python_info{implementation="CPython"' in text
    assert value(text, 'busd_consumer_info{consumer_name="busd",stream_name="ARTIFACTS"}') == 1.0, (
        text
    )
    assert value(text, "busd_oldest_unsettled_age_seconds") == 0.0

    # the file is written after the event: busd naks it and waits (verify.file_wait_s)
    late = bus.artifacts / "late" / "fills.parquet"
    event = bus.event("late", artifacts=[{"name": "fills", "path": str(late)}])
    bus.publish([event])
    wait_for(
        lambda: (value(scrape(address), "busd_oldest_unsettled_age_seconds") or 0) >= 3.0,
        30,
        "the waiting event's age to show",
    )
    bus.parquet("late/fills.parquet")
    wait_for(
        lambda: value(scrape(address), 'busd_events_total{outcome="committed"}') == 1.0,
        60,
        "the commit",
    )
    wait_for(
        lambda: value(scrape(address), "busd_oldest_unsettled_age_seconds") == 0.0,
        10,
        "the age back to 0",
    )
    proc.terminate()
    assert proc.wait(30) == 0
