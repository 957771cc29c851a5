"""Hot standby through NATS outages (issue 11), on real processes: an active and a standby
against a real nats-server that stops, or a loopback proxy (``natsproxy.py``) that cuts NATS
away right after a given request. Neither instance exits; the lease stays with the active.
Each failed on the code before its fix (found by a reviewer helper's scripts)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from natsproxy import NatsProxy
from support import Bus, on_jetstream, wait_for

from busd.manifest import read_manifest


def _acked(bus: Bus) -> int:
    async def go(js: Any) -> int:
        return int((await js.consumer_info("ARTIFACTS", "busd")).ack_floor.stream_seq or 0)

    return on_jetstream(bus.url, go)


def _stop(*procs: Any) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(60)


def test_an_outage_keeps_the_active_and_the_standby(bus: Bus) -> None:
    """NATS stops for 12 s (lease_ttl_s 20: renewed every 7 s, it cannot expire meanwhile).
    Before: the standby's try of the lease timed out and it exited 1 ('unexpected error:
    TimeoutError'); the active's renewal timed out, was sent by nats-py once it reconnected,
    and the next renewal found the key at a revision it did not know: 'lost the lease ...
    to' its own name, exit 1."""
    active = bus.ha_active(lease_ttl_s=20)
    standby = bus.spawn("serve", "--config", str(bus.second_config()), log="b.log")
    try:
        wait_for(lambda: "standby: following" in bus.log("b.log"), 60, "the standby")
        bus.server.stop()
        time.sleep(12)  # the outage: past a renewal of the lease and a try of the standby's
        bus.server.start()
        bus.publish([bus.event(f"r{i}") for i in range(3)])
        wait_for(lambda: active.poll() is not None or _acked(bus) == 3, 90, "the active to ack")
        for name, proc in (("a.log", active), ("b.log", standby)):
            assert proc.poll() is None, bus.log(name)[-3000:]
    finally:
        _stop(active, standby)
        bus.reap()
    assert "lost the lease" not in bus.log("a.log")
    assert "unexpected error" not in bus.log("b.log")


@pytest.fixture
def proxy(bus: Bus) -> Iterator[NatsProxy]:
    p = NatsProxy(bus.server.port)
    yield p
    p.close()


@pytest.mark.parametrize(
    "request_sent",
    [
        b"$JS.API.STREAM.INFO.KV_busd_leases",
        b"next_by_subj",
        b"CONSUMER.CREATE.ARTIFACTS.busd-standby-",
    ],
    ids=["opening-the-lease", "finding-where-to-follow-from", "creating-its-reader"],
)
def test_nats_cut_as_a_standby_starts_is_waited_for(
    bus: Bus, proxy: NatsProxy, request_sent: bytes
) -> None:
    """NATS gone right after the standby asked for the lease's bucket, for where to follow
    from, or for its reader of the stream: it waits and follows once NATS answers (before:
    exit 1, 'unexpected error: TimeoutError')."""
    active = bus.ha_active()
    cfg_b = bus.second_config(nats={"url": proxy.url})
    proxy.arm(request_sent, outage_s=5)
    standby = bus.spawn("serve", "--config", str(cfg_b), log="b.log")
    try:
        wait_for(lambda: proxy.fired or standby.poll() is not None, 60, "the cut")
        wait_for(
            lambda: "standby: following" in bus.log("b.log") or standby.poll() is not None,
            60,
            "the standby to follow",
        )
        # the reader is created once NATS answers, and the standby folds what comes next
        bus.publish([bus.event("after-the-cut")])
        bus.while_alive(
            standby,
            lambda: read_manifest(bus.root / "b" / "exports").catalog_seq >= 1,
            60,
            "the standby to fold an event published after the cut",
            log="b.log",
        )
    finally:
        _stop(active, standby)
        bus.reap()
    assert "unexpected error" not in bus.log("b.log")


