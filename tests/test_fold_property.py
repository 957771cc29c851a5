"""The fold is deterministic: any order of (re)deliveries gives the catalog a replay gives.

Pure logic on a real DuckDB file (no NATS needed: deliveries are built in memory), driven by
hypothesis: it shuffles, repeats and re-batches the deliveries of a small generated stream,
including duplicates and event_id conflicts, and compares every table with the in-order fold.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd import config
from busd.catalog import Catalog
from busd.catalog.schema import COMPARED
from busd.fold import Folder
from busd.model import Delivery, Sibling

ROOT = Path(tempfile.mkdtemp(prefix="busd-fold-"))  # made at import (hypothesis needs it)
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)  # ...and left in /tmp before
FILES = {}
for _name, _rows in (("a", 1), ("b", 2), ("c", 3)):
    FILES[_name] = ROOT / f"{_name}.parquet"
    pq.write_table(pa.table({"x": list(range(_rows))}), FILES[_name])

SETTINGS = config.load(
    env={}, overrides={"data_dir": str(ROOT / "unused"), "artifact_roots": [str(ROOT)]}
)

message = st.one_of(
    st.builds(
        lambda eid, run, names, files, status, bad: {
            **({"event_id": eid} if eid else {}),
            "schema_version": 1,
            "run": {"run_id": run, "kind": "sim", "status": status},
            "artifacts": [
                {"name": n, "path": str(FILES[f]), **({"rows": 99} if bad else {})}
                for n, f in zip(names, files, strict=False)
            ],
        },
        st.sampled_from([None, "e1", "e2", "e3"]),
        st.sampled_from(["r1", "r2"]),
        st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2, unique=True),
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=2),
        st.sampled_from(["ok", "failed"]),
        st.booleans(),
    ),
    st.just(b"not json"),
)


def delivery(seq: int, payload: Any, delivered: int = 1) -> Delivery:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Delivery(
        seq=seq,
        subject="artifacts.lab",
        data=data,
        headers=None,
        reply=f"$JS.ACK.S.c.{delivered}.{seq}.{seq}.{seq * 1000}.0",
        delivered=delivered,
        published_ns=1_700_000_000_000_000_000 + seq * 1000,
    )


class MemoryStore:
    """The fold's store over a catalog and an in-memory stream."""

    def __init__(self, catalog: Catalog, stream: list[Any]) -> None:
        self.catalog = catalog
        self.stream = stream

    async def lookup(self, seqs: Any, event_ids: Any) -> Any:
        return self.catalog.lookup(seqs, event_ids)

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]:
        return self.catalog.siblings(event_id, after_seq)

    async def payload(self, seq: int) -> bytes:
        p = self.stream[seq - 1]
        return p if isinstance(p, bytes) else json.dumps(p).encode()


async def fold_into(
    catalog: Catalog, stream: list[Any], batches: list[list[int]], *, derive: bool = True
) -> None:
    """``derive`` False: as a replay does, logs only, artifacts_f and runs_d at the end."""
    folder = Folder(SETTINGS, MemoryStore(catalog, stream), replay=True)
    for batch in batches:
        folded = await folder.fold([delivery(i + 1, stream[i]) for i in batch])
        catalog.commit(folded.rows, derive=derive)
    if not derive:
        catalog.derive_all()


def snapshot(catalog: Catalog) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table, wall_clock in COMPARED.items():
        exclude = f" EXCLUDE ({', '.join(wall_clock)})" if wall_clock else ""
        out[table] = catalog.con.execute(
            f"SELECT *{exclude} FROM catalog.{table} ORDER BY ALL"
        ).fetchall()
    return out


@st.composite
def stream_and_schedule(draw: st.DrawFn) -> tuple[list[Any], list[list[int]]]:
    stream = draw(st.lists(message, min_size=1, max_size=10))
    n = len(stream)
    extra = draw(st.lists(st.integers(0, n - 1), max_size=n))  # redeliveries
    order = draw(st.permutations(list(range(n)) + extra))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
    batches, last = [], 0
    for cut in [*cuts, len(order)]:
        if cut > last:
            batches.append(list(order[last:cut]))
            last = cut
    return stream, batches


# 30 examples by default (each folds a random stream twice into real DuckDB catalogs, ~1 s);
# --long loads the profile of 2,000
EXAMPLES = 2000 if settings.default.max_examples >= 2000 else 30


@pytest.mark.timeout(3600)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=stream_and_schedule())
def test_any_delivery_order_gives_the_replayed_catalog(
    tmp_path_factory: Any, case: tuple[list[Any], list[list[int]]]
) -> None:
    stream, batches = case
    folder_dir = tmp_path_factory.mktemp("fold")
    live = Catalog(folder_dir / "live.duckdb")
    replay = Catalog(folder_dir / "replay.duckdb")
    derived = Catalog(folder_dir / "derived.duckdb")
    try:
        asyncio.run(fold_into(live, stream, batches))
        asyncio.run(fold_into(replay, stream, [list(range(len(stream)))]))
        in_order = [[i] for i in range(len(stream))]  # a replay's batches, derived at the end
        asyncio.run(fold_into(derived, stream, in_order, derive=False))
        got, want, at_end = snapshot(live), snapshot(replay), snapshot(derived)
        for table in COMPARED:
            assert got[table] == want[table], (table, stream, batches)
            assert at_end[table] == want[table], (table, stream)
        outcomes = live.con.execute("SELECT count(*) FROM catalog.events_f").fetchone()
        assert outcomes == (len(stream),)
    finally:
        live.close()
        replay.close()
        derived.close()


def test_a_fold_of_large_events_gives_the_event_loop_turns(tmp_path: Path) -> None:
    """Decoding events and building their rows ran on the event loop in one go: 2,000
    events of 1,000 artifacts each kept the watchdog's pings 4.35 s apart in a reviewer's
    run (1.67 s for 1,000 here). The fold now yields every 2,000 artifacts: counted by a
    task that runs whenever it gets a turn, in decoding and in deciding alike."""
    art = [{"name": f"a{k:03d}", "path": str(FILES["a"])} for k in range(1000)]
    run = {"kind": "sim", "status": "ok"}
    stream: list[Any] = [
        {"schema_version": 1, "run": {"run_id": f"r{i}", **run}, "artifacts": art}
        for i in range(10)
    ]

    async def go() -> tuple[int, int, int]:
        turns = 0

        async def count() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count())
        await asyncio.sleep(0)
        catalog = Catalog(tmp_path / "catalog.duckdb")
        try:
            folder = Folder(SETTINGS, MemoryStore(catalog, stream), replay=True)
            before = turns
            prepared = await folder.prepare([delivery(i + 1, p) for i, p in enumerate(stream)])
            decoding = turns - before
            await prepared.checks  # done: the decision below awaits nothing else
            before = turns
            folded = await folder.finish(prepared)
            deciding = turns - before
        finally:
            counter.cancel()
            catalog.close()
        return decoding, deciding, len(folded.rows.artifacts)

    decoding, deciding, artifacts = asyncio.run(go())
    assert artifacts == 10_000
    assert decoding >= 4 and deciding >= 4  # 10,000 artifacts: a turn every 2,000
