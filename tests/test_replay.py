"""The stream as the source of truth: rebuild, verify, configured exports, rejections, outbox."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.request
from typing import Any

from support import Bus, ack_floor, wait_for
from test_cli import free_port

from busd.catalog.schema import COMPARED
from busd.manifest import read_manifest

TABLES = {t: f" EXCLUDE ({', '.join(c)})" if c else "" for t, c in COMPARED.items()}


def snapshot(bus: Bus) -> dict[str, list[tuple[Any, ...]]]:
    return {t: bus.sql(f"SELECT *{x} FROM catalog.{t} ORDER BY ALL") for t, x in TABLES.items()}


def mixed_stream(bus: Bus, n: int = 60) -> None:
    payloads: list[Any] = []
    for i in range(n):
        payloads.append(
            bus.event(
                f"run-{i % 20}",
                [
                    {
                        "name": "fills",
                        "path": str(bus.parquet(f"r{i}/fills.parquet", rows=i % 5 + 1)),
                    }
                ],
                event_id=f"ev-{i}",
            )
        )
    payloads += [
        b"junk",
        bus.event("x", [{"name": "f", "path": "missing.parquet"}]),
        payloads[3],
        {**payloads[4], "run": {"run_id": "other", "kind": "k"}},
    ]
    bus.publish(payloads)


def test_rebuild_gives_the_same_catalog_and_refuses_while_serving(bus: Bus) -> None:
    mixed_stream(bus)
    bus.drain()
    before = snapshot(bus)
    assert len(before["events_f"]) == 64
    cfg = bus.write_config()
    out = bus.cli("rebuild", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "64 events" in out.stdout
    after = snapshot(bus)
    for table in before:
        assert after[table] == before[table], (table, set(after[table]) ^ set(before[table]))
    assert bus.export("artifacts").num_rows == len(before["artifacts_f"])
    # while serve runs, rebuild refuses with a clear line
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: "busd ready" in bus.log(), 30, "serve ready")
        refused = bus.cli("rebuild", "--config", str(cfg))
        assert refused.returncode == 1
        assert "refusing to rebuild" in refused.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_verify_passes_after_crashes_and_fails_on_tampering(bus: Bus) -> None:
    mixed_stream(bus)
    cfg = bus.write_config(consumer={"batch_max": 7, "commit_max": 7})  # many transactions
    for point, skip in (("after_commit", 2), ("before_ack", 1), ("during_export", 3)):
        proc = bus.spawn(
            "serve",
            "--config",
            str(cfg),
            env={"BUSD_TEST_FAULT": point, "BUSD_TEST_FAULT_SKIP": str(skip)},
        )
        assert proc.wait(60) == -signal.SIGKILL
    bus.drain(consumer={"batch_max": 7, "commit_max": 7})
    out = bus.cli("verify", "--config", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "events_f 0 differences" in out.stdout
    # tamper with the live catalog: verify must notice
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(f"ATTACH '{bus.data / 'catalog.duckdb'}' AS busd")
    con.execute("UPDATE busd.catalog.artifacts_f SET rows = rows + 1 WHERE run_id = 'run-1'")
    con.close()
    bad = bus.cli("verify", "--config", str(cfg), "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["differences"]["artifacts_f"] == 2


def test_verify_while_serve_runs_compares_the_exports(bus: Bus) -> None:
    mixed_stream(bus, 20)
    cfg = bus.write_config()
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: read_manifest(bus.data / "exports").catalog_seq >= 24, 30, "exports")
        out = bus.cli("verify", "--config", str(cfg))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "live exports" in out.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_configured_export_over_data_refreshes_only_when_its_inputs_change(bus: Bus) -> None:
    bus.overrides = {
        "exports": [
            {
                "name": "latest_fills",
                "depends_on": ["fills"],
                "sql": "SELECT f.run_id, sum(f.x) AS total FROM data.fills f JOIN catalog.runs_d r "
                "USING (run_id) WHERE r.status = 'succeeded' GROUP BY f.run_id ORDER BY 1",
            }
        ]
    }
    bus.publish([bus.event("a"), bus.event("b")])
    bus.drain()
    totals = bus.export("latest_fills").to_pylist()
    assert totals == [{"run_id": "a", "total": 3}, {"run_id": "b", "total": 3}]
    first = read_manifest(bus.data / "exports").exports["latest_fills"]
    bus.publish([bus.event("c", [{"name": "positions", "path": str(bus.parquet("p.parquet"))}])])
    bus.drain()
    manifest = read_manifest(bus.data / "exports")
    assert manifest.exports["latest_fills"].refreshed_at == first.refreshed_at
    assert manifest.exports["artifacts"].catalog_seq == 3
    bus.publish([bus.event("d", [{"name": "fills", "path": str(bus.parquet("d.parquet", 5))}])])
    bus.drain()
    assert bus.export("latest_fills").num_rows == 3
    assert read_manifest(bus.data / "exports").exports["latest_fills"].catalog_seq == 4


def test_failing_export_keeps_acks_waiting_and_recovers(bus: Bus) -> None:
    port = free_port()
    cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    daemon = bus.spawn("serve", "--config", str(cfg))
    exports = bus.data / "exports"
    try:
        wait_for(lambda: (exports / "_manifest.json").exists(), 30, "first export")
        shutil.move(exports, bus.data / "exports.kept")
        exports.write_text("not a folder")  # every refresh now fails
        bus.publish([bus.event("late")])

        def failures() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith('busd_export_failures_total{export="artifacts"}'):
                        return float(line.split()[-1])
            return 0.0

        wait_for(lambda: failures() >= 2, 30, "export failures counted")
        exports.unlink()
        shutil.move(bus.data / "exports.kept", exports)
        wait_for(lambda: read_manifest(exports).catalog_seq == 1, 60, "recovery")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert bus.export("artifacts").column("run_id").to_pylist() == ["late"]
    assert bus.sql("SELECT count(*) FROM catalog.events_f") == [(1,)]


def test_rejections_list_show_retry(bus: Bus) -> None:
    missing = bus.artifacts / "later.parquet"
    bus.publish([bus.event("r", [{"name": "f", "path": str(missing)}]), b"junk"])
    bus.drain()
    cfg = bus.write_config()
    listed = json.loads(bus.cli("rejections", "list", "--config", str(cfg), "--json").stdout)
    assert [(r["seq"], r["reason"]) for r in listed] == [(1, "file_missing"), (2, "malformed")]
    only = json.loads(
        bus.cli(
            "rejections", "list", "--config", str(cfg), "--json", "--reason", "malformed"
        ).stdout
    )
    assert [r["seq"] for r in only] == [2]
    shown = json.loads(bus.cli("rejections", "show", "1", "--config", str(cfg)).stdout)
    assert json.loads(shown["payload"])["run"]["run_id"] == "r"
    assert "does not exist" in shown["detail"]
    bus.parquet("later.parquet")  # the producer fixes the file, then an operator retries
    out = bus.cli("rejections", "retry", "1", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["seq"] == 3
    assert bus.drain().outcomes == {"committed": 1}
    assert bus.sql("SELECT run_id FROM catalog.runs_d") == [("r",)]
    # and while serve runs, the same commands go through the daemon
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: "busd ready" in bus.log(), 30, "serve ready")
        listed = json.loads(bus.cli("rejections", "list", "--config", str(cfg), "--json").stdout)
        assert len(listed) == 2
        forced = bus.cli("export", "--config", str(cfg), "runs")
        assert json.loads(forced.stdout) == {"refreshed": ["runs"]}
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_outbox_survives_an_outage_without_loss_or_doubles(bus: Bus) -> None:
    cfg = bus.write_config()
    outbox = bus.root / "outbox"
    path = bus.parquet("o/fills.parquet")
    bus.server.stop()  # NATS is down
    for i in range(3):
        out = bus.cli(
            "submit",
            "--config",
            str(cfg),
            "--run-id",
            f"o{i}",
            "--kind",
            "k",
            "--outbox",
            str(outbox),
            "--timeout",
            "5",
            f"fills={path}",
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["state"] == "outbox"
    assert len(list(outbox.glob("*.json"))) == 3
    bus.server.start()  # same port, same store
    # a flush that is interrupted after sending is simulated by copying a file back
    kept = sorted(outbox.glob("*.json"))[0].read_bytes()
    out = bus.cli("outbox", "flush", str(outbox), "--config", str(cfg))
    assert json.loads(out.stdout)["sent"] == 3
    (outbox / "00000000000000000001-again.json").write_bytes(kept)
    out = bus.cli("outbox", "flush", str(outbox), "--config", str(cfg))
    assert json.loads(out.stdout)["sent"] == 1
    assert not list(outbox.glob("*.json"))
    stats = bus.drain()
    assert stats.outcomes == {"committed": 3}  # the resent copy was dropped by JetStream
    assert sorted(r for (r,) in bus.sql("SELECT run_id FROM catalog.runs_d")) == ["o0", "o1", "o2"]


def test_events_of_a_megabyte_replay_and_drain_without_losing_the_connection(bus: Bus) -> None:
    """A pull request asks for a whole batch (a replay's is 5,000 events): of 1 MB events,
    150 MB, past the 64 MiB nats-server lets a client's outbound buffer hold, and the server
    cut busd off as a slow consumer: `busd rebuild` exited 1 ("the NATS connection closed
    during replay") and `serve` reconnected over and over. A request now carries max_bytes."""
    n, size = 150, 1_000_000
    cfg = bus.write_config()
    payloads: list[Any] = [i.to_bytes(4) + b"x" * size for i in range(n)]  # `malformed`
    last = bus.publish([*payloads, bus.event("run-after")])[-1]
    rebuilt = bus.cli("rebuild", "--config", str(cfg), timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert bus.sql("SELECT count(*) FROM catalog.rejections_f") == [(n,)]
    proc = bus.spawn("serve", "--config", str(cfg), "--drain")
    assert proc.wait(120) == 0
    assert ack_floor(bus) == last
    assert "slow consumer" not in bus.log().lower()
    assert bus.log().count('"nats disconnected"') <= 1  # its own close at the end
