"""Slow storage is not stuck storage (issue 11): a file check that reads on through a large
file is never taken for a stalled read, and file checks that keep answering are progress for
the stall watchdog, however long the batch takes. The slowness is served by a real FUSE
filesystem (``faultfs.py``: reads at a set rate)."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultfs import FaultFS
from support import Bus, sha256_file, wait_for

from busd.checker import Checker, Result
from busd.model import Artifact

MIB = 1 << 20


@pytest.mark.parametrize("processes", [1, 0], ids=["worker", "thread"])
def test_a_long_hash_that_reads_on_is_not_a_stalled_check(
    bus: Bus, faultfs: FaultFS, processes: int
) -> None:
    """8 MiB read at 4 MiB/s: the hash takes about 2 s, twice the check timeout, but each
    MiB of it comes within it; only a read that is stuck may time out."""
    rel = "big/fills.parquet"
    path = bus.artifacts / rel
    path.parent.mkdir(parents=True)
    blobs = [os.urandom(64 << 10) for _ in range(128)]
    pq.write_table(pa.table({"blob": blobs}), path, compression="none")
    assert path.stat().st_size > 8 * MIB
    digest = sha256_file(path)
    faultfs.set(rel, rate=4 * MIB)

    async def go() -> tuple[Result, int]:
        checker = Checker(
            [faultfs.mountpoint], "if_given", processes=processes, threads=1, timeout_s=1.0
        )
        await checker.start()
        try:
            before = checker.progress()
            [result] = await checker.check([[Artifact("a", str(faultfs.path(rel)), sha256=digest)]])
            return result, checker.progress() - before
        finally:
            await checker.close()

    result, signs = asyncio.run(go())
    assert isinstance(result, list), result
    assert result[0].sha256 == digest and result[0].hashed
    assert signs > 2  # of progress during the hash, for the stall watchdog


def test_file_checks_that_keep_answering_are_progress_for_the_watchdog(
    bus: Bus, faultfs: FaultFS
) -> None:
    """Six events whose checks take most of a second each (one at a time, in one worker):
    the batch takes far longer than ``stall_s``, each check far less than its timeout.
    busd commits them all; before, its watchdog ended it as stalled halfway (and each restart
    cost the events a delivery)."""
    events = []
    for i in range(6):
        rel = f"slow{i}/fills.parquet"
        faultfs.set(rel, rate=bus.parquet(rel).stat().st_size / 0.8)  # 0.8 s for its read
        events.append(bus.event(f"slow{i}", [{"name": "fills", "path": str(faultfs.path(rel))}]))
    cfg = bus.write_config(
        verify={"check_timeout_s": 3, "processes": 1, "file_wait_s": 0},
        consumer={"stall_s": 3, "batch_wait_ms": 200},
    )
    bus.publish(events)
    proc = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert proc.wait(60) == 0, bus.log()[-3000:]
    assert "no progress for" not in bus.log()
    assert bus.sql("SELECT outcome, count(*) FROM catalog.events_f GROUP BY ALL") == [
        ("committed", 6)
    ]


def test_a_commit_slower_than_stall_s_is_no_stall(bus: Bus, slow_disk: FaultFS) -> None:
    """The catalog on a disk whose every fsync of the WAL takes 5 s, with ``stall_s`` 2: a
    commit says nothing while it runs, and busd is patient with it (for ten stall periods)
    rather than exit as stalled with the batch in hand. The disk is a writable FUSE mount."""
    bus.overrides = {**bus.overrides, "data_dir": str(slow_disk.mountpoint / "data")}
    cfg = bus.write_config(consumer={"stall_s": 2, "ack_wait_s": 30})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: '"busd ready"' in bus.log(), 60, "busd to start")
        slow_disk.set("data/catalog.duckdb.wal", fsync_s=5)
        bus.publish([bus.event(f"r{i}") for i in range(20)])
        wait_for(
            lambda: slow_disk.hits().get("data/catalog.duckdb.wal:fsync", 0) >= 1,
            60,
            "a slow commit",
        )
        wait_for(
            lambda: _committed(bus.log()) == 20 or proc.poll() is not None,
            90,
            "the slow commits to finish",
        )
        assert proc.poll() is None, bus.log()[-3000:]
        slow_disk.clear()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
        rows = bus.sql("SELECT count(*) FROM catalog.events_f WHERE outcome = 'committed'")
    finally:
        bus.reap()
    assert rows == [(20,)]
    assert "no progress" not in bus.log()


def _committed(log: str) -> int:
    """Events committed so far, from the batch lines of busd's log."""
    lines = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return sum(int(e.get("committed", 0)) for e in lines if e.get("event") == "batch")


def test_a_stop_gives_up_on_a_commit_the_disk_does_not_finish(bus: Bus, slow_disk: FaultFS) -> None:
    """SIGTERM while a commit waits on a WAL fsync that takes 20 s (a disk that does not
    answer), with ``shutdown_grace_s`` 2: busd gives the commit up and stops while the fsync
    still runs (before: it waited for the fsync twice, in the fetch loop and in the commit
    of the next batch, and only then began its own grace periods). The process ends once
    the kernel lets the thread in the fsync go; nothing given up was acked, and a restart
    commits every event."""
    bus.overrides = {**bus.overrides, "data_dir": str(slow_disk.mountpoint / "data")}
    cfg = bus.write_config(consumer={"shutdown_grace_s": 2, "ack_wait_s": 60})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: '"busd ready"' in bus.log(), 60, "busd to start")
        slow_disk.set("data/catalog.duckdb.wal", fsync_s=20)
        bus.publish([bus.event(f"r{i}") for i in range(5)])
        wal = "data/catalog.duckdb.wal"
        wait_for(lambda: slow_disk.hits().get(f"{wal}:fsync", 0) >= 1, 60, "a commit's fsync")
        proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: "busd stopped" in bus.log() or slow_disk.hits().get(f"{wal}:fsync_done"),
            60,
            "the stop or the fsync",
        )
        assert not slow_disk.hits().get(f"{wal}:fsync_done"), "the stop waited for the fsync"
        assert "the catalog's writer is stuck on the disk" in bus.log()
        assert proc.wait(60) == 0, bus.log()[-3000:]
        slow_disk.clear()
        again = bus.spawn("serve", "--config", str(cfg), "--drain", log="again.log")
        assert again.wait(120) == 0, bus.log("again.log")[-3000:]
        rows = bus.sql("SELECT count(*) FROM catalog.events_f WHERE outcome = 'committed'")
    finally:
        bus.reap()
    assert rows == [(5,)]
