"""Faults against real processes: kill -9 loops, nats-server restarts, SIGSTOP, stalls, a
deleted consumer or stream. Every loop is bounded in count and time; each test prints what it
did and what it found. ``--long`` runs the long forms."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pyarrow.parquet as pq
import pytest
from support import Bus, ack_floor, on_jetstream, wait_for
from test_cli import free_port

from busd.manifest import read_manifest


class Publisher:
    """Publishes ``total`` events with PubAck and retries, in a thread, at a steady pace."""

    def __init__(self, bus: Bus, total: int, rate_per_s: float, prefix: str = "c") -> None:
        self.bus, self.total, self.rate = bus, total, rate_per_s
        self.ids = [f"{prefix}-{i}" for i in range(total)]
        self.path = str(bus.parquet(f"{prefix}/shared.parquet"))
        self.acked = 0
        self.retries = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        nc = await nats.connect(
            servers=self.bus.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        js = nc.jetstream()
        deadline = time.monotonic() + 300
        try:
            for i, run_id in enumerate(self.ids):
                body = json.dumps(
                    self.bus.event(
                        run_id, [{"name": "fills", "path": self.path}], event_id=f"{run_id}:final"
                    )
                ).encode()
                while time.monotonic() < deadline:
                    try:
                        await js.publish(
                            "artifacts.chaos",
                            body,
                            timeout=2,
                            headers={"Nats-Msg-Id": f"{run_id}:final"},
                        )
                        self.acked += 1
                        break
                    except Exception:  # noqa: BLE001 - outage: retry, the msg id dedups
                        self.retries += 1
                        await asyncio.sleep(0.1)
                if i % 50 == 49:
                    await asyncio.sleep(50 / self.rate)
        finally:
            await nc.close()

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(320)


def exported_all(bus: Bus, n: int) -> bool:
    """Every one of ``n`` events is in the artifacts export. The highest sequence is not
    enough: after a SIGSTOP, the events the stopped process held come back only when the
    server redelivers them, after later ones have committed."""
    path = bus.data / "exports" / "artifacts.parquet"
    return path.exists() and pq.read_metadata(path).num_rows >= n


def check_exactly_once(bus: Bus, ids: list[str]) -> dict[str, int]:
    rows = bus.sql(
        "SELECT run_id, count(*) FROM catalog.events_f WHERE outcome = 'committed' GROUP BY run_id"
    )
    per_run = dict(rows)
    lost = [r for r in ids if r not in per_run]
    doubled = [r for r, n in per_run.items() if n != 1]
    exported = bus.export("artifacts").num_rows
    leftovers = list((bus.data / "exports").glob(".*tmp*"))
    assert not lost, f"lost {len(lost)}: {lost[:5]}"
    assert not doubled, f"doubled {len(doubled)}: {doubled[:5]}"
    assert exported == len(ids)
    assert not leftovers
    assert bus.sql("SELECT count(*) FROM catalog.events_f WHERE outcome = 'rejected'") == [(0,)]
    return {"committed": len(per_run), "lost": len(lost), "doubled": len(doubled)}


def verify_passes(bus: Bus, cfg: str) -> None:
    out = bus.cli("verify", "--config", cfg, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(3600)  # the long form runs 200 trials
@pytest.mark.parametrize(
    "trials", [pytest.param(12, id="short"), pytest.param(200, id="long", marks=pytest.mark.slow)]
)
def test_kill_9_at_random_moments(bus: Bus, trials: int) -> None:
    total = 150 * trials
    cfg = str(bus.write_config(consumer={"max_deliver": 50, "ack_wait_s": 1, "batch_max": 100}))
    rng = random.Random(7)
    kills = 0
    started = time.monotonic()
    with Publisher(bus, total, rate_per_s=300) as pub:
        for _ in range(trials):
            proc = bus.spawn("serve", "--config", cfg)
            time.sleep(rng.uniform(0.8, 2.5))
            proc.kill()
            proc.wait(30)
            kills += 1
    bus.drain(consumer={"max_deliver": 50, "ack_wait_s": 1, "batch_max": 100})
    found = check_exactly_once(bus, pub.ids)
    verify_passes(bus, cfg)
    print(
        f"\nkill -9 loop: {trials} trials, {kills} kills, {pub.acked} events published "
        f"({pub.retries} publish retries), {found}, {time.monotonic() - started:.0f}s"
    )


def test_kill_9_at_each_named_point_repeatedly(bus: Bus, request: pytest.FixtureRequest) -> None:
    points = [
        "after_decode",
        "during_validate",
        "after_commit",
        "during_export",
        "after_rename",
        "before_ack",
        "after_ack",
    ]
    total = 400
    ids = [f"p-{i}" for i in range(total)]
    path = str(bus.parquet("p/shared.parquet"))
    bus.publish([bus.event(r, [{"name": "fills", "path": path}], event_id=r) for r in ids])
    # one batch per transaction, so that each point is reached again in every round
    small = {"max_deliver": 50, "ack_wait_s": 1, "batch_max": 20, "commit_max": 20}
    cfg = str(bus.write_config(consumer=small))
    kills, rounds = 0, 3 if request.config.getoption("--long") else 2
    for round_ in range(rounds):
        for point in points:
            proc = bus.spawn(
                "serve",
                "--config",
                cfg,
                env={"BUSD_TEST_FAULT": point, "BUSD_TEST_FAULT_SKIP": str(round_)},
            )
            rc = proc.wait(60)
            kills += rc == -signal.SIGKILL
    bus.drain(consumer=small)
    found = check_exactly_once(bus, ids)
    verify_passes(bus, cfg)
    print(
        f"\nnamed points: {len(points)} points x {rounds} rounds, {kills} kills, {total} events, "
        f"{found}"
    )


@contextmanager
def serving(bus: Bus, **over: Any) -> Iterator[tuple[Any, int]]:
    port = free_port()
    cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"}, **over)
    proc = bus.spawn("serve", "--config", str(cfg))
    wait_for(lambda: "busd ready" in bus.log(), 30, "busd ready")
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def scrape(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            ready = r.status
    except urllib.error.HTTPError as exc:
        ready = exc.code
    except OSError:
        return 0, ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return ready, r.read().decode()


def test_nats_server_restarts_and_kills_mid_flow(bus: Bus) -> None:
    outages = 0
    with serving(bus) as (_proc, port), Publisher(bus, 1500, rate_per_s=250) as pub:
        for i in range(4):
            wait_for(lambda i=i: pub.acked >= 250 * (i + 1), 60, "events flowing")
            if i % 2:
                bus.server.kill()
            else:
                bus.server.stop()
            outages += 1
            wait_for(
                lambda: scrape(port)[0] == 503 and "busd_nats_connected 0.0" in scrape(port)[1],
                30,
                "outage seen",
            )
            time.sleep(0.5)
            bus.server.start()
            wait_for(lambda: scrape(port)[0] == 200, 60, "busd reconnected")
    bus.drain()
    found = check_exactly_once(bus, pub.ids)
    print(
        f"\nnats-server restarts: {outages} outages (2 SIGTERM, 2 SIGKILL), {pub.acked} "
        f"events, {pub.retries} publish retries, {found}"
    )


def test_sigstop_past_ack_wait(bus: Bus) -> None:
    seqs_seen: list[int] = []
    with (
        serving(bus, consumer={"ack_wait_s": 1}) as (proc, _port),
        Publisher(bus, 600, rate_per_s=300) as pub,
    ):
        for _ in range(3):
            time.sleep(0.7)
            proc.send_signal(signal.SIGSTOP)
            time.sleep(3.0)  # past ack_wait: the server redelivers what busd held
            proc.send_signal(signal.SIGCONT)
            seqs_seen.append(read_manifest(bus.data / "exports").catalog_seq)
        wait_for(lambda: pub.acked == 600 and exported_all(bus, 600), 60, "caught up")
        seqs_seen.append(read_manifest(bus.data / "exports").catalog_seq)
    assert seqs_seen == sorted(seqs_seen), "an export went back"
    found = check_exactly_once(bus, pub.ids)
    print(f"\nSIGSTOP x3 for 3 s (ack_wait 1 s): {found}, export seqs {seqs_seen}")


def test_stall_exits_non_zero(bus: Bus) -> None:
    with serving(bus, consumer={"stall_s": 3}) as (proc, _port):
        exports = bus.data / "exports"
        kept = bus.data / "exports.kept"
        exports.rename(kept)
        exports.write_text("an export folder that cannot be written")
        bus.publish([bus.event("stuck")])
        rc = proc.wait(60)
        exports.unlink()
        kept.rename(exports)
    assert rc == 1
    assert "no progress" in bus.log()
    bus.drain()  # once the cause is gone the event commits
    assert bus.sql("SELECT run_id FROM catalog.runs_d") == [("stuck",)]


def test_consumer_deleted_is_recreated(bus: Bus) -> None:
    with serving(bus) as (proc, _port):
        bus.publish([bus.event("before")])
        wait_for(lambda: read_manifest(bus.data / "exports").catalog_seq == 1, 30, "first")
        on_jetstream(bus.url, lambda js: js.delete_consumer("ARTIFACTS", "busd"))
        wait_for(lambda: "consumer is gone" in bus.log(), 30, "busd noticed")
        bus.publish([bus.event("after")])
        wait_for(lambda: read_manifest(bus.data / "exports").catalog_seq == 2, 60, "second")
        assert proc.poll() is None
    assert bus.sql("SELECT count(*) FROM catalog.events_f") == [(2,)]


def test_stream_deleted_exits_non_zero(bus: Bus) -> None:
    with serving(bus) as (proc, _port):
        on_jetstream(bus.url, lambda js: js.delete_stream("ARTIFACTS"))
        rc = proc.wait(60)
    assert rc == 1
    assert "consumer" in bus.log().lower()


def test_catalog_disk_full_then_freed(bus: Bus) -> None:
    """The data directory on a tiny tmpfs fills up mid-flow: nothing is acked that is not
    committed and exported, busd retries (or exits for systemd), and once space is freed every
    event commits exactly once."""
    small = bus.root / "small"
    with tmpfs(small, "12m"):
        data = small / "data"
        # max_deliver 3: one death counted for a message busd held would make it poison
        over = {"data_dir": str(data), "consumer": {"stall_s": 30, "max_deliver": 3}}
        ids = [f"d-{i}" for i in range(60)]
        path = str(bus.parquet("d/shared.parquet"))
        events = [bus.event(r, [{"name": "fills", "path": path}], event_id=r) for r in ids]
        cfg = str(bus.write_config(**over))
        proc = bus.spawn("serve", "--config", cfg)
        wait_for(lambda: "busd ready" in bus.log(), 30, "ready")
        bus.publish(events[:20])
        wait_for(lambda: read_manifest(data / "exports").catalog_seq == 20, 30, "20 committed")
        ballast = fill(small)
        bus.publish(events[20:])
        failed = wait_for(
            lambda: "failed" in bus.log() or proc.poll() is not None,
            60,
            "busd to notice the full disk",
        )
        assert failed
        time.sleep(2)
        # nothing past the last durable export was acked
        acked = ack_floor(bus)
        assert acked <= read_manifest(data / "exports").catalog_seq
        # a clean stop, and a start, while the disk is still full: what busd holds is no death
        # of its messages (its record of them cannot be rewritten: it is removed instead), and
        # the start does not fail on that record
        restarts = int(proc.poll() is not None)  # exited for systemd to restart it
        if not restarts:  # exit 1 when a batch could not commit before the stop
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) in (0, 1), bus.log()[-3000:]
        proc = bus.spawn("serve", "--config", cfg, log="full.log")
        wait_for(
            lambda: "busd ready" in bus.log("full.log") or proc.poll() is not None,
            60,
            "a start on a full disk",
        )
        assert "busd ready" in bus.log("full.log"), bus.log("full.log")[-3000:]
        ballast.unlink()
        wait_for(lambda: read_manifest(data / "exports").catalog_seq == 60, 90, "recovery")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        bus.overrides = over
        found = check_exactly_once(bus, ids)
        how = "exited and was restarted" if restarts else "retried, stopped and started"
        print(
            f"\ndisk full: 60 events, busd {how}, the ack floor stayed within the exports; {found}"
        )


def test_a_start_with_stale_exports_on_a_full_disk_serves_and_catches_up(bus: Bus) -> None:
    """busd dies after a commit, before its export; it starts again with the exports' disk
    full. It serves (the refresh is retried by the export loop, acks wait for it) instead of
    exiting 1 on the start's refresh, and once space is freed the exports hold every event
    and everything is acked. Before: "busd: export refresh failed", exit 1, at every start."""
    exports = bus.data / "exports"
    with tmpfs(exports, "4m"):
        ids = ["s-1", "s-2", "s-3"]
        bus.publish([bus.event(r, event_id=r) for r in ids])
        cfg = str(bus.write_config())
        killed = bus.spawn("serve", "--config", cfg, env={"BUSD_TEST_FAULT": "after_commit"})
        assert killed.wait(60) == -signal.SIGKILL, bus.log()
        committed = bus.sql("SELECT count(*) FROM catalog.events_f")[0][0]
        assert committed >= 1
        ballast = fill(exports)
        proc = bus.spawn("serve", "--config", cfg, log="full.log")
        wait_for(
            lambda: "export refresh failed" in bus.log("full.log") or proc.poll() is not None,
            60,
            "the start's refresh to fail",
        )
        wait_for(
            lambda: "busd ready" in bus.log("full.log") or proc.poll() is not None,
            60,
            "a start with the exports' disk full",
        )
        assert "busd ready" in bus.log("full.log"), bus.log("full.log")[-3000:]
        time.sleep(1)  # the export loop retries meanwhile
        assert proc.poll() is None, bus.log("full.log")[-3000:]
        assert ack_floor(bus) == 0  # nothing acked that the exports do not hold
        ballast.unlink()
        wait_for(lambda: ack_floor(bus) == 3, 60, "every event acked once exports are written")
        manifest = read_manifest(exports)
        assert manifest.catalog_seq == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log("full.log")[-3000:]
        assert sorted(bus.export("runs").column("run_id").to_pylist()) == ids
        print(f"\nstale exports on a full disk: {committed} committed before the kill, served")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (created), to fill up; unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a ballast file until the disk holding ``folder`` is full."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    return ballast
