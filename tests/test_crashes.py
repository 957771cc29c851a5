"""Crashes of a real busd process at named points: nothing lost, nothing doubled."""

from __future__ import annotations

import signal
import threading

import pytest
from support import Bus, wait_for

from busd.manifest import read_manifest


def run_until_killed(bus: Bus, point: str, skip: int = 0) -> None:
    cfg = bus.write_config()
    proc = bus.spawn(
        "serve",
        "--config",
        str(cfg),
        env={"BUSD_TEST_FAULT": point, "BUSD_TEST_FAULT_SKIP": str(skip)},
    )
    rc = proc.wait(60)
    assert rc == -signal.SIGKILL, f"busd was not killed at {point}: rc={rc}\n{bus.log()}"


def assert_exactly_once(bus: Bus, run_ids: list[str]) -> None:
    rows = bus.sql(
        "SELECT run_id, count(*) FROM catalog.events_f WHERE outcome = 'committed' "
        "GROUP BY run_id ORDER BY run_id"
    )
    assert rows == [(r, 1) for r in sorted(run_ids)]
    assert bus.sql("SELECT count(*) FROM catalog.events_f") == [(len(run_ids),)]
    assert bus.sql("SELECT max(version) FROM catalog.artifacts_f") == [(1,)]
    exported = bus.export("artifacts").column("run_id").to_pylist()
    assert sorted(exported) == sorted(run_ids)
    manifest = read_manifest(bus.data / "exports")
    assert manifest.catalog_seq == bus.sql("SELECT max(seq) FROM catalog.events_f")[0][0]
    assert not list((bus.data / "exports").glob(".*tmp*"))


@pytest.mark.parametrize(
    "point",
    ["after_decode", "after_commit", "during_export", "after_rename", "before_ack", "after_ack"],
)
def test_crash_at_a_named_point_then_recover(bus: Bus, point: str) -> None:
    run_ids = [f"run-{i}" for i in range(30)]
    bus.publish([bus.event(r) for r in run_ids])
    run_until_killed(bus, point)
    stats = bus.drain()
    # whatever the first process committed is recognised, never applied twice
    assert sum(stats.outcomes.values()) <= len(run_ids)
    assert_exactly_once(bus, run_ids)


def test_redelivery_after_commit_changes_nothing(bus: Bus) -> None:
    bus.publish([bus.event("r1"), bus.event("r2")])
    run_until_killed(bus, "after_commit")
    before = bus.sql("SELECT * EXCLUDE (committed_at) FROM catalog.artifacts_f ORDER BY run_id")
    assert len(before) == 2  # committed, never acked
    stats = bus.drain()
    assert stats.outcomes == {}  # both were redelivered and recognised as already applied
    after = bus.sql("SELECT * EXCLUDE (committed_at) FROM catalog.artifacts_f ORDER BY run_id")
    assert after == before


def test_a_message_that_keeps_killing_busd_becomes_poison(bus: Bus) -> None:
    bus.overrides = {"consumer": {"max_deliver": 3}}
    bus.init()
    bus.publish([bus.event("crashy")])
    run_until_killed(bus, "during_validate")
    # second delivery (max_deliver - 1): quarantined without opening its files again
    cfg = bus.write_config()
    proc = bus.spawn(
        "serve", "--config", str(cfg), "--drain", env={"BUSD_TEST_FAULT": "during_validate"}
    )
    assert proc.wait(60) == 0, bus.log()
    assert bus.sql("SELECT reason, deliveries FROM catalog.rejections_f") == [("poison", 2)]


def test_sigterm_mid_flow_exits_0_and_loses_nothing(bus: Bus) -> None:
    total = 400
    cfg = bus.write_config(consumer={"batch_max": 20})
    proc = bus.spawn("serve", "--config", str(cfg))
    run_ids = [f"r{i}" for i in range(total)]
    payloads = [bus.event(r) for r in run_ids]  # files written before publishing
    publisher = threading.Thread(target=lambda: bus.publish(payloads))
    publisher.start()
    wait_for(lambda: read_manifest(bus.data / "exports").catalog_seq >= 50, 60, "50 commits")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, bus.log()
    publisher.join()
    assert '"busd stopped"' in bus.log()
    bus.drain()
    assert_exactly_once(bus, run_ids)
