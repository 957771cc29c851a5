"""The standby never folds a message the active quarantined as poison (issue 11, item 8).

A real nats-server and real catalogs; the test plays the active on the real durable
consumer (pull, ack, term) and answers the request API's ``poison`` verb with the active's
decisions, as the daemon does from its catalog. The standby is busd's own Follower.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
from support import Bus

from busd import model
from busd.catalog import Catalog
from busd.checker import Checker
from busd.ha.follower import Follower
from busd.replay import ReplayStore


def test_the_standby_folds_nothing_the_active_quarantined(bus: Bus) -> None:
    bus.init()
    bus.publish([bus.event("fine"), bus.event("quarantined"), bus.event("later")])
    s = bus.settings()

    async def go() -> list[tuple[Any, ...]]:
        nc = await nats.connect(bus.url)
        poison: dict[str, str] = {}
        answering = True

        async def respond(msg: Any) -> None:  # the active's request API: its decisions
            if answering:
                await msg.respond(json.dumps(poison).encode())

        await nc.subscribe(model.subject(s.nats.consumer, "poison"), cb=respond)
        active = await nc.jetstream().pull_subscribe_bind("busd", "ARTIFACTS")
        fine, quarantined, later = await active.fetch(3, timeout=5)
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

        async def step_until(seq: int) -> None:
            deadline = time.monotonic() + 10
            while follower.through < seq and time.monotonic() < deadline:
                await follower.step()

        try:
            await fine.ack_sync()
            await step_until(1)  # the standby has polled the (empty) poison list just now
            # the active records its poison decision, then terminates the message
            poison["2"] = "delivered 9 times without an outcome"
            await quarantined.term()
            await nc.flush()
            await asyncio.sleep(0.2)  # the server moves the ack floor
            await step_until(2)
            # the active stops answering: a floor it cannot vouch for is not folded
            answering = False
            await later.ack_sync()
            for _ in range(5):
                await follower.step()
            not_folded = follower.through
        finally:
            await follower.stop()
            await checker.close()
            await nc.close()
        rows = catalog.con.execute(
            "SELECT seq, outcome, reason FROM catalog.events_f ORDER BY seq"
        ).fetchall()
        catalog.close()
        assert not_folded == 2, "the standby folded past a floor the active did not vouch for"
        return rows

    rows = asyncio.run(asyncio.wait_for(go(), 60))
    assert rows == [(1, "committed", None), (2, "rejected", "poison")]
