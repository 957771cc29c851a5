"""Acks around a NATS outage (issue 11, item 9), on a real nats-server stopped and started
again under a real `busd serve` with HA on: acks that a failed lease check held back are kept
and sent once NATS answers, not dropped (checked against the code that dropped them: the
messages were then acked only after a redelivery at the ack wait)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import SLOW_EXPORT_SQL, Bus, on_jetstream, wait_for

from busd.embedded import EmbeddedServer, server_binary, server_config


def _consumer(bus: Bus) -> tuple[int, int, int]:
    """(ack floor, acks pending, redeliveries) of busd's durable consumer."""

    async def go(js: Any) -> tuple[int, int, int]:
        info = await js.consumer_info("ARTIFACTS", "busd")
        return (
            int(info.ack_floor.stream_seq or 0),
            int(info.num_ack_pending or 0),
            int(info.num_redelivered or 0),
        )

    return on_jetstream(bus.url, go)


def test_acks_a_failed_lease_check_held_back_go_out_when_nats_is_back(bus: Bus) -> None:
    bus.publish([bus.event(f"r{i}") for i in range(10)])
    cfg = bus.write_config(
        ha={"enabled": True, "lease_ttl_s": 120},
        consumer={"ack_wait_s": 120},  # a redelivery cannot be what acks them below
        exports=[{"name": "slow", "sql": SLOW_EXPORT_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        # committed; the refresh the acks wait for runs for seconds: NATS goes away meanwhile
        wait_for(lambda: '"committed": 10' in bus.log(), 60, "the batch to commit")
        bus.server.stop()
        wait_for(
            lambda: "cannot reach the lease; not settling now" in bus.log(),
            60,
            "the acks' lease check to fail",
        )
        bus.server.start()
        wait_for(lambda: _consumer(bus)[:2] == (10, 0), 60, "the acks held back to go out")
        assert _consumer(bus)[2] == 0, "acked by a redelivery, not by the acks kept"
        assert proc.poll() is None, bus.log()[-3000:]
    finally:
        bus.reap()
    assert "lost the lease" not in bus.log()


_PULL = re.compile(
    r"(\d\d:\d\d:\d\d\.\d{6}) \[TRC\] .*<<- "
    r"\[H?PUB \$JS\.API\.CONSUMER\.MSG\.NEXT\.ARTIFACTS\.busd "
)


def _pull_times(server_log: str) -> list[float]:
    """Seconds of the day at which the server read each of busd's pull requests."""
    times = []
    for found in _PULL.finditer(server_log):
        h, m, s = found.group(1).split(":")
        times.append(int(h) * 3600 + int(m) * 60 + float(s))
    return times


@contextlib.contextmanager
def _traced_server(server: EmbeddedServer, trace: Path) -> Iterator[None]:
    """The same server (port, store) started again with every protocol line traced to a file."""
    conf = server.store_dir / "nats-server-traced.conf"
    conf.write_text(server_config(server.host, server.port, server.store_dir, "trace: true\n"))
    with open(trace, "w") as out:
        proc = subprocess.Popen([server_binary(), "-c", str(conf)], stderr=out)
    try:
        wait_for(lambda: "Server is ready" in trace.read_text(), 30, "the traced server")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def test_no_burst_of_pull_requests_when_nats_comes_back(bus: Bus) -> None:
    """While NATS is away busd sends no pull requests; nats-py would queue them and send them
    together on reconnect (without the guard: 4 within 0.1 ms after an 8 s outage, 2 of 2)."""
    proc = bus.spawn("serve", "--config", str(bus.write_config()))
    try:
        wait_for(lambda: "busd ready" in bus.log(), 60, "busd to be ready")
        bus.server.stop()
        wait_for(lambda: "nats disconnected" in bus.log(), 30, "busd to see the outage")
        time.sleep(8)  # an outage several times the fetch's own wait (batch_wait_ms + 2 s)
        trace = bus.root / "nats-trace.log"
        with _traced_server(bus.server, trace):
            wait_for(lambda: len(_pull_times(trace.read_text())) >= 20, 60, "20 pull requests")
            assert proc.poll() is None, bus.log()[-3000:]
    finally:
        bus.reap()
    times = _pull_times(trace.read_text())
    together = max(sum(1 for t in times if first <= t < first + 0.010) for first in times)
    # one request sent as the connection broke, before nats-py noticed, may come with the
    # first after it (seen once in CI, under load); without the guard 4 come at once
    assert together <= 2, f"{together} pull requests within 10 ms: {times[:8]}"


def test_nats_gone_while_busd_starts_is_waited_for(bus: Bus) -> None:
    """NATS stops after busd connected and before it is ready (here: while a stale export is
    refreshed at start): busd waits for it as for a NATS down at start, then serves. Before,
    the requests that follow the refresh raised 'unexpected error' (ConnectionResetError,
    TimeoutError), exit 1."""
    bus.publish([bus.event(f"r{i}") for i in range(3)])
    cfg = bus.write_config(
        exports=[{"name": "slow", "sql": SLOW_EXPORT_SQL, "depends_on": ["fills"]}],
    )
    first = bus.spawn("serve", "--config", str(cfg))
    try:  # committed, then killed while the refresh the acks wait for runs: the export is stale
        wait_for(lambda: '"committed": 3' in bus.log(), 60, "the batch to commit")
        first.kill()
        first.wait(30)
        proc = bus.spawn("serve", "--config", str(cfg), log="second.log")
        wait_for(
            lambda: "refreshing exports older than the catalog" in bus.log("second.log"),
            60,
            "the stale export's refresh at start",
        )
        bus.server.stop()
        wait_for(
            lambda: "NATS does not answer; retrying" in bus.log("second.log") or proc.poll(),
            120,
            "busd to wait for NATS",
        )
        assert proc.poll() is None, bus.log("second.log")[-3000:]
        bus.server.start()
        wait_for(lambda: "busd ready" in bus.log("second.log"), 60, "busd to be ready")
        wait_for(lambda: _consumer(bus)[:2] == (3, 0), 120, "the three to be acked")
        assert proc.poll() is None, bus.log("second.log")[-3000:]
    finally:
        bus.reap()
    assert "unexpected error" not in bus.log("second.log")


def test_a_stop_does_not_wait_for_a_nats_that_does_not_answer(bus: Bus) -> None:
    """The nats-server SIGSTOPped (connections open, nothing answers), then SIGTERM with
    ``shutdown_grace_s`` 2: busd stops within a grace period for what goes to NATS (naks,
    the drain) and exits 0. Before, the naks' flush (10 s) and nats-py's drain (30 s) came
    on top of the grace periods: 41 s in a reviewer's run with the default grace."""
    bus.publish([bus.event("held")])
    proc = bus.spawn("serve", "--config", str(bus.write_config(consumer={"shutdown_grace_s": 2})))
    assert bus.server.proc is not None
    server = bus.server.proc.pid
    try:
        wait_for(lambda: '"committed": 1' in bus.log(), 60, "the event committed")
        os.kill(server, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, bus.log()[-3000:]
    finally:
        os.kill(server, signal.SIGCONT)
        bus.reap()
    assert "NATS does not answer the stop; closing without it" in bus.log()
