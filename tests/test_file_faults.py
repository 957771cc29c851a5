"""Files that fail the way storage fails (docs/reference/events.md), under a real `busd serve`:
errors of the machine are retried and never rejected, an unreadable file gets the patience of a
missing one and then `file_unreadable`, a stalled read is bounded, and a file still being written is
judged only once it has stopped changing. The faults are served by a real FUSE filesystem
(``faultfs.py``)."""

from __future__ import annotations

import errno
import json
import signal
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultfs import FaultFS
from support import Bus, ack_floor, wait_for

from busd.errors import ConfigError


def _event(bus: Bus, fs: FaultFS, run_id: str, **artifact: Any) -> dict[str, Any]:
    rel = f"{run_id}/fills.parquet"
    bus.parquet(rel)
    return bus.event(run_id, [{"name": "fills", "path": str(fs.path(rel)), **artifact}])


def _serve_drain(bus: Bus, **over: Any) -> Any:
    cfg = bus.write_config(**over)
    return bus.spawn("serve", "--config", str(cfg), "--drain")


def _nak_logged(bus: Bus, seq: int) -> bool:
    lines = (json.loads(line) for line in bus.log().splitlines() if line.startswith("{"))
    return any("retrying later" in str(e.get("event")) and e.get("seq") == seq for e in lines)


def _outcomes(bus: Bus) -> list[tuple[Any, ...]]:
    return bus.sql("SELECT e.run_id, e.outcome, e.reason FROM catalog.events_f e ORDER BY seq")


@pytest.mark.parametrize(
    "fault",
    [("read", errno.EIO), ("open", errno.EMFILE), ("open", errno.ESTALE), ("read", errno.ENOMEM)],
    ids=["eio_read", "emfile_open", "estale_open", "enomem_read"],
)
def test_an_error_of_the_machine_is_retried_and_costs_no_delivery(
    bus: Bus, faultfs: FaultFS, fault: tuple[str, int]
) -> None:
    kind, code = fault
    bus.publish([_event(bus, faultfs, "flaky"), _event(bus, faultfs, "fine")])
    faultfs.set("flaky/fills.parquet", **{kind: code})
    # max_deliver 3: a nak per retry (or a redelivery after ack_wait, 2 s, for want of an
    # in-progress signal) would make it poison on its second delivery
    proc = _serve_drain(
        bus, consumer={"max_deliver": 3, "ack_wait_s": 2}, verify={"file_wait_s": 1}
    )
    wait_for(
        lambda: bus.log().count("the machine failed to read files") >= 3,
        20,
        "the check to be retried several times",
    )
    assert faultfs.hits().get(f"flaky/fills.parquet:{kind}", 0) >= 3
    assert proc.poll() is None, bus.log()
    faultfs.clear()
    assert proc.wait(60) == 0, bus.log()
    assert _outcomes(bus) == [("flaky", "committed", None), ("fine", "committed", None)]
    assert bus.sql("SELECT count(*) FROM catalog.rejections_f") == [(0,)]


def test_an_unreadable_file_waits_like_a_missing_one_then_file_unreadable(
    bus: Bus, faultfs: FaultFS
) -> None:
    bus.publish([_event(bus, faultfs, "locked"), _event(bus, faultfs, "unlocked")])
    faultfs.set("locked/fills.parquet", open=errno.EACCES)
    faultfs.set("unlocked/fills.parquet", open=errno.EPERM)
    started = time.monotonic()
    # the wait counts from publication: long enough for busd to start on a loaded machine
    proc = _serve_drain(bus, verify={"file_wait_s": 12})
    wait_for(lambda: _nak_logged(bus, seq=2), 30, "the unreadable file to be nak'ed")
    faultfs.clear("unlocked/fills.parquet")
    assert proc.wait(60) == 0, bus.log()
    assert time.monotonic() - started >= 12
    assert _outcomes(bus) == [
        ("locked", "rejected", "file_unreadable"),
        ("unlocked", "committed", None),
    ]
    ((detail,),) = bus.sql("SELECT detail FROM catalog.rejections_f")
    assert "not readable" in detail


