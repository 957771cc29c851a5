"""Slow storage is not stuck storage (issue 11): a file check that reads on through a large
file is never taken for a stalled read, and file checks that keep answering are progress for
the stall watchdog, however long the batch takes. The slowness is served by a real FUSE
filesystem (``faultfs.py``: reads at a set rate)."""

from __future__ import annotations

import asyncio
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultfs import FaultFS
from support import Bus, sha256_file

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
