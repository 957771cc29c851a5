"""Committed artifacts whose file later vanishes or is damaged (docs/reference/exports.md,
issue 11 items 4 and 10): never a stop of the bus. The file is left out of ``data."<name>"``,
every export keeps refreshing, and the file is reported by the gauge, ``busd status`` and
``busd verify``.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from support import Bus, on_jetstream, wait_for
from test_cli import free_port

from busd.manifest import read_manifest

LATEST = {
    "name": "latest_fills",
    "depends_on": ["fills"],
    "sql": "SELECT run_id, x FROM data.fills",
}


def damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "garbage":  # a file that is there but no Parquet any more
        path.write_bytes(b"not a parquet file, overwritten by a cleanup job\n" * 3)
    elif how == "truncated":  # the Parquet magic at the start, no footer
        path.write_bytes(path.read_bytes()[:20])
    elif how == "footer":  # the magic bytes right, what lies between them not
        data = path.read_bytes()
        path.write_bytes(data[:4] + b"\x07" * 200 + (30).to_bytes(4, "little") + b"PAR1")
    elif how == "directory":  # root reads everything: a folder is what it cannot read
        path.unlink()
        path.mkdir()
    else:
        raise AssertionError(how)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return str(r.read().decode())


def gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def acked_through(bus: Bus, seq: int) -> bool:
    async def state(js: Any) -> Any:
        return await js.consumer_info("ARTIFACTS", "busd")

    info = on_jetstream(bus.servers, state)
    return bool(info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0)


def exported_runs(bus: Bus, name: str) -> list[str]:
    """The runs an export holds rows of."""
    return sorted(
        set(pq.read_table(bus.data / "exports" / f"{name}.parquet").column("run_id").to_pylist())
    )


@pytest.mark.parametrize("how", ["deleted", "garbage", "truncated", "footer", "directory"])
def test_a_vanished_file_never_stops_the_bus(bus: Bus, how: str) -> None:
    port = free_port()
    cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"}, exports=[LATEST])
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        (a,) = bus.publish([bus.event("run-a")])
        wait_for(lambda: acked_through(bus, a), 60, "run A acked")
        assert exported_runs(bus, "latest_fills") == ["run-a"]
        (path_a,) = [r["path"] for r in bus.export("artifacts").to_pylist()]
        damage(Path(path_a), how)

        (b,) = bus.publish([bus.event("run-b")])
        wait_for(lambda: acked_through(bus, b), 60, f"run B acked after A's file was {how}")
        assert proc.poll() is None, bus.log()
        # every export refreshed; A's data is left out of data.fills, A stays in the catalog
        assert exported_runs(bus, "latest_fills") == ["run-b"]
        assert exported_runs(bus, "artifacts") == ["run-a", "run-b"]
        manifest = read_manifest(bus.data / "exports")
        assert manifest.exports["latest_fills"].catalog_seq == b
        assert (manifest.artifacts_missing.count, manifest.artifacts_missing.paths) == (1, [path_a])

        assert gauge(scrape(port), "busd_artifacts_missing") == 1.0
        out = bus.cli("status", "--config", str(cfg), "--json")
        assert out.returncode == 0, out.stderr
        missing = json.loads(out.stdout)["artifacts_missing"]
        assert (missing["count"], missing["paths"]) == (1, [path_a])
        text = bus.cli("status", "--config", str(cfg))
        assert path_a in text.stdout

        # the file comes back: included again at the next refresh, the gauge back to 0
        if how == "directory":
            Path(path_a).rmdir()
        bus.parquet("run-a/fills.parquet")
        (c,) = bus.publish([bus.event("run-c")])
        wait_for(lambda: acked_through(bus, c), 60, "run C acked")
        assert exported_runs(bus, "latest_fills") == ["run-a", "run-b", "run-c"]
        assert gauge(scrape(port), "busd_artifacts_missing") == 0.0
        assert proc.poll() is None, bus.log()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()
    assert '"export refresh failed' not in bus.log()
    assert bus.sql("SELECT outcome FROM catalog.events_f ORDER BY seq") == [("committed",)] * 3


@pytest.mark.parametrize("how", ["deleted", "footer"])
def test_a_file_gone_while_busd_is_down_does_not_block_its_start(bus: Bus, how: str) -> None:
    bus.publish([bus.event("run-a"), bus.event("run-b")])
    bus.drain()
    damage(bus.artifacts / "run-a" / "fills.parquet", how)
    # an export configured since: stale, refreshed at start before anything is acked
    cfg = bus.write_config(exports=[LATEST])
    bus.publish([bus.event("run-c")])
    proc = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert proc.wait(90) == 0, bus.log()
    assert exported_runs(bus, "latest_fills") == ["run-b", "run-c"]
    assert read_manifest(bus.data / "exports").artifacts_missing.count == 1


def test_the_sweep_counts_files_no_export_reads(bus: Bus) -> None:
    """A name no configured export reads is checked too (by stat), while busd is idle."""
    port = free_port()
    cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    pos = bus.parquet("run-a/positions.parquet")
    event = bus.event("run-a", [{"name": "positions", "path": str(pos)}])
    (a,) = bus.publish([event])
    proc = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: acked_through(bus, a), 60, "run A acked")
        wait_for(
            lambda: gauge(scrape(port), "busd_artifacts_missing") == 0.0, 30, "the first check"
        )
        pos.unlink()
        # the periodic check runs at most every minute: restart to make it run now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()
        proc = bus.spawn("serve", "--config", str(cfg))
        wait_for(
            lambda: gauge(scrape_or_empty(port), "busd_artifacts_missing") == 1.0,
            30,
            "the gauge counting the deleted file",
        )
        wait_for(
            lambda: read_manifest(bus.data / "exports").artifacts_missing.paths == [str(pos)],
            30,
            "the manifest naming it",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, bus.log()


def scrape_or_empty(port: int) -> str:
    try:
        return scrape(port)
    except OSError:
        return ""


def test_verify_reports_a_vanished_file_and_fails(bus: Bus) -> None:
    bus.publish([bus.event("run-a"), bus.event("run-b")])
    bus.drain(exports=[LATEST])
    cfg = bus.write_config(exports=[LATEST])
    ok = bus.cli("verify", "--config", str(cfg), timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (path_a,) = bus.sql("SELECT path FROM catalog.artifacts_f WHERE run_id = 'run-a'")[0]
    Path(path_a).unlink()
    out = bus.cli("verify", "--config", str(cfg), timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 committed artifacts whose file is gone or unreadable" in out.stdout
    assert f"fills of run-a: {path_a}: missing" in out.stdout
    as_json = bus.cli("verify", "--config", str(cfg), "--json", timeout=120)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["artifacts_missing"] == [
        {"name": "fills", "run_id": "run-a", "path": path_a, "problem": "missing"}
    ]


def test_artifact_data_with_its_own_run_id_keeps_busds(bus: Bus) -> None:
    """Issue 11 item 10: in data."<name>", run_id is busd's; the file's is file_run_id."""
    own = bus.parquet("r1/fills.parquet", x=[1, 2], run_id=["theirs", "theirs"])
    plain = bus.parquet("r2/fills.parquet", x=[3])
    joined = {
        "name": "joined",
        "depends_on": ["fills"],
        "sql": "SELECT f.run_id, f.file_run_id, f.x, r.status FROM data.fills f "
        "JOIN catalog.runs_d r USING (run_id) ORDER BY f.x",
    }
    star = {"name": "star", "depends_on": ["fills"], "sql": "SELECT * FROM data.fills"}
    bus.publish(
        [
            bus.event("r1", [{"name": "fills", "path": str(own)}]),
            bus.event("r2", [{"name": "fills", "path": str(plain)}]),
        ]
    )
    bus.drain(exports=[joined, star])
    assert bus.export("joined").to_pylist() == [
        {"run_id": "r1", "file_run_id": "theirs", "x": 1, "status": "succeeded"},
        {"run_id": "r1", "file_run_id": "theirs", "x": 2, "status": "succeeded"},
        {"run_id": "r2", "file_run_id": None, "x": 3, "status": "succeeded"},
    ]
    assert bus.export("star").column_names == ["x", "file_run_id", "run_id"]