@pytest.mark.parametrize("processes", [2, 0], ids=["workers", "threads"])
def test_a_stalled_read_is_bounded_and_retried(bus: Bus, faultfs: FaultFS, processes: int) -> None:
    bus.publish([_event(bus, faultfs, "stuck"), _event(bus, faultfs, "free")])
    faultfs.set("stuck/fills.parquet", stall=True)
    proc = _serve_drain(
        bus, consumer={"ack_wait_s": 30}, verify={"check_timeout_s": 1, "processes": processes}
    )
    # the other event is decided while the stalled read still hangs
    wait_for(lambda: '"committed": 1' in bus.log(), 30, "the free event to commit")
    assert faultfs.hits().get("stuck/fills.parquet:stall", 0) >= 1
    assert proc.poll() is None, bus.log()
    faultfs.clear()
    assert proc.wait(60) == 0, bus.log()
    assert _outcomes(bus) == [("stuck", "committed", None), ("free", "committed", None)]
    assert bus.sql("SELECT count(*) FROM catalog.rejections_f") == [(0,)]


def test_a_hidden_file_is_missing_then_found(bus: Bus, faultfs: FaultFS) -> None:
    bus.publish([_event(bus, faultfs, "hidden")])
    faultfs.set("hidden/fills.parquet", hide=True)
    proc = _serve_drain(bus, verify={"file_wait_s": 12})
    wait_for(
        lambda: faultfs.hits().get("hidden/fills.parquet:hide", 0) >= 2,
        30,
        "the missing file to be looked for again",
    )
    faultfs.clear()
    assert proc.wait(60) == 0, bus.log()
    assert _outcomes(bus) == [("hidden", "committed", None)]