def test_a_standby_stopped_before_it_holds_the_lease_leaves_it_alone(
    bus: Bus, proxy: NatsProxy
) -> None:
    """A standby stopped while its first try of the lease waits for NATS (the answer to its
    create cut away) releases nothing. Before, it deleted the key at revision 0, which
    nats-py sends unconditionally: the active's lease was gone and it exited 1 ('lost the
    lease ... to nobody'), 3 of 3 in a reviewer's runs."""
    active = bus.ha_active(lease_ttl_s=9)
    cfg_b = bus.second_config(nats={"url": proxy.url})
    proxy.arm(b"$KV.busd_leases.busd", outage_s=2)  # the standby's create of the lease
    standby = bus.spawn("serve", "--config", str(cfg_b), log="b.log")
    try:
        wait_for(lambda: proxy.fired or standby.poll() is not None, 60, "the cut")
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(60) == 0, bus.log("b.log")[-3000:]
        bus.publish([bus.event("after")])  # acked by the active: it still holds the lease
        wait_for(lambda: active.poll() is not None or _acked(bus) == 1, 60, "the active's ack")
        time.sleep(9)  # one TTL: a renewal of a lease it lost would have failed by now
        assert active.poll() is None, bus.log("a.log")[-3000:]
    finally:
        _stop(active)
        bus.reap()
    assert "lost the lease" not in bus.log("a.log")


def test_nats_cut_as_a_standby_creates_its_reader_again_is_waited_for(
    bus: Bus, proxy: NatsProxy
) -> None:
    """The standby's reader of the stream is gone (it is kept in memory: every NATS restart
    loses it), and NATS is cut right after the standby asks for a new one. The standby waits
    and follows on. Before: exit 1, 'unexpected error: TimeoutError: nats: timeout', 3 of 3
    runs of a reviewer helper's script."""
    bus.publish([bus.event("before")])
    active = bus.ha_active(lease_ttl_s=30)
    cfg_b = bus.second_config(nats={"url": proxy.url})
    standby = bus.spawn("serve", "--config", str(cfg_b), log="b.log")
    exports_b = bus.root / "b" / "exports"
    try:
        wait_for(
            lambda: standby.poll() is not None or read_manifest(exports_b).catalog_seq >= 1,
            60,
            "the standby to follow",
        )
        readers = on_jetstream(bus.url, lambda js: js.consumers_info("ARTIFACTS"))
        names = [r.name for r in readers if r.name.startswith("busd-standby")]
        assert len(names) == 1, names
        proxy.arm(b"CREATE.ARTIFACTS.busd-standby", outage_s=8)
        on_jetstream(bus.url, lambda js: js.delete_consumer("ARTIFACTS", names[0]))
        wait_for(lambda: proxy.fired or standby.poll() is not None, 60, "the cut")
        bus.publish([bus.event("after-the-cut")])
        bus.while_alive(
            standby,
            lambda: read_manifest(exports_b).catalog_seq >= 2,
            90,
            "the standby to fold an event published after the cut",
            log="b.log",
        )
    finally:
        _stop(active, standby)
        bus.reap()
    assert "unexpected error" not in bus.log("b.log")


def test_a_standby_whose_exports_disk_is_full_follows_on_and_catches_up(bus: Bus) -> None:
    """The standby's exports are on a full disk: its refreshes fail and are tried again
    while it follows on; once space is freed its exports hold every event. Before: exit 1
    ('export refresh failed: ... No space left on device') within half a second of the
    first batch it followed, 2 of 2 runs of a reviewer helper's script."""
    from test_chaos import fill, tmpfs

    exports_b = bus.root / "b" / "exports"
    with tmpfs(exports_b, "4m"):
        active = bus.ha_active(lease_ttl_s=30)
        standby = bus.spawn("serve", "--config", str(bus.second_config()), log="b.log")
        try:
            wait_for(
                lambda: "standby: following" in bus.log("b.log") or standby.poll() is not None,
                60,
                "the standby to follow",
            )
            ballast = fill(exports_b)
            bus.publish([bus.event(f"r-{i}") for i in range(3)])
            wait_for(
                lambda: "export refresh failed" in bus.log("b.log") or standby.poll() is not None,
                60,
                "the standby's refresh to fail",
            )
            time.sleep(2)  # a few retries with the disk still full
            assert standby.poll() is None, bus.log("b.log")[-3000:]
            ballast.unlink()
            bus.while_alive(
                standby,
                lambda: read_manifest(exports_b).catalog_seq >= 3,
                60,
                "the standby's exports to catch up",
                log="b.log",
            )
        finally:
            _stop(active, standby)
            bus.reap()
