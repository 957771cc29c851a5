"""File checks in worker processes: the same decisions as in-process checks, a worker that
dies costs only the event that kills it, and batches that arrive during a commit join the next
transaction."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from pathlib import Path

import pytest
from support import Bus, sha256_file, wait_for

from busd.checker import Checker, Result
from busd.errors import FileNotYetThere, FileUnavailable, InvalidEvent
from busd.model import Artifact
from busd.validate import RACY_NS


def _artifact_cases(bus: Bus) -> list[list[Artifact]]:
    good = bus.parquet("ok/a.parquet", rows=5)
    other = bus.parquet("ok/b.parquet", rows=2, x=[1.5, 2.5], tag=["a", "b"])
    text = bus.artifacts / "ok" / "notes.parquet"
    text.write_text("not parquet at all")
    (bus.artifacts / "ok" / "link.parquet").symlink_to("/etc/hostname")
    big = bus.artifacts / "ok" / "big.parquet"  # over the read-whole-file limit
    big.write_bytes(b"PAR1" + os.urandom(3 << 20))
    # A file changed less than RACY_NS ago records no identity; both paths must see them old.
    written_ns = max(p.lstat().st_ctime_ns for p in (good, other, text, big))
    time.sleep(max(0.0, (written_ns + 2 * RACY_NS - time.time_ns()) / 1e9))
    return [
        [Artifact("a", str(good), rows=5, bytes=good.stat().st_size, sha256=sha256_file(good))],
        [Artifact("a", "ok/a.parquet"), Artifact("b", str(other), meta={"k": [1, 2]})],
        [Artifact("a", str(good), meta={"big": 10**30, "f": 1e308})],  # no msgpack integer
        [Artifact("a", str(good), rows=4)],
        [Artifact("a", str(good), bytes=1)],
        [Artifact("a", str(good), sha256="0" * 64)],
        [Artifact("a", str(text))],
        [Artifact("a", str(big))],
        [Artifact("a", "ok/link.parquet")],
        [Artifact("a", "../../../etc/hostname")],
        [Artifact("a", "ok/missing.parquet"), Artifact("b", str(good))],
    ]


def _shape(result: Result) -> object:
    if isinstance(result, InvalidEvent):
        return (type(result).__name__, result.reason.value, result.detail)
    return [
        tuple(a.__struct_fields__) + tuple(getattr(a, f) for f in a.__struct_fields__)
        for a in result
    ]


def _check_all(roots: list[Path], events: list[list[Artifact]], processes: int) -> list[Result]:
    async def go() -> list[Result]:
        checker = Checker(roots, "if_given", processes=processes, threads=2)
        await checker.start()
        try:
            return await checker.check(events * 8)  # several slices, one per worker
        finally:
            await checker.close()

    return asyncio.run(go())


def test_the_checker_learns_its_pace(bus: Bus) -> None:
    """What the group commit uses to stop queueing file checks behind one commit."""
    good = bus.parquet("pace/a.parquet")

    async def go() -> tuple[float, float, float]:
        checker = Checker([bus.artifacts], "always", processes=2, threads=2)
        before = checker.seconds_for(1000)
        try:
            await checker.check([[Artifact("a", str(good))]] * 200)
        finally:
            await checker.close()
        return before, checker.seconds_for(1000), checker.seconds_for(2000)

    before, one, two = asyncio.run(go())
    assert before == 0.0
    assert 0 < one < 5 and two == pytest.approx(2 * one)


def test_worker_processes_decide_as_threads_do(bus: Bus) -> None:
    events = _artifact_cases(bus)
    on_workers = _check_all([bus.artifacts], events, processes=2)
    on_threads = _check_all([bus.artifacts], events, processes=0)
    assert [_shape(r) for r in on_workers] == [_shape(r) for r in on_threads]
    first = on_workers[: len(events)]
    assert isinstance(first[0], list) and first[0][0].rows == 5
    assert isinstance(first[1], list) and first[1][1].meta == '{"k":[1,2]}'
    assert isinstance(first[2], list) and first[2][0].meta == f'{{"big":{10**30},"f":1e308}}'
    reasons = [r.reason.value for r in first[3:] if isinstance(r, InvalidEvent)]
    assert reasons == [
        "rows_mismatch",
        "size_mismatch",
        "checksum_mismatch",
        "not_parquet",
        "not_parquet",
        "path_outside_roots",
        "path_outside_roots",
        "file_missing",
    ]
    assert isinstance(first[-1], FileNotYetThere)


def test_a_worker_killed_by_a_file_costs_only_that_event(bus: Bus) -> None:
    ids = [f"r{i}" for i in range(60)]
    payloads = [bus.event(r) for r in ids]
    payloads[17] = bus.event(
        "killer", [{"name": "fills", "path": str(bus.parquet("crashme/fills.parquet"))}]
    )
    bus.publish(payloads)
    cfg = bus.write_config()
    proc = bus.spawn(
        "serve", "--config", str(cfg), "--drain", env={"BUSD_TEST_FAULT": "in_checker:crashme"}
    )
    assert proc.wait(120) == 0, bus.log()
    rows = bus.sql(
        "SELECT e.run_id, e.outcome, r.reason, r.detail FROM catalog.events_f e "
        "LEFT JOIN catalog.rejections_f r USING (seq) ORDER BY e.seq"
    )
    assert len(rows) == 60
    killer = [r for r in rows if r[0] == "killer"]
    assert [(r[1], r[2]) for r in killer] == [("rejected", "not_parquet")]
    assert "killed the checking process" in killer[0][3]
    assert "a file-check worker died" in bus.log()
    assert sorted(r[0] for r in rows if r[1] == "committed") == sorted(
        r for i, r in enumerate(ids) if i != 17
    )


def test_batches_arriving_during_a_commit_join_the_next_transaction(bus: Bus) -> None:
    total = 3000
    bus.publish([bus.event(f"g{i}") for i in range(total)])
    stats = bus.drain(consumer={"batch_max": 100, "commit_max": 1000})
    assert stats.outcomes["committed"] == total
    # 30 fetches of 100; grouped, they need fewer transactions (each at most about 1,100)
    assert stats.batches < total // 100
    assert bus.sql("SELECT count(*), count(DISTINCT run_id) FROM catalog.artifacts_f") == [
        (total, total)
    ]
    assert bus.export("artifacts").num_rows == total


def test_workers_do_not_outlive_a_killed_busd(bus: Bus) -> None:
    cfg = bus.write_config()
    proc = bus.spawn("serve", "--config", str(cfg))
    wait_for(lambda: "busd ready" in bus.log(), 30, "busd ready")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    workers = [
        int(c) for c in children if b"busd.checker" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]
    assert len(workers) == 2
    proc.kill()
    proc.wait(10)
    # their stdin closes with busd: each sees EOF and exits (they ignore SIGTERM and SIGINT)
    wait_for(lambda: not any(_alive(w) for w in workers), 10, "the workers to exit")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; init reaps it


def test_no_file_descriptor_for_a_new_worker_is_the_machines_fault(bus: Bus) -> None:
    """A worker killed from outside, and busd at its open-file limit when it starts another
    (EMFILE on the pipes): the event is checked again later, nothing escapes the checker."""
    good = bus.parquet("ok/a.parquet")
    event = [Artifact("a", str(good))]

    async def go() -> tuple[Result, Result]:
        checker = Checker([bus.artifacts], "if_given", processes=1, threads=1, timeout_s=10)
        await checker.start()
        try:
            await checker.ready()
            me = os.getpid()
            for child in Path(f"/proc/{me}/task/{me}/children").read_text().split():
                os.kill(int(child), signal.SIGKILL)  # the OOM killer
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
            try:
                [starved] = await checker.check([event])
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            [fine] = await checker.check([event])
            return starved, fine
        finally:
            await checker.close()

    starved, fine = asyncio.run(go())
    assert isinstance(starved, FileUnavailable), starved
    assert "Too many open files" in starved.detail
    assert isinstance(fine, list) and fine[0].rows == 3
