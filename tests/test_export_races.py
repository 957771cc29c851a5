"""Races between commit, export refresh and ack (issue 11, item 6), on a real `busd serve`.

With partitioned exports, a refresh rewrites only the parts that the commits since the last
refresh changed. A commit that finishes while the export loop takes that set must put its
changes in the next one: otherwise its messages are acked after a refresh that never
rewrote their parts. A slow configured export keeps the export loop out of step with the
commits, so under a backlog the loop takes the set while a commit is under way.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from support import Bus, on_jetstream, wait_for

SLOW_SQL = "SELECT i, md5(i::VARCHAR) AS h FROM range(150000000) t(i) WHERE i % 1000 = 0"


def test_every_acked_event_is_in_the_partitioned_exports(bus: Bus) -> None:
    shared = str(bus.parquet("shared/fills.parquet"))
    n = 20_000
    seqs = bus.publish([bus.event(f"r{i}", [{"name": "fills", "path": shared}]) for i in range(n)])
    cfg = bus.write_config(
        export_partition_seqs=1000,
        consumer={"commit_max": 1000, "batch_max": 1000},
        exports=[{"name": "slow", "sql": SLOW_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    # acked, not merely past in the manifest: under a loaded machine a group whose checks
    # time out is checked again later, after later sequences are already exported
    wait_for(lambda: acked_all(bus, seqs[-1]) or proc.poll() is not None, 240, "every ack")
    assert proc.poll() is None, bus.log()[-3000:]
    proc.terminate()
    assert proc.wait(60) == 0
    runs = set(
        pq.read_table(bus.data / "exports" / "runs", columns=["run_id"])
        .column("run_id")
        .to_pylist()
    )
    missing = {f"r{i}" for i in range(n)} - runs
    assert not missing, f"{len(missing)} acked runs missing from the runs export"


def acked_all(bus: Bus, last: int) -> bool:
    """busd's durable consumer has acked everything up to ``last``."""

    async def go(js: Any) -> bool:
        info = await js.consumer_info("ARTIFACTS", "busd")
        return bool(info.ack_floor.stream_seq >= last and info.num_ack_pending == 0)

    return on_jetstream(bus.servers, go)
