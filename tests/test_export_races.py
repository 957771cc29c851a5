"""Races between commit, export refresh and ack (issue 11, item 6), on a real `busd serve`.

With partitioned exports, a refresh rewrites only the parts that the commits since the last
refresh changed. A commit that finishes while the export loop takes that set must put its
changes in the next one: otherwise its messages are acked after a refresh that never
rewrote their parts. A slow configured export keeps the export loop out of step with the
commits, so under a backlog the loop takes the set while a commit is under way.
"""

from __future__ import annotations

import pyarrow.parquet as pq
from support import Bus, wait_for

from busd.manifest import read_manifest

SLOW_SQL = "SELECT i, md5(i::VARCHAR) AS h FROM range(150000000) t(i) WHERE i % 1000 = 0"


def test_every_acked_event_is_in_the_partitioned_exports(bus: Bus) -> None:
    shared = str(bus.parquet("shared/fills.parquet"))
    n = 30_000
    seqs = bus.publish([bus.event(f"r{i}", [{"name": "fills", "path": shared}]) for i in range(n)])
    cfg = bus.write_config(
        export_partition_seqs=1000,
        consumer={"commit_max": 1000, "batch_max": 1000},
        exports=[{"name": "slow", "sql": SLOW_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    exports = bus.data / "exports"
    wait_for(
        lambda: (
            (
                read_manifest(exports).exports.get("runs") is not None
                and read_manifest(exports).exports["runs"].catalog_seq >= seqs[-1]
            )
            or proc.poll() is not None
        ),
        180,
        "every event exported",
    )
    assert proc.poll() is None, bus.log()[-3000:]
    proc.terminate()
    assert proc.wait(60) == 0
    runs = set(pq.read_table(exports / "runs", columns=["run_id"]).column("run_id").to_pylist())
    missing = {f"r{i}" for i in range(n)} - runs
    assert not missing, f"{len(missing)} committed runs missing from the runs export"
