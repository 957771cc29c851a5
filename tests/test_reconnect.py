"""Acks around a NATS outage (issue 11, item 9), on a real nats-server stopped and started
again under a real `busd serve` with HA on: acks that a failed lease check held back are kept
and sent once NATS answers, not dropped (checked against the code that dropped them: the
messages were then acked only after a redelivery at the ack wait)."""

from __future__ import annotations

from typing import Any

from support import SLOW_EXPORT_SQL, Bus, on_jetstream, wait_for


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
