"""The command line as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from support import Bus, wait_for

from busd import events

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_schema_file_has_not_drifted() -> None:
    on_disk = (ROOT / "schemas" / "artifact-event.v1.schema.json").read_text()
    regenerate = "busd schema > schemas/artifact-event.v1.schema.json"
    assert on_disk == events.json_schema_text(), f"the schema drifted; run: {regenerate}"


def test_schema_command_prints_it(bus: Bus) -> None:
    out = bus.cli("schema")
    assert out.returncode == 0
    assert json.loads(out.stdout)["title"].startswith("busd artifact event")


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[consumer]\nbatch_max = 'many'\n", {}, "consumer.batch_max"),
        ("[consumer]\nbatchmax = 5\n", {}, "batchmax"),
        ("bogus = 1\n", {}, "bogus"),
        ("[verify]\nchecksum = 'sometimes'\n", {}, "verify.checksum"),
        ("[metrics]\nlisten = 'nowhere'\n", {}, "metrics.listen"),
        ("[nats]\nurl = 'http://x'\n", {}, "nats.url"),
        ("not toml at all = = =\n", {}, "TOML"),
        ("", {"BUSD_CONSUMER_BATCH_MAX": "lots"}, "consumer.batch_max"),
        ("", {"BUSD_NATS_NOPE": "1"}, "BUSD_NATS_NOPE"),
        ("[[exports]]\nname = 'x'\nsql = 'SELEC nonsense'\n", {}, "exports.x.sql"),
        ("[consumer]\ncommit_max = 10\n", {}, "consumer.commit_max"),
        ("[verify]\nprocesses = -1\n", {}, "verify.processes"),
        ("export_partition_seqs = 5\n", {}, "export_partition_seqs"),
        ("", {"BUSD_EXPORT_PARTITION_SEQS": "7"}, "export_partition_seqs"),
    ],
)
def test_bad_config_exits_2_naming_the_key(
    bus: Bus, toml: str, env: dict[str, str], needle: str
) -> None:
    path = bus.root / "bad.toml"
    path.write_text(f'data_dir = "{bus.data}"\n' + toml)
    out = bus.cli(
        "serve",
        "--config",
        str(path),
        env={
            **env,
            **({} if "[nats]" in toml else {"BUSD_NATS_URL": bus.url}),
            **({} if "[metrics]" in toml else {"BUSD_METRICS_LISTEN": ""}),
        },
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr


def test_missing_config_file_and_bad_arguments_exit_2(bus: Bus) -> None:
    out = bus.cli("serve", "--config", "nowhere.toml")
    assert out.returncode == 2 and "nowhere.toml" in out.stderr
    out = bus.cli("submit", "--run-id", "r", "--kind", "k", "not-a-pair")
    assert out.returncode == 2 and "NAME=PATH" in out.stderr
    out = bus.cli("serve", "--no-such-flag")
    assert out.returncode == 2


def test_submit_wait_commits_and_rejected_exits_3(bus: Bus) -> None:
    cfg = bus.write_config()
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        path = bus.parquet("job/fills.parquet", rows=11)
        out = bus.cli(
            "submit",
            "--config",
            str(cfg),
            "--run-id",
            "job-1",
            "--kind",
            "backtest",
            "--producer",
            "lab.backtest",
            "--wait",
            f"fills={path}",
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["outcome"] == "committed"
        assert result["event_id"].startswith("job-1:")
        rows = bus.cli(
            "query", "--config", str(cfg), "--json", "SELECT run_id, name, rows FROM artifacts"
        )
        assert json.loads(rows.stdout) == [{"run_id": "job-1", "name": "fills", "rows": 11}]
        # the same submission again is a duplicate, still exit 0
        again = bus.cli(
            "submit",
            "--config",
            str(cfg),
            "--run-id",
            "job-1",
            "--kind",
            "backtest",
            "--producer",
            "lab.backtest",
            "--wait",
            "--event-id",
            "job-1:again",
            f"fills={path}",
        )
        assert again.returncode == 0
        # a file outside the roots is rejected: exit 3 with the reason
        outside = bus.root / "outside.parquet"
        outside.write_bytes(path.read_bytes())
        bad = bus.cli(
            "submit",
            "--config",
            str(cfg),
            "--run-id",
            "job-2",
            "--kind",
            "k",
            "--wait",
            f"fills={outside}",
        )
        assert bad.returncode == 3, bad.stderr
        assert "path_outside_roots" in bad.stderr
        csv_out = bus.cli("query", "--config", str(cfg), "--csv", "SELECT count(*) AS n FROM runs")
        assert csv_out.stdout.splitlines() == ["n", "1"]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_query_is_read_only_and_reports_sql_errors(bus: Bus) -> None:
    bus.publish([bus.event("r")])
    bus.drain()
    cfg = bus.write_config()
    out = bus.cli("query", "--config", str(cfg), "SELECT nonsense FROM runs")
    assert out.returncode == 2 and "nonsense" in out.stderr
    out = bus.cli("query", "--config", str(cfg), f"COPY runs TO '{bus.root / 'leak.csv'}'")
    assert out.returncode == 2
    assert not (bus.root / "leak.csv").exists()


def test_serve_exposes_every_metric_and_health(bus: Bus) -> None:
    port = free_port()
    cfg = bus.write_config(
        metrics={"listen": f"127.0.0.1:{port}"},
        exports=[
            {"name": "latest_fills", "depends_on": ["fills"], "sql": "SELECT * FROM data.fills"}
        ],
    )
    daemon = bus.spawn("serve", "--config", str(cfg))
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 30, "readyz")
        with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
            assert r.status == 200
        bus.publish([bus.event("m1"), b"bad"])

        def scraped() -> str | None:
            with urllib.request.urlopen(base + "/metrics", timeout=1) as r:
                text = r.read().decode()
            return (
                text
                if 'busd_events_total{outcome="committed"} 1.0' in text
                and 'busd_events_total{outcome="rejected"} 1.0' in text
                and "busd_event_latency_seconds_count 1.0" in text
                else None
            )

        text = wait_for(scraped, 30, "metrics after two events")
        for name in (
            "busd_consumer_pending_messages",
            "busd_consumer_ack_pending_messages",
            'busd_rejections_total{reason="malformed"} 1.0',
            "busd_artifacts_committed_total",
            "busd_batch_size_bucket",
            "busd_commit_duration_seconds_bucket",
            'busd_export_duration_seconds_bucket{export="latest_fills"',
            'busd_export_last_success_timestamp_seconds{export="artifacts"}',
            'busd_export_failures_total{export="runs"} 0.0',
            "busd_event_latency_seconds_bucket",
            "busd_catalog_seq 2.0",
            "busd_nats_connected 1.0",
            "busd_build_info{version=",
        ):
            assert name in text, name
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_second_serve_on_the_same_catalog_fails_fast(bus: Bus) -> None:
    cfg = bus.write_config()
    first = bus.spawn("serve", "--config", str(cfg))
    try:
        wait_for(lambda: (bus.data / "exports" / "_manifest.json").exists(), 30, "first serve")
        second = bus.cli("serve", "--config", str(cfg), timeout=30)
        assert second.returncode == 1
        assert "in use" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0


def test_validate_offline(bus: Bus) -> None:
    good = bus.root / "good.json"
    good.write_text(json.dumps(bus.event("r")))
    bad = bus.root / "bad.json"
    bad.write_text(json.dumps({**bus.event("r2"), "extra": 1}))
    cfg = bus.write_config()
    out = bus.cli("validate", "--config", str(cfg), str(good), str(bad))
    assert out.returncode == 3
    assert f"{good}: ok" in out.stdout
    assert "rejected: schema" in out.stdout and "extra" in out.stdout
    assert bus.cli("validate", "--config", str(cfg), str(good)).returncode == 0


def test_init_is_idempotent(bus: Bus) -> None:
    cfg = bus.write_config()
    for _ in range(2):
        out = bus.cli("init", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        assert "ok" in out.stdout


def test_status_json(bus: Bus) -> None:
    bus.publish([bus.event("r")])
    bus.drain()
    out = bus.cli("status", "--config", str(bus.write_config()), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["stream"]["messages"] == 1
    assert status["consumer"]["pending"] == 0
    assert status["exports"]["artifacts"]["catalog_seq"] == 1