def test_a_file_still_being_written_is_committed_once_complete(bus: Bus) -> None:
    """Half a Parquet file when the event arrives, and a producer still writing it: busd
    waits while the file changes and commits it once complete."""
    whole = bus.root / "whole.parquet"
    pq.write_table(pa.table({"x": list(range(20_000))}), whole)
    data = whole.read_bytes()
    path = bus.artifacts / "growing" / "fills.parquet"
    path.parent.mkdir(parents=True)
    written = len(data) // 2
    path.write_bytes(data[:written])
    seen = threading.Event()

    def producer() -> None:  # a slow writer: a little every 0.2 s, the rest once busd looked
        nonlocal written
        with open(path, "ab") as f:
            while written < len(data):
                size = -(-(len(data) - written) // 3) if seen.is_set() else 100
                f.write(data[written : written + size])
                f.flush()
                written += size
                time.sleep(0.2)

    writer = threading.Thread(target=producer, daemon=True)
    writer.start()
    bus.publish([bus.event("growing", [{"name": "fills", "path": str(path)}])])
    cfg = bus.write_config(verify={"file_wait_s": 10, "settle_s": 1})
    proc = bus.spawn("serve", "--config", str(cfg), "--drain")
    try:
        wait_for(lambda: "retrying later" in bus.log(), 20, "busd to wait for the file")
    finally:
        seen.set()
        writer.join(10)
    assert proc.wait(60) == 0, bus.log()
    assert _outcomes(bus) == [("growing", "committed", None)]
    assert bus.sql("SELECT rows FROM catalog.artifacts_f") == [(20_000,)]


def test_a_content_verdict_waits_only_for_the_file_to_settle(bus: Bus) -> None:
    """Not Parquet, and not changing: rejected after ``settle_s``, not after ``file_wait_s``."""
    path = bus.artifacts / "text.parquet"
    path.write_text("this is not parquet at all")
    bus.publish([bus.event("text", [{"name": "fills", "path": str(path)}])])
    started = time.monotonic()
    stats = bus.drain(verify={"file_wait_s": 60, "settle_s": 1})
    assert 1 <= time.monotonic() - started < 30
    assert stats.outcomes == {"rejected": 1}
    assert _outcomes(bus) == [("text", "rejected", "not_parquet")]


def test_a_stalled_check_does_not_stop_a_shutdown(bus: Bus, faultfs: FaultFS) -> None:
    bus.publish([_event(bus, faultfs, "stuck")])
    faultfs.set("stuck/fills.parquet", stall=True)
    cfg = bus.write_config(verify={"check_timeout_s": 1})
    proc = bus.spawn("serve", "--config", str(cfg))
    wait_for(
        lambda: faultfs.hits().get("stuck/fills.parquet:stall", 0) >= 1, 30, "the read to stall"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, bus.log()
    assert _outcomes(bus) == []


@pytest.mark.parametrize(("key", "value"), [("settle_s", -1), ("check_timeout_s", 0)])
def test_bad_verify_timings_name_their_key(bus: Bus, key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"verify.{key}"):
        bus.settings(verify={key: value})


def test_a_rebuild_on_a_failing_disk_fails_rather_than_reject(bus: Bus, faultfs: FaultFS) -> None:
    """Replay has no message to keep in hand: it checks again a few times, then gives up
    with exit 1, and the live catalog stays as it was."""
    bus.publish([_event(bus, faultfs, "kept")])
    assert bus.drain().outcomes == {"committed": 1}
    faultfs.set("kept/fills.parquet", read=errno.EIO)
    cfg = bus.write_config()
    # --recheck: the file's identity is unchanged, so a plain rebuild would reuse its check
    done = bus.cli("rebuild", "--recheck", "--config", str(cfg), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "EIO" in done.stderr
    assert faultfs.hits().get("kept/fills.parquet:read", 0) >= 4  # checked again, 3 times
    assert _outcomes(bus) == [("kept", "committed", None)]
    faultfs.clear()
    done = bus.cli("rebuild", "--config", str(cfg), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _outcomes(bus) == [("kept", "committed", None)]


def test_a_stop_does_not_wait_for_a_file_check_that_hangs(bus: Bus, faultfs: FaultFS) -> None:
    """SIGTERM while the batch's file read hangs: after ``shutdown_grace_s`` (10 s here)
    busd gives the check up, commits nothing of that batch, nak's it and exits 0 (before: it
    waited for the check's timeout, 30 s by default, past its shutdown grace). The check
    timeout here is 300 s: a stop that waited for it would not end within the test's wait."""
    bus.publish([_event(bus, faultfs, "stuck")])
    faultfs.set("stuck/fills.parquet", stall=True)
    cfg = bus.write_config(verify={"check_timeout_s": 300})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(
            lambda: faultfs.hits().get("stuck/fills.parquet:stall", 0) >= 1,
            60,
            "the read to hang",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
    finally:
        faultfs.clear()
        bus.reap()
    assert not (bus.data / "held.json").exists()  # a clean stop: no death counted
    faultfs.clear()
    assert _serve_drain(bus).wait(60) == 0, bus.log()[-3000:]
    assert _outcomes(bus) == [("stuck", "committed", None)]


def test_an_artifact_root_that_vanishes_holds_its_events_until_it_is_back(bus: Bus) -> None:
    """A share unmounted or renamed away (or its permissions changed): every file under the
    root fails alike, the machine's fault, not the events'. Each event was rejected
    `file_missing` (`file_unreadable` for EACCES, a reviewer's script) once
    ``verify.file_wait_s`` ran out; now each is held in hand and committed once the root is
    back."""
    root, away = bus.artifacts, bus.root / "unmounted"
    bus.publish([bus.event("before")])
    lost = bus.event("during")  # its file written before the root goes
    cfg = bus.write_config(consumer={"max_deliver": 3}, verify={"file_wait_s": 1})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        bus.while_alive(proc, lambda: ack_floor(bus) >= 1, 30, "the first event acked")
        root.rename(away)
        bus.publish([lost])
        wait_for(
            lambda: bus.log().count("the machine failed to read files") >= 4,  # 0.5+1+2 s
            30,
            "the check to be retried past file_wait_s",
        )
        assert proc.poll() is None, bus.log()[-3000:]
        assert f"the artifact root {root} is gone" in bus.log()
    finally:
        if away.exists():
            away.rename(root)
    bus.while_alive(proc, lambda: ack_floor(bus) >= 2, 30, "the second event acked")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, bus.log()[-3000:]
    assert _outcomes(bus) == [("before", "committed", None), ("during", "committed", None)]
