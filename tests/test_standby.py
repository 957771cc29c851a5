"""Hot standby: two real `busd serve` processes, one lease in a NATS KV bucket."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from support import Bus, committed_batch, on_jetstream, wait_for
from test_chaos import Publisher, check_exactly_once, exported_all

from busd import config, source
from busd.catalog import Catalog
from busd.embedded import EmbeddedServer

HA = {
    "ha": {"enabled": True, "lease_ttl_s": 2},
    "consumer": {"ack_wait_s": 1},
    "verify": {"file_wait_s": 20},
}


def pair(tmp_path: Path, server: EmbeddedServer) -> tuple[Bus, Bus]:
    """Two instances with their own data dirs and one shared artifact root."""
    a = Bus(tmp_path / "a", server, overrides=HA)
    b = Bus(tmp_path / "b", server, overrides=HA)
    for bus in (a, b):
        bus.root.mkdir()
    a.artifacts.mkdir()
    b.overrides = {**HA, "artifact_roots": [str(a.artifacts)]}
    a.init()
    return a, b


def start_pair(
    tmp_path: Path, server: EmbeddedServer
) -> tuple[Bus, Bus, subprocess.Popen[str], subprocess.Popen[str]]:
    """a active, then b standby, each a real `busd serve`."""
    a, b = pair(tmp_path, server)
    pa = a.spawn("serve", "--config", str(a.write_config()))
    wait_for(lambda: "busd ready" in a.log(), 30, "a active")
    pb = b.spawn("serve", "--config", str(b.write_config()))
    wait_for(lambda: "standby: following" in b.log(), 30, "b standby")
    return a, b, pa, pb


def test_standby_takes_over_when_the_active_is_killed(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    a, b, pa, pb = start_pair(tmp_path, nats_server)
    try:
        with Publisher(a, 1500, rate_per_s=300) as pub:
            wait_for(lambda: pub.acked >= 300, 30, "events flowing")
            pa.kill()
            killed = time.monotonic()
            wait_for(lambda: "took over the lease" in b.log(), 30, "b took over")
            takeover_s = time.monotonic() - killed
        wait_for(lambda: exported_all(b, 1500), 60, "b caught up")
    finally:
        pb.send_signal(signal.SIGTERM)
        assert pb.wait(60) == 0, b.log()[-2000:]
        pa.wait(10)
    found = check_exactly_once(b, pub.ids)
    out = b.cli("verify", "--config", str(b.write_config()), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    print(
        f"\nstandby: took over {takeover_s:.1f}s after kill -9 of the active (lease 2 s); "
        f"{pub.acked} events, {found}; its catalog equals a rebuild"
    )


def test_a_former_active_that_lost_the_lease_stops_acking(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    a, b, pa, pb = start_pair(tmp_path, nats_server)
    try:
        with Publisher(a, 600, rate_per_s=300) as pub:
            wait_for(lambda: pub.acked >= 200, 30, "events flowing")
            pa.send_signal(signal.SIGSTOP)  # cut off, not dead
            wait_for(lambda: "took over the lease" in b.log(), 30, "b took over")
            pa.send_signal(signal.SIGCONT)
            rc = pa.wait(30)
        wait_for(lambda: exported_all(b, 600), 60, "b caught up")
    finally:
        pb.send_signal(signal.SIGTERM)
        assert pb.wait(60) == 0
    assert rc == 1
    assert "lost the lease" in a.log()
    check_exactly_once(b, pub.ids)


def test_events_the_former_active_acked_past_its_floor_reach_the_new_active(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    """The standby folds only up to the active's ack floor. An event waiting for its file
    holds that floor while later events are acked; the server never delivers those again,
    so the new active reads them from the stream itself."""
    a, b, pa, pb = start_pair(tmp_path, nats_server)
    late = a.artifacts / "late" / "fills.parquet"
    try:
        first = a.publish([a.event("late", [{"name": "fills", "path": str(late)}])])
        a.publish([a.event(f"r{i}") for i in range(20)])
        wait_for(lambda: "file missing; retrying later" in a.log(), 30, "a waits for a file")
        wait_for(lambda: exported_all(a, 20), 30, "a acked the 20 after it")
        pa.kill()
        wait_for(lambda: "backfilling from the stream" in b.log(), 30, "b took over")
        # its follower's consumer vanishes meanwhile (as after 30 s idle): it declares it again
        on_jetstream(nats_server.url, delete_followers)
        a.parquet("late/fills.parquet")
        wait_for(lambda: exported_all(b, 21), 60, "b holds all 21")
    finally:
        pb.send_signal(signal.SIGTERM)
        assert pb.wait(60) == 0, b.log()[-2000:]
        pa.wait(10)
    check_exactly_once(b, ["late", *(f"r{i}" for i in range(20))])
    assert first == [1]
    assert "from the stream" in b.log()


async def delete_followers(js: Any) -> None:
    for info in await js.consumers_info("ARTIFACTS"):
        if info.name.startswith("busd-standby-"):
            await js.delete_consumer("ARTIFACTS", info.name)


def paused(proc: subprocess.Popen[str]) -> bool:
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_acks_a_paused_former_active_sends_late_are_backfilled(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    """The active checks the lease, then pauses before its acks go out; the lease expires and
    b takes over; the acks arrive after all. The server will not deliver those messages to b
    (and with a 30 s ack wait it has not redelivered them yet), so b reads them from the
    stream."""
    a, b = pair(tmp_path, nats_server)
    slow = {"consumer": {"ack_wait_s": 30}}
    a.overrides = {**a.overrides, **slow}
    b.overrides = {**b.overrides, **slow}
    ids = [f"p{i}" for i in range(10)]
    a.publish([a.event(run_id) for run_id in ids])  # one batch, one export, one flush of acks
    pa = a.spawn(
        "serve", "--config", str(a.write_config()), env={"BUSD_TEST_FAULT": "after_lease_check"}
    )
    pb: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: paused(pa), 30, "a paused between its lease check and its acks")
        pb = b.spawn("serve", "--config", str(b.write_config()))
        wait_for(lambda: "backfilling from the stream" in b.log(), 30, "b took over")
        pa.send_signal(signal.SIGCONT)
        assert pa.wait(30) == 1
        wait_for(lambda: exported_all(b, 10), 30, "b holds all 10")
    finally:
        pa.kill()
        if pb is not None:
            pb.send_signal(signal.SIGTERM)
            assert pb.wait(60) == 0, b.log()[-2000:]
    assert "lost the lease" in a.log()
    check_exactly_once(b, ids)
    assert '"recorded": 10' in b.log()


def test_a_backfill_starts_at_the_first_sequence_the_catalog_lacks(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.duckdb")
    try:
        assert catalog.recorded_through(0) == 0
        for seq in (1, 2, 3, 5, 6, 9):
            catalog.commit(committed_batch(seq, f"r{seq}"))
        assert [catalog.recorded_through(after) for after in (0, 1, 3, 4, 6, 9, 20)] == [
            3,
            3,
            3,
            6,
            6,
            9,
            20,
        ]
    finally:
        catalog.close()


def test_a_restart_does_not_backfill_over_a_deleted_message(
    tmp_path: Path, nats_server: EmbeddedServer
) -> None:
    """A sequence deleted from the stream is never recorded: it is no gap to backfill."""
    # declared before busd's own, which denies deletes (busd warns about a stream that does not)
    allows_deletes = source.stream_config(config.Settings())
    allows_deletes.deny_delete = False
    on_jetstream(nats_server.url, lambda js: js.add_stream(allows_deletes))
    a, _ = pair(tmp_path, nats_server)
    a.publish([a.event(f"d{i}") for i in range(5)])
    on_jetstream(nats_server.url, lambda js: js.delete_msg("ARTIFACTS", 2))
    for run in range(2):
        proc = a.spawn("serve", "--config", str(a.write_config()), log=f"serve{run}.log")
        try:
            wait_for(
                lambda: (
                    "busd ready" in a.log(f"serve{run}.log")  # noqa: B023
                    and exported_all(a, 4)
                ),
                30,
                "4 events exported",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    assert "backfilling" not in a.log("serve1.log")
    assert a.sql("SELECT seq FROM catalog.events_f ORDER BY seq") == [(1,), (3,), (4,), (5,)]
