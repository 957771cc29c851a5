"""Committed files the machine fails to read while busd exports (issue 11), under a real
`busd serve` and a real FUSE filesystem (``faultfs.py``): a file whose reads hang, or that
returns EIO, is left out of the refresh under way, never stops the acks of other events, is
not reported as gone, and is back in the exports once it reads again. A new file that fails
so keeps its event's ack waiting until the exports hold it. A refresh stuck inside DuckDB in
a read that never returns does not stop busd from exiting.
"""

from __future__ import annotations

import errno
import signal
import subprocess
from pathlib import Path
from typing import Any

from faultfs import FaultFS
from support import Bus, wait_for
from test_missing_files import LATEST, acked_through, exported_runs

from busd.manifest import read_manifest


def _event(bus: Bus, fs: FaultFS, run_id: str) -> dict[str, Any]:
    rel = f"{run_id}/fills.parquet"
    bus.parquet(rel)
    return bus.event(run_id, [{"name": "fills", "path": str(fs.path(rel))}])


def _exited(proc: subprocess.Popen[str]) -> bool:
    """The process ran to its end: reaped, or a zombie whose last thread still waits in the
    kernel for a FUSE read (which no signal interrupts)."""
    if proc.poll() is not None:
        return True
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return proc.poll() is not None


def _stop(bus: Bus, proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, bus.log()


def test_a_file_that_hangs_is_left_out_until_it_reads_again(bus: Bus, faultfs: FaultFS) -> None:
    cfg = bus.write_config(exports=[LATEST], verify={"check_timeout_s": 1, "file_wait_s": 30})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        (a,) = bus.publish([_event(bus, faultfs, "run-a")])
        wait_for(lambda: acked_through(bus, a), 60, "run A acked")
        faultfs.set("run-a/fills.parquet", stall=True)

        (b,) = bus.publish([_event(bus, faultfs, "run-b")])
        wait_for(lambda: acked_through(bus, b), 30, "run B acked while A's file hangs")
        assert faultfs.hits().get("run-a/fills.parquet:stall", 0) >= 1
        assert exported_runs(bus, "latest_fills") == ["run-b"]
        manifest = read_manifest(bus.data / "exports")
        assert manifest.exports["latest_fills"].catalog_commit == 0  # stale: it lacks A
        assert manifest.artifacts_missing.count == 0  # a file that hangs is not gone

        faultfs.clear()  # no event comes: busd notices that A reads again on its own
        wait_for(
            lambda: exported_runs(bus, "latest_fills") == ["run-a", "run-b"],
            30,
            "A back in the export",
        )
        wait_for(  # the manifest is written after the export's file
            lambda: read_manifest(bus.data / "exports").exports["latest_fills"].catalog_commit,
            30,
            "the export no longer stale",
        )
        assert proc.poll() is None, bus.log()
    finally:
        _stop(bus, proc)
    assert '"export refresh failed' not in bus.log()


def test_busd_starts_while_a_committed_file_hangs(bus: Bus, faultfs: FaultFS) -> None:
    bus.publish([_event(bus, faultfs, "run-a")])
    bus.drain(exports=[LATEST])
    faultfs.set("run-a/fills.parquet", stall=True)
    (b,) = bus.publish([_event(bus, faultfs, "run-b")])
    cfg = bus.write_config(exports=[LATEST], verify={"check_timeout_s": 1})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: acked_through(bus, b), 30, "run B acked by a busd started meanwhile")
        assert exported_runs(bus, "latest_fills") == ["run-b"]
        faultfs.clear()
        wait_for(
            lambda: exported_runs(bus, "latest_fills") == ["run-a", "run-b"],
            30,
            "A back in the export",
        )
    finally:
        _stop(bus, proc)


def test_a_refresh_stuck_in_a_read_does_not_stop_the_exit(bus: Bus, faultfs: FaultFS) -> None:
    """The first bytes of A's file come (busd's own look passes), the rest hangs: DuckDB
    hangs in the refresh, where nothing can interrupt it. busd still exits once its grace
    period is over, and a busd started later recovers the catalog it left open."""
    cfg = bus.write_config(
        exports=[LATEST], verify={"check_timeout_s": 1}, consumer={"shutdown_grace_s": 2}
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    (a,) = bus.publish([_event(bus, faultfs, "run-a")])
    wait_for(lambda: acked_through(bus, a), 60, "run A acked")
    faultfs.set("run-a/fills.parquet", stall=True, over=64)
    (b,) = bus.publish([_event(bus, faultfs, "run-b")])
    wait_for(
        lambda: faultfs.hits().get("run-a/fills.parquet:stall", 0) >= 1, 30, "DuckDB's read to hang"
    )
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: _exited(proc), 30, "busd to exit while the read still hangs")
    assert "the export thread is stuck in a read" in bus.log()
    faultfs.clear()
    assert proc.wait(30) == 0, bus.log()

    again = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert again.wait(60) == 0, bus.log()
    assert exported_runs(bus, "latest_fills") == ["run-a", "run-b"]
    assert acked_through(bus, b)


