"""Keep-alives never wait for a batch (issue 11, items 2 and 7), on a real `busd serve`.

A file check held up (its worker processes SIGSTOPped, as a hung NFS read would hold them)
must not stop the systemd watchdog pings nor the in-progress signals that keep the server
from redelivering the message; an export refresh longer than ``consumer.stall_s`` is slow,
not stalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pyarrow.parquet as pq
import pytest
from faultfs import FaultFS
from support import Bus, FakeSystemd, ack_floor, notify_socket, on_jetstream, wait_for


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    with notify_socket(timeout_s=1) as fake:  # short reads: the tests poll against deadlines
        yield fake


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (busd's file-check workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def messages_until(systemd: FakeSystemd, wanted: str, within_s: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + within_s
    while wanted not in got and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            got += systemd.receive()
    assert wanted in got, f"no {wanted} within {within_s}s: {got}"
    return got


def exported_runs(bus: Bus) -> set[str]:
    path = bus.data / "exports" / "runs.parquet"
    if not path.exists():
        return set()
    return set(pq.read_table(path, columns=["run_id"]).column("run_id").to_pylist())


def redelivered(bus: Bus) -> int:
    async def info(js: Any) -> int:
        return int((await js.consumer_info("ARTIFACTS", "busd")).num_redelivered or 0)

    return on_jetstream(bus.url, info)


def test_a_stuck_file_check_stops_neither_the_watchdog_nor_the_in_progress_signals(
    bus: Bus, systemd: FakeSystemd
) -> None:
    cfg = bus.write_config(consumer={"ack_wait_s": 2})
    proc = bus.spawn(
        "serve",
        "--config",
        str(cfg),
        env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "1000000"},
    )
    try:
        messages_until(systemd, "READY=1", 30)
        workers = children(proc.pid)
        assert workers, "no file-check worker processes"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            bus.publish([bus.event("held-up")])
            # three ack waits with the check held: pings every half second all along
            pings, deadline = 0, time.monotonic() + 6
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    pings += systemd.receive().count("WATCHDOG=1")
            assert pings >= 8, f"{pings} watchdog pings in 6 s with a file check held up"
            assert proc.poll() is None
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: "held-up" in exported_runs(bus), 30, "the held-up run exported")
        # told in progress all along: the server never delivered it a second time
        assert redelivered(bus) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, bus.log()[-3000:]


# seconds of work (a large data.* view would take as long), a small result: ~3 s on one
# thread of an idle machine (400 million rows took 1.3 s there, under the test's 1.5 s)
SLOW_SQL = "SELECT i, md5(i::VARCHAR) AS h FROM range(1000000000) t(i) WHERE i % 1000 = 0"


def test_an_export_refresh_longer_than_stall_s_is_no_stall(bus: Bus) -> None:
    """The configured export takes seconds (a large ``data.*`` view would); busd with
    ``stall_s = 1`` keeps going while it advances, and acks once it is done. Two events
    commit while the first one's refresh runs: after it, the pause in which batches
    coalesce (as long as the refresh, at most 2 s) stays inside a stall period. Before: exit
    1 'no progress for 1s with 2 messages waiting' in the pause (in full runs under load,
    where the batches came apart; every time once they are published apart)."""
    cfg = bus.write_config(
        consumer={"stall_s": 1},
        exports=[{"name": "slow", "sql": SLOW_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: "busd ready" in bus.log(), 30, "busd ready")
        bus.publish([bus.event("r0")])
        bus.while_alive(proc, lambda: '"batch"' in bus.log(), 30, "the first batch")
        bus.publish([bus.event(f"r{i}") for i in (1, 2)])
        wait_for(
            lambda: (
                (
                    {"r0", "r1", "r2"} <= exported_runs(bus)
                    and (bus.data / "exports" / "slow.parquet").exists()
                )
                or proc.poll() is not None
            ),
            60,
            "the runs exported",
        )
        assert proc.poll() is None, bus.log()[-3000:]

        def acked() -> bool:
            async def info(js: Any) -> bool:
                ci = await js.consumer_info("ARTIFACTS", "busd")
                return int(ci.num_ack_pending or 0) == 0 and int(ci.num_pending or 0) == 0

            return on_jetstream(bus.url, info)

        wait_for(lambda: acked() or proc.poll() is not None, 60, "every event acked")
        assert proc.poll() is None, bus.log()[-3000:]
        assert "no progress" not in bus.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
    manifest = json.loads((bus.data / "exports" / "_manifest.json").read_text())
    slow_ms = manifest["exports"]["slow"]["duration_ms"]
    assert slow_ms > 1500, f"the slow export took {slow_ms} ms: not longer than stall_s"


def test_the_lag_gauges_are_measured_before_ready(bus: Bus) -> None:
    """An alert reading the lag right after a restart sees the backlog, never a 0 that
    was only not measured yet."""
    shared = str(bus.parquet("shared/fills.parquet"))
    bus.publish([bus.event(f"r{i}", [{"name": "fills", "path": shared}]) for i in range(300)])
    port = free_port()
    cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    proc = bus.spawn("serve", "--config", str(cfg))
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return proc.poll() is not None

    try:
        wait_for(ready, 30, "/readyz")
        with urllib.request.urlopen(base + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
        lag = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(
                ("busd_consumer_pending_messages", "busd_consumer_ack_pending_messages")
            )
        )
        assert lag > 0, "ready with a backlog of 300, and the lag gauges read 0"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, bus.log()[-3000:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _watched_standby(bus: Bus, cfg: Path, systemd: FakeSystemd) -> subprocess.Popen[str]:
    """A second instance (log ``b.log``) under a watchdog of 2 s: a ping every second."""
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "2000000"}
    return bus.spawn("serve", "--config", str(cfg), log="b.log", env=env)


def test_a_takeover_pings_the_watchdog_while_it_refreshes_stale_exports(
    bus: Bus, systemd: FakeSystemd
) -> None:
    """A standby has said READY=1 long before it takes over; the takeover's refresh of stale
    exports and its requests to NATS run before the keeper pings. Before, nothing pinged
    then: a 10 s gap under a 2 s WatchdogSec, and systemd kills busd as it takes over."""
    active = bus.ha_active(lease_ttl_s=2)
    slow = SLOW_SQL.replace("1000000000", "3000000000")  # ~10 s here: longer than the watchdog
    cfg_b = bus.second_config(exports=[{"name": "slow", "sql": slow, "depends_on": ["fills"]}])
    standby = _watched_standby(bus, cfg_b, systemd)
    try:
        messages_until(systemd, "READY=1", 60)
        wait_for(lambda: "standby: following" in bus.log("b.log"), 30, "the standby")
        active.kill()
        active.wait(30)
        pings: list[float] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "busd ready" not in bus.log("b.log"):
            with contextlib.suppress(TimeoutError):
                pings += [time.monotonic()] * systemd.receive().count("WATCHDOG=1")
        assert "busd ready" in bus.log("b.log"), bus.log("b.log")[-3000:]
        until = time.monotonic() + 3  # the keeper's own pings after ready close the last gap
        while time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                pings += [time.monotonic()] * systemd.receive().count("WATCHDOG=1")
        log = bus.log("b.log")
        took_over, ready = (
            _at(log, "took over the lease"),
            _at(log, "busd ready"),
        )
        assert ready - took_over > 5, "the refresh was too short to tell"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 2 and max(gaps) < 5, f"watchdog gaps {gaps} in a takeover"
    finally:
        standby.send_signal(signal.SIGTERM)
        assert standby.wait(60) == 0, bus.log("b.log")[-3000:]


def _at(log: str, event: str) -> float:
    """When the first log line whose event starts with ``event`` was written (epoch s)."""
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if str(entry.get("event", "")).startswith(event):
                return dt.datetime.fromisoformat(entry["timestamp"]).timestamp()
    raise AssertionError(f"no {event!r} in the log")


def test_a_standby_stuck_on_its_disk_is_not_kept_alive(
    bus: Bus, systemd: FakeSystemd, slow_disk: FaultFS
) -> None:
    """A standby whose follow loop hangs in a commit (each fsync of its WAL takes 40 s, a
    FUSE disk) stops pinging the watchdog once the loop has not turned for ten stall periods
    (``stall_s`` 1), so systemd restarts it. Before, a task of its own pinged with no bound,
    and a standby that could never take over looked alive (49 pings in 45 s, a reviewer's
    script)."""
    active = bus.ha_active()
    cfg_b = bus.second_config(slow_disk.mountpoint / "b", consumer={"stall_s": 1})
    standby = _watched_standby(bus, cfg_b, systemd)
    try:
        wait_for(lambda: "standby: following" in bus.log("b.log"), 60, "the standby")
        slow_disk.set("b/catalog.duckdb.wal", fsync_s=40)
        bus.publish([bus.event(f"r{i}") for i in range(3)])
        wait_for(
            lambda: slow_disk.hits().get("b/catalog.duckdb.wal:fsync", 0) >= 1,
            60,
            "the standby's commit on the hung disk",
        )
        wait_for(lambda: "no more watchdog pings" in bus.log("b.log"), 30, "the pings to end")
        with contextlib.suppress(TimeoutError):
            while True:  # what was sent before
                systemd.receive()
        pings = 0
        quiet_until = time.monotonic() + 4  # two WatchdogSec: systemd would restart it
        while time.monotonic() < quiet_until:
            with contextlib.suppress(TimeoutError):
                pings += systemd.receive().count("WATCHDOG=1")
        assert pings == 0
    finally:
        active.kill()
        standby.kill()
        slow_disk.clear()
        standby.wait(60)  # once its fsync returns: a thread in it holds even SIGKILL
        bus.reap()


@contextlib.contextmanager
def a_late_event_waiting(bus: Bus, stall_s: float) -> Iterator[subprocess.Popen[str]]:
    """``busd serve`` with ``stall_s``, and one event waiting for its file
    (``late/fills.parquet``, not there yet); stopped at the end, cleanly."""
    late = bus.artifacts / "late" / "fills.parquet"
    cfg = bus.write_config(consumer={"stall_s": stall_s}, verify={"file_wait_s": 60})
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 30, "ready")
        bus.publish([bus.event("late", [{"name": "fills", "path": str(late)}])])
        bus.while_alive(proc, lambda: "file missing" in bus.log(), 30, "the event waiting")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]


def test_nats_away_with_a_backlog_is_no_stall(bus: Bus) -> None:
    """NATS goes away for 5 s while a message waits (its file not there yet) and stall_s is
    1: nothing can progress, which is NATS's outage, not busd stuck; once NATS is back the
    event commits. Before: exit 1, 'no progress for 1s with 1 messages waiting' (seen in a
    full run when NATS dropped busd under load, and in a reviewer helper's control run)."""
    with a_late_event_waiting(bus, stall_s=1) as proc:
        time.sleep(2)  # the backlog measured (once a second): 1
        bus.server.kill()
        wait_for(lambda: "nats disconnected" in bus.log() or proc.poll() is not None, 30, "away")
        time.sleep(5)  # the outage: five stall periods
        bus.server.start()
        bus.parquet("late/fills.parquet")
        bus.while_alive(proc, lambda: '"committed": 1' in bus.log(), 90, "the event committed")


def test_a_backlog_measured_before_the_last_ack_is_no_stall(bus: Bus) -> None:
    """The backlog the stall check reads is measured once a second: one measured before the
    last ack still counts the messages acked since. nats-server is SIGSTOPped the moment the
    acks reach it (the connection stays up, no lag request is answered) with stall_s 1:
    nothing waits, so busd goes on. Before: exit 1, 'no progress for 1s with 3 messages
    waiting' (the stale count; a full run under load ended the same way)."""
    cfg = bus.write_config(
        consumer={"stall_s": 1},  # the slow export holds the acks: the lag sees them pending
        exports=[{"name": "slow", "sql": SLOW_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    server = bus.server.proc
    assert server is not None
    acked = threading.Event()

    def stop_on_the_first_ack() -> None:
        async def go() -> None:
            nc = await nats.connect(servers=bus.servers)

            async def on_ack(_: Any) -> None:
                if not acked.is_set():
                    server.send_signal(signal.SIGSTOP)
                    acked.set()

            await nc.subscribe("$JS.ACK.ARTIFACTS.busd.>", cb=on_ack)
            for _ in range(600):  # bounded: 60 s
                if acked.is_set():
                    break
                await asyncio.sleep(0.1)
            await nc.close()

        asyncio.run(go())

    watcher = threading.Thread(target=stop_on_the_first_ack, daemon=True)
    try:
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 30, "ready")
        watcher.start()
        bus.publish([bus.event(f"r{i}") for i in range(3)])
        bus.while_alive(proc, acked.is_set, 60, "the first ack")
        time.sleep(4)  # four stall periods without an answer from NATS
        assert proc.poll() is None, bus.log()[-3000:]
        server.send_signal(signal.SIGCONT)
        bus.while_alive(proc, lambda: ack_floor(bus) == 3, 60, "every event acked")
        assert "no progress" not in bus.log()
    finally:
        server.send_signal(signal.SIGCONT)
        watcher.join(10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]


def test_nats_frozen_while_busd_flushes_leaves_it_able_to_hear(bus: Bus) -> None:
    """nats-server SIGSTOPped 8 s while busd holds committed events (their in-progress
    signals and acks flushed with a timeout), then SIGCONT and five more events: all ten
    acked. Before: nats-py's read loop ended on the PONG of a flush that had timed out
    ('InvalidStateError'), busd still 'connected' heard nothing again, 5 of 10 acked after
    300 s and the watchdog pinged on (a reviewer helper's script, 4 of 4 runs)."""
    cfg = bus.write_config(
        consumer={"stall_s": 5, "ack_wait_s": 3},
        exports=[{"name": "slow", "sql": SLOW_SQL, "depends_on": ["fills"]}],
    )
    proc = bus.spawn("serve", "--config", str(cfg))
    server = bus.server.proc
    assert server is not None
    try:
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 30, "ready")
        bus.publish([bus.event(f"a{i}") for i in range(5)])
        bus.while_alive(proc, lambda: '"batch"' in bus.log(), 30, "a batch committed")
        server.send_signal(signal.SIGSTOP)  # acks wait for the slow export meanwhile
        time.sleep(8)
        server.send_signal(signal.SIGCONT)
        bus.publish([bus.event(f"b{i}") for i in range(5)])
        bus.while_alive(proc, lambda: ack_floor(bus) == 10, 60, "all ten acked")
        assert "InvalidStateError" not in bus.log()
    finally:
        server.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]


def test_a_message_waiting_out_a_nak_delay_is_no_stall(bus: Bus) -> None:
    """One event whose file is late, on a quiet stream, with stall_s 2: busd naks it with
    delays of 1, 2, 4, 8 s, and between them only the server's redelivery is awaited, not
    busd. The file appears after 12 s and the event commits. Before: exit 1 'no progress
    for 2s with 1 messages waiting' once a nak's delay passed stall_s (a reviewer helper's
    script: with stall_s 3, 10 and 30, 4 of 4 runs; with the defaults after a nak of 128 s
    or a back-off of 240 s after crashes)."""
    with a_late_event_waiting(bus, stall_s=2) as proc:
        time.sleep(12)  # naks of 1, 2, 4 and 8 s
        assert proc.poll() is None, bus.log()[-3000:]
        bus.parquet("late/fills.parquet")
        bus.while_alive(proc, lambda: '"committed": 1' in bus.log(), 60, "the event committed")


def test_a_stuck_fetch_loop_with_messages_buffered_is_a_stall(bus: Bus) -> None:
    """busd's fetch loop stuck after its first batch (a sitecustomize in the test makes the
    next fetch never return) while the prefetch it asked for holds two more: the keeper
    keeps them in progress, so the server never delivers them again and counts nothing
    pending. Those wait for busd: it exits 1 on the stall. Before (the rule of the previous
    commit): alive after 40 s, the two never handled (a reviewer helper's script)."""
    consumer = {"stall_s": 3, "batch_max": 2, "commit_max": 2, "max_ack_pending": 4}
    bus.init(consumer=consumer)
    cfg = bus.write_config(consumer=consumer)
    env = {"PYTHONPATH": str(Path(__file__).parent / "stuck_fetch")}
    proc = bus.spawn("serve", "--config", str(cfg), env=env)
    try:
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 30, "ready")
        bus.publish([bus.event(f"r{i}") for i in range(4)])
        assert proc.wait(60) == 1, bus.log()[-3000:]
        assert "no progress for 3s with 2 messages waiting" in bus.log(), bus.log()[-3000:]
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("bound", [False, True], ids=["own", "bind-only"])
def test_late_files_filling_max_ack_pending_are_no_stall(bus: Bus, bound: bool) -> None:
    """Four events wait for late files (nak'ed with delays) and fill max_ack_pending (4);
    three more cannot be delivered until they settle. busd holds nothing and only waits for
    the server: no stall (stall_s 2) through 12 s, and all seven commit once the files are
    there. Before: exit 1 'no progress for 2s with 7 messages waiting' (a reviewer helper's
    script, 2 of 2 runs). Bound to a consumer made elsewhere with that limit, busd's own
    setting left at its default, the same (before: the same exit, 3 of 3 runs of a
    third reviewer's script: the rule read busd's setting, not the consumer's)."""
    consumer = {"stall_s": 2, "batch_max": 2, "commit_max": 2, "max_ack_pending": 4}
    bus.init(consumer=consumer)
    if bound:
        del consumer["max_ack_pending"]
    nats_settings = {"bind_only": True} if bound else {}
    cfg = bus.write_config(consumer=consumer, verify={"file_wait_s": 120}, nats=nats_settings)
    proc = bus.spawn("serve", "--config", str(cfg))
    late = [bus.artifacts / f"late{i}" / "fills.parquet" for i in range(4)]
    try:
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 30, "ready")
        bus.publish(
            [bus.event(f"late{i}", [{"name": "fills", "path": str(p)}]) for i, p in enumerate(late)]
        )
        bus.while_alive(proc, lambda: "file missing" in bus.log(), 30, "the events waiting")
        bus.publish([bus.event(f"ok{i}") for i in range(3)])
        time.sleep(12)  # naks of 1, 2, 4 and 8 s
        assert proc.poll() is None, bus.log()[-3000:]
        for i in range(4):
            bus.parquet(f"late{i}/fills.parquet")
        bus.while_alive(proc, lambda: ack_floor(bus) == 7, 90, "all seven acked")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()[-3000:]
