"""NATS cut away right after a given request left busd (``natsproxy.py``, a loopback proxy in
front of the real nats-server): whatever busd was asking, it asks again once NATS answers;
an outage is never an 'unexpected error', an exit, or a death counted toward poison."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from natsproxy import NatsProxy
from support import Bus, on_jetstream, wait_for

from busd import source


@pytest.fixture
def proxy(bus: Bus) -> Iterator[NatsProxy]:
    p = NatsProxy(bus.server.port)
    yield p
    p.close()


def test_a_demoted_payload_read_during_an_outage_is_read_again(bus: Bus, proxy: NatsProxy) -> None:
    """seq 1 (a late file) and seq 2 share an event_id; seq 2 commits first. When seq 1's
    file comes, it takes the event_id over and seq 2's payload is read back from the stream
    for its rejection: NATS goes away right after that request. Before, busd exited 1
    ('unexpected error: TimeoutError') holding seq 1, and the next start counted a death."""
    late = bus.artifacts / "late" / "fills.parquet"
    bus.publish(
        [
            bus.event("late", [{"name": "fills", "path": str(late)}], event_id="X"),
            bus.event("other", event_id="X"),
        ]
    )
    cfg = bus.write_config(nats={"url": proxy.url}, verify={"file_wait_s": 60})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: '"committed": 1' in bus.log(), 60, "seq 2 committed")
        proxy.arm(b'{"seq": 2}', outage_s=5)  # the body of the stream's MSG.GET for seq 2
        bus.parquet("late/fills.parquet")
        wait_for(lambda: proxy.fired or proc.poll() is not None, 60, "the cut")
        bus.while_alive(
            proc,
            lambda: bus.log().count('"committed": 1') >= 2,
            90,
            "seq 1 committed (and seq 2 demoted) once NATS is back",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
        bus.reap()
    assert "unexpected error" not in bus.log()
    assert not (bus.data / "held.json").exists()  # a clean exit holding nothing
    assert bus.sql("SELECT seq, outcome, reason FROM catalog.events_f ORDER BY seq") == [
        (1, "committed", None),
        (2, "rejected", "event_id_conflict"),
    ]


def test_a_consumer_declared_again_through_a_long_outage_is_waited_for(
    bus: Bus, proxy: NatsProxy
) -> None:
    """The durable consumer is deleted under busd, and NATS goes away right after busd asks
    to create it again, for longer than the 30 s busd gave JetStream to stop refusing.
    busd waits for NATS, declares the consumer once it answers and commits what comes next.
    Before: exit 1 after 30 s ('the consumer is gone and cannot be recreated: nats:
    timeout', here with stall_s 120 and in 3 of 3 runs of a reviewer helper's script), or,
    measured with stall_s 10, sooner on the stall check ('no progress for 10s with 1
    messages waiting': a backlog last measured before the outage). Each try of the
    declaration is a turn now, for up to ten stall periods."""
    bus.publish([bus.event("before")])
    cfg = bus.write_config(nats={"url": proxy.url}, consumer={"stall_s": 60})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: '"committed": 1' in bus.log() or proc.poll() is not None, 60, "first")
        proxy.arm(b"CREATE.ARTIFACTS.busd", outage_s=40)
        on_jetstream(bus.url, lambda js: js.delete_consumer("ARTIFACTS", "busd"))
        wait_for(lambda: proxy.fired or proc.poll() is not None, 60, "the cut")
        wait_for(
            lambda: proc.poll() is not None or not proxy.cutting,
            60,
            "the end of the outage",
        )
        bus.publish([bus.event("after")])
        bus.while_alive(
            proc,
            lambda: bus.log().count('"committed": 1') >= 2,
            90,
            "the next event committed once NATS is back",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
        bus.reap()
    assert "unexpected error" not in bus.log()
    assert bus.sql("SELECT run_id FROM catalog.runs_d ORDER BY ALL") == [("after",), ("before",)]


def test_a_consumer_left_without_its_files_is_declared_anew(bus: Bus) -> None:
    """The server holds busd's consumer but not its directory, as when a create raced the
    removal of the deleted consumer's files (seen in a full run after a NATS cut): every
    create answers a 500 (10012, 'meta.inf.tmp: no such file or directory'). Declaring it
    again deletes that consumer first and creates it whole. Before: refused until the 30 s
    ran out, then exit 1 ('the consumer is gone and cannot be recreated')."""
    bus.init()
    shutil.rmtree(next(bus.server.store_dir.rglob("obs/busd")))
    settings = bus.settings()

    async def redeclared(js: Any) -> int:
        assert await source.redeclare_consumer(js._nc, settings, within_s=3)
        await source.ensure_consumer(js._nc, settings)  # its files are there again
        return int((await js.consumer_info("ARTIFACTS", "busd")).num_pending or 0)

    assert on_jetstream(bus.servers, redeclared) == 0