def test_a_new_file_the_machine_fails_to_read_keeps_its_ack_waiting(
    bus: Bus, faultfs: FaultFS
) -> None:
    """Only busd's own process gets EIO from B's file (the checker's workers read it fine,
    so B commits); the refresh is retried and B acked once the export holds it."""
    cfg = bus.write_config(exports=[LATEST], verify={"file_wait_s": 30})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        (a,) = bus.publish([_event(bus, faultfs, "run-a")])
        wait_for(lambda: acked_through(bus, a), 60, "run A acked")
        event = _event(bus, faultfs, "run-b")
        faultfs.set("run-b/fills.parquet", read=errno.EIO, pid=proc.pid)
        (b,) = bus.publish([event])
        wait_for(
            lambda: faultfs.hits().get("run-b/fills.parquet:read", 0) >= 3,
            30,
            "the refresh to try B's file again",
        )
        assert not acked_through(bus, b)
        assert exported_runs(bus, "latest_fills") == ["run-a"]
        faultfs.clear()
        wait_for(lambda: acked_through(bus, b), 30, "run B acked once its file reads")
        assert exported_runs(bus, "latest_fills") == ["run-a", "run-b"]
        manifest = read_manifest(bus.data / "exports")
        assert manifest.artifacts_missing.count == 0
        assert manifest.exports["latest_fills"].catalog_commit > 0
    finally:
        _stop(bus, proc)


def test_a_late_lower_sequence_the_machine_fails_to_read_keeps_its_ack_waiting(
    bus: Bus, faultfs: FaultFS
) -> None:
    """A's file is not there yet (A is retried), B commits and is exported; then A's file
    appears and only busd's own process gets EIO from it. A's file is new to the export,
    though its sequence is below the one the export covers: A is not acked before the
    export holds it."""
    rel = "run-a/fills.parquet"
    cfg = bus.write_config(  # A is delivered again within seconds
        exports=[LATEST], verify={"file_wait_s": 30}, consumer={"max_deliver": 30}
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        late = bus.event("run-a", [{"name": "fills", "path": str(faultfs.path(rel))}])
        a, b = bus.publish([late, _event(bus, faultfs, "run-b")])
        export = bus.data / "exports" / "latest_fills.parquet"
        wait_for(
            lambda: export.exists() and exported_runs(bus, "latest_fills") == ["run-b"],
            60,
            "run B exported while A waits for its file",
        )
        faultfs.set(rel, read=errno.EIO, pid=proc.pid)
        bus.parquet("run-a/.fills.parquet.tmp").rename(bus.artifacts / rel)
        wait_for(
            lambda: faultfs.hits().get(f"{rel}:read", 0) >= 3,
            60,
            "the refresh to try A's file again",
        )
        assert not acked_through(bus, a)
        assert exported_runs(bus, "latest_fills") == ["run-b"]
        faultfs.clear()
        wait_for(lambda: acked_through(bus, b), 30, "run A acked once its file reads")
        assert exported_runs(bus, "latest_fills") == ["run-a", "run-b"]
    finally:
        _stop(bus, proc)


def test_an_eio_inside_duckdb_leaves_the_file_out_for_this_refresh_only(
    bus: Bus, faultfs: FaultFS
) -> None:
    """busd's look at A's file passes, DuckDB's read of it fails once with EIO: A is left
    out of that refresh, not remembered as damaged, and back in the export right after."""
    cfg = bus.write_config(exports=[LATEST])
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        (a,) = bus.publish([_event(bus, faultfs, "run-a")])
        wait_for(lambda: acked_through(bus, a), 60, "run A acked")
        faultfs.set("run-a/fills.parquet", read=errno.EIO, over=64, pid=proc.pid)
        (b,) = bus.publish([_event(bus, faultfs, "run-b")])
        wait_for(
            lambda: faultfs.hits().get("run-a/fills.parquet:read", 0) >= 1,
            30,
            "DuckDB's read to fail",
        )
        faultfs.clear()
        wait_for(lambda: acked_through(bus, b), 30, "run B acked")
        wait_for(
            lambda: exported_runs(bus, "latest_fills") == ["run-a", "run-b"],
            30,
            "A back in the export",
        )
        assert read_manifest(bus.data / "exports").artifacts_missing.count == 0
    finally:
        _stop(bus, proc)
