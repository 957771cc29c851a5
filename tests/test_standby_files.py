"""The standby follows the active's decisions, not the files as it finds them later (issue 11).

Found by the long form of ``test_chaos_mix.py`` (seed 1000): a committed artifact's file was
gone for a few seconds while the standby folded its event, so the standby rejected it as
``file_missing``; after a takeover, a run the active had acked was missing from the exports.
In the same run, a former active that came back as standby resumed after its highest
sequence and never folded the late event it had still been waiting for. And (seed 1002) a
new active whose start (a refresh of stale exports) outlasted the lease TTL lost its lease
before it renewed it once, again and again.

Real nats-server, real catalogs, real files and processes. In the first two tests the test
plays the active on the real durable consumer (pull, ack) and answers the request API as the
daemon does from its catalog; the standby is busd's own Follower.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pyarrow.parquet as pq
from faultfs import FaultFS
from support import Bus, committed_batch, on_jetstream, wait_for

from busd import model, source
from busd.catalog import Catalog
from busd.checker import Checker
from busd.ha.follower import Follower
from busd.replay import ReplayStore

OUTCOMES = "SELECT seq, outcome, reason FROM catalog.events_f ORDER BY seq"


async def _play_active(bus: Bus, nc: Any, outcomes: dict[int, dict[str, Any]]) -> None:
    """Ack everything as the active would, and answer ``poison`` and ``outcome``."""
    consumer = bus.settings().nats.consumer

    async def poison(msg: Any) -> None:
        await msg.respond(b"{}")

    async def outcome(msg: Any) -> None:
        seq = int(json.loads(msg.data)["seq"])
        await msg.respond(json.dumps(outcomes.get(seq, {"seq": seq, "state": "pending"})).encode())

    await nc.subscribe(model.subject(consumer, "poison"), cb=poison)
    await nc.subscribe(model.subject(consumer, "outcome"), cb=outcome)
    active = await nc.jetstream().pull_subscribe_bind("busd", "ARTIFACTS")
    for msg in await active.fetch(len(outcomes), timeout=5):
        await msg.ack_sync()


def _done(outcome: str, reason: str | None = None) -> dict[str, Any]:
    return {"state": "done", "outcome": outcome, "reason": reason}


def test_a_file_gone_for_a_while_is_no_verdict_the_active_did_not_reach(bus: Bus) -> None:
    vanishing = bus.event("vanishing")
    path = Path(vanishing["artifacts"][0]["path"])
    gone_for_good = bus.event("gone-for-good")
    bus.publish([vanishing, bus.event("fine"), gone_for_good])
    # the active committed the first two and, after its patience, rejected the third
    outcomes = {1: _done("committed"), 2: _done("committed"), 3: _done("rejected", "file_missing")}
    Path(gone_for_good["artifacts"][0]["path"]).unlink()
    aside = path.with_name("aside.parquet")
    path.rename(aside)  # gone while the standby folds (moved, deleted and put back, ...)
    s = bus.settings(verify={"file_wait_s": 30})

    async def go() -> tuple[list[tuple[Any, ...]], int, list[tuple[Any, ...]]]:
        nc = await nats.connect(bus.url)
        await _play_active(bus, nc, outcomes)
        catalog = Catalog(bus.root / "standby.duckdb")
        checker = Checker(s.roots, "if_given", processes=0, threads=1)
        follower = Follower(
            s,
            nc,
            ReplayStore(catalog, nc, s.nats.stream),
            lambda rows: asyncio.to_thread(catalog.commit, rows),
            checker,
        )
        await follower.start(0)
        try:
            for _ in range(10):  # the file is still gone: folded around, never rejected
                await follower.step()
            while_gone = catalog.con.execute(OUTCOMES).fetchall()
            through_while_gone = follower.through
            aside.rename(path)  # back
            deadline = time.monotonic() + 20
            while follower.through < 3 and time.monotonic() < deadline:
                await follower.step()
                await asyncio.sleep(0.05)
        finally:
            await follower.stop()
            await checker.close()
            await nc.close()
        rows = catalog.con.execute(OUTCOMES).fetchall()
        catalog.close()
        return while_gone, through_while_gone, rows

    while_gone, through_while_gone, rows = asyncio.run(asyncio.wait_for(go(), 60))
    assert (1, "rejected", "file_missing") not in while_gone, "rejected what the active committed"
    # the others did not wait for it; the one the active rejected was rejected at once
    assert while_gone == [(2, "committed", None), (3, "rejected", "file_missing")]
    assert through_while_gone == 0  # a standby restarting now resumes before it
    assert rows == [(1, "committed", None), (2, "committed", None), (3, "rejected", "file_missing")]


def test_a_standby_resumes_below_an_event_its_catalog_lacks(bus: Bus) -> None:
    """A former active comes back as standby with a catalog that lacks sequence 2 (it was
    waiting for its file) but holds 3: it must fold 2, not resume after 3."""
    ha = {"ha": {"enabled": True, "lease_ttl_s": 30}}
    bus.overrides = ha
    bus.publish([bus.event("r1"), bus.event("late"), bus.event("r3")])
    bus.data.mkdir(parents=True)
    catalog = Catalog(bus.data / "catalog.duckdb")
    catalog.commit(committed_batch(1, "r1"))
    catalog.commit(committed_batch(3, "r3"))
    catalog.close()
    s = bus.settings()

    async def go() -> str:
        nc = await nats.connect(bus.url)
        try:
            lease = await source.Bucket.open(nc, s.ha.bucket, s.ha.lease_ttl_s)
            await lease.create(s.nats.consumer, b"the test, active")
            await _play_active(bus, nc, {seq: _done("committed") for seq in (1, 2, 3)})
            proc = bus.spawn("serve", "--config", str(bus.write_config()))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if "late" in _exported_runs(bus):
                    break
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
        finally:
            await nc.close()
        return bus.log()

    log = asyncio.run(asyncio.wait_for(go(), 90))
    assert "standby: following" in log, log[-3000:]
    assert bus.sql(OUTCOMES) == [
        (1, "committed", None),
        (2, "committed", None),
        (3, "committed", None),
    ], log[-3000:]


def _exported_runs(bus: Bus) -> set[str]:
    path = bus.data / "exports" / "runs.parquet"
    try:
        return set(pq.read_table(path, columns=["run_id"]).column("run_id").to_pylist())
    except OSError:
        return set()


def test_the_lease_is_renewed_while_a_new_active_refreshes_stale_exports(
    bus: Bus, faultfs: FaultFS
) -> None:
    """Won at start, the lease must be renewed while the stale exports are refreshed before
    the first fetch (here one held up by a read that stalls, as a slow disk or a large
    ``data.*`` view would): before, nothing renewed it until the keeper started, and busd lost
    it (1 s TTL) and exited 1 at its first renewal."""
    (bus.artifacts / "slow.txt").write_text("read at each refresh, not when checked\n")
    faultfs.set("slow.txt", stall=True)
    # binding it (the check at start, LIMIT 0) reads no content: only the refresh stalls
    slow = f"SELECT length(content) AS n FROM read_text('{faultfs.path('slow.txt')}')"
    cfg = bus.write_config(
        ha={"enabled": True, "lease_ttl_s": 1},
        exports=[{"name": "slow", "sql": slow, "depends_on": ["fills"]}],
    )
    s = bus.settings()
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: faultfs.hits() or proc.poll() is not None, 60, "the refresh to stall")
        assert "busd ready" not in bus.log(), "the file was not read by the refresh at start"
        first = _lease_revision(bus, s.ha.bucket, s.nats.consumer)
        # a 1 s lease is renewed every third of a second: a few renewals while held up
        wait_for(
            lambda: _lease_revision(bus, s.ha.bucket, s.nats.consumer) >= first + 3,
            10,
            "the lease renewed during the refresh",
        )
        faultfs.clear()
        wait_for(lambda: "busd ready" in bus.log() or proc.poll() is not None, 60, "ready")
        bus.parquet("after-start/fills.parquet")
        path = str(faultfs.path("after-start/fills.parquet"))
        bus.publish([bus.event("after-start", [{"name": "fills", "path": path}])])
        wait_for(
            lambda: "after-start" in _exported_runs(bus) or proc.poll() is not None,
            60,
            "the event exported",
        )
        assert proc.poll() is None, bus.log()[-3000:]
        assert "lost the lease" not in bus.log()
    finally:
        faultfs.clear()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _lease_revision(bus: Bus, bucket: str, key: str) -> int:
    """The lease key's revision (0 when it is not there, e.g. expired)."""

    async def revision(js: Any) -> int:
        kv = await js.key_value(bucket)
        try:
            return int((await kv.get(key)).revision)
        except nats.js.errors.KeyNotFoundError:
            return 0

    return on_jetstream(bus.url, revision)
