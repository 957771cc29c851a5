"""A replay reads a file again only when it changed since its check was recorded (git's index
rule): ``busd rebuild`` and ``busd verify`` reuse the recorded facts of a file whose ``stat``
still gives the identity recorded (device, inode, size, times in ns), ``--recheck`` reads
every file, and a file rewritten, touched or replaced is found."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from support import Bus, sha256_file, wait_for

from busd import source
from busd.manifest import read_manifest
from busd.model import Artifact
from busd.replay import ReplayResult, rebuild, verify
from busd.validate import RACY_NS, CheckedArtifact, check_artifact, identity, unchanged

T = TypeVar("T")


def files_line(out: str) -> tuple[int, int]:
    """(checked, reused) from a rebuild's or verify's summary line."""
    found = re.search(r"files checked ([\d,]+), reused ([\d,]+)", out)
    assert found is not None, out
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def aged(paths: list[Path]) -> bool:
    """Every file last changed longer ago than the racy margin (else no identity is kept)."""
    newest = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in paths)
    return time.time_ns() - newest > RACY_NS


def stream_of_files(bus: Bus, n: int) -> list[Path]:
    paths = [bus.parquet(f"r{i}/fills.parquet", rows=i + 1) for i in range(n)]
    wait_for(lambda: aged(paths), 10, "files older than the racy margin")
    bus.publish(
        [
            bus.event(
                f"run-{i}",
                [{"name": "fills", "path": str(p), "sha256": sha256_file(p)}],
            )
            for i, p in enumerate(paths)
        ]
    )
    return paths


def replay(bus: Bus, command: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
    """``busd rebuild`` or ``busd verify`` in this process (the CLI's own line is checked
    once per command; starting it costs seconds)."""

    async def go() -> T:
        s = bus.settings()
        nc = await source.connect(s.nats, bus.url, reconnect=False)
        try:
            return await command(s, nc, **kwargs)
        finally:
            await nc.close()

    return asyncio.run(go())


def files_of(result: ReplayResult) -> tuple[int, int]:
    return result.files_checked, result.files_reused


def test_rebuild_and_verify_reuse_unchanged_files_and_find_changed_ones(bus: Bus) -> None:
    paths = stream_of_files(bus, 6)
    assert bus.drain().outcomes == {"committed": 6}
    assert bus.sql(
        "SELECT count(*) FROM catalog.artifact_log WHERE file_dev IS NOT NULL AND file_hashed"
    ) == [(6,)]
    cfg = str(bus.write_config())

    out = bus.cli("rebuild", "--config", cfg)
    assert out.returncode == 0, out.stderr
    assert files_line(out.stdout) == (0, 6)
    assert files_of(replay(bus, rebuild, recheck=True)) == (6, 0)
    report = replay(bus, verify)
    assert files_of(report.replay) == (0, 6)
    assert sum(report.counts.values()) == 0, report.differences

    # rewritten in place, same size, its modification time put back: only ctime tells
    before = paths[0].stat()
    with open(paths[0], "r+b") as f:
        f.seek(4)  # inside the first page; the footer stays as it was
        byte = f.read(1)
        f.seek(4)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(paths[0], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = paths[0].stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    # replaced by a copy of the same bytes (another inode), and touched
    copy = paths[1].with_suffix(".tmp")
    copy.write_bytes(paths[1].read_bytes())
    os.replace(copy, paths[1])
    os.utime(paths[2])

    bad = bus.cli("verify", "--config", cfg, "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    found = json.loads(bad.stdout)
    assert (found["files_checked"], found["files_reused"]) == (3, 3)
    assert found["differences"]["events_f"] == 2  # run-0's event: committed, now rejected

    wait_for(lambda: aged(paths), 10, "files older than the racy margin")
    assert files_of(replay(bus, rebuild)) == (3, 3)
    assert bus.sql("SELECT seq, reason FROM catalog.events_f WHERE outcome = 'rejected'") == [
        (1, "checksum_mismatch")
    ]
    # the rebuilt catalog recorded the new identities: nothing to read again but run-0's
    # file (its event was rejected, so no check of it is recorded)
    report = replay(bus, verify)
    assert files_of(report.replay) == (1, 5)
    assert sum(report.counts.values()) == 0, report.differences


def test_verify_while_serve_runs_reuses_the_checks_in_the_exports(bus: Bus) -> None:
    stream_of_files(bus, 4)
    cfg = str(bus.write_config())
    daemon = bus.spawn("serve", "--config", cfg)
    try:
        wait_for(lambda: read_manifest(bus.data / "exports").catalog_seq >= 4, 30, "exports")
        out = bus.cli("verify", "--config", cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "live exports" in out.stdout
        assert files_line(out.stdout) == (0, 4)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


# ---- the rule itself, on files of this test's own ----------------------------------------
def checked(path: Path, root: Path, **art: Any) -> tuple[Artifact, CheckedArtifact]:
    a = Artifact("fills", str(path), **art)
    return a, check_artifact(a, [root], "if_given")


def test_no_identity_for_a_file_changed_within_the_racy_margin() -> None:
    def st(mtime_ns: int, ctime_ns: int) -> os.stat_result:
        fields = {"st_dev": 1, "st_ino": 2, "st_mtime_ns": mtime_ns, "st_ctime_ns": ctime_ns}
        return cast(os.stat_result, SimpleNamespace(**fields))

    t = 1_800_000_000_123_456_789
    assert identity(st(t, t), t + RACY_NS // 2) == {}
    assert identity(st(t - RACY_NS, t), t + RACY_NS // 2) == {}  # ctime counts too
    assert identity(st(t, t), t + RACY_NS + 1)["ino"] == 2
    assert identity(st(t, t), t - 1) == {}  # times in the future prove nothing
    whole = 1_800_000_000 * 10**9  # a filesystem of whole seconds: a wider margin
    assert identity(st(whole, whole), whole + 10 * RACY_NS) == {}
    assert identity(st(whole, whole), whole + 30 * RACY_NS)["dev"] == 1


def test_a_recorded_check_stands_only_for_the_same_file_and_policy(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    path = root / "a.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    wait_for(lambda: aged([path]), 10, "older than the racy margin")
    art, rec = checked(path, root)
    assert rec.dev is not None and not rec.hashed
    again = unchanged(art, rec, [root], "if_given")
    assert again == rec
    assert unchanged(art, rec, [root], "always") is None  # no SHA-256 was computed then
    given = Artifact("fills", str(path), sha256=sha256_file(path))
    # "never": the event's SHA-256 is recorded as given, as a check would
    assert unchanged(given, rec, [root], "never") == msgspec.structs.replace(
        rec, sha256=given.sha256
    )
    assert unchanged(art, rec, [root / "elsewhere"], "if_given") is None  # outside the roots
    link = root / "link.parquet"
    link.symlink_to(path)
    assert unchanged(Artifact("fills", str(link)), rec, [root], "if_given") == rec
    os.chmod(path, 0o600)  # a change of mode changes ctime
    assert unchanged(art, rec, [root], "if_given") is None
