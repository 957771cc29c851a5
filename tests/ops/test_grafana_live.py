"""Every dashboard panel and every alert, evaluated by a real Prometheus scraping a real busd.

A `busd serve` (with its embedded nats-server) gets a few committed events and one rejected
event; a `prometheus` from Debian's package scrapes it every second and loads the alert rules.
Then each panel's query must return a finite number, each alert rule must evaluate without
error, and the alerts must say what is true of this busd: it is up, connected and fresh, and it
rejected one event with reason `schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opsfiles import RULES, dashboard_queries, free_port, metric_names_in

BUSD = [sys.executable, "-m", "busd"]
DEADLINE_S = 60.0
ALERTS = (
    "BusdDown",
    "BusdLagGrowing",
    "BusdRejections",
    "BusdExportStale",
    "BusdExportFailures",
    "BusdNatsDisconnected",
    "BusdArtifactsMissing",
    "BusdLagTooOld",
)

pytestmark = pytest.mark.timeout(300)


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except OSError:
        return 0, b""


def wait_until(what: str, check: Callable[[], bool], proc: Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.popen.poll() is not None:
            pytest.fail(
                f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                f"{what}:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{proc.log_tail()}")
        time.sleep(0.2)


@dataclass
class Process:
    """A child process in its own session, with its output in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], log: Path, **kwargs: Any) -> Process:
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
            )
        return cls(name, popen, log)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 40.0) -> None:
        """SIGTERM, then SIGKILL to its whole process group (an embedded nats-server too)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Children left behind by a killed parent share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


@dataclass
class Busd:
    root: Path
    config: Path
    nats_url: str
    metrics_address: str
    proc: Process

    def submit(self, run_id: str, **files: Path) -> None:
        cmd = [
            *BUSD,
            "submit",
            "--config",
            str(self.config),
            "--run-id",
            run_id,
            "--kind",
            "simulation",
            "--producer",
            "lab.simulation",
            "--wait",
            "--timeout",
            "60",
            *(f"{name}={path}" for name, path in files.items()),
        ]
        done = subprocess.run(
            cmd, cwd=self.root, capture_output=True, text=True, timeout=90, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr + self.proc.log_tail()

    def publish_raw(self, subject: str, payload: bytes) -> None:
        async def go() -> None:
            nc = await nats.connect(self.nats_url, allow_reconnect=False)
            try:
                await nc.jetstream().publish(subject, payload)
            finally:
                await nc.close()

        asyncio.run(go())


@pytest.fixture
def busd(tmp_path: Path) -> Iterator[Busd]:
    root = tmp_path / "busd"
    artifacts = root / "artifacts"
    artifacts.mkdir(parents=True)
    metrics_port, nats_port = free_port(), free_port()
    config = root / "busd.toml"
    config.write_text(
        f'data_dir = "{root / "data"}"\n'
        f'artifact_roots = ["{artifacts}"]\n'
        "[nats]\n"
        'url = ""\n'
        f'embedded_listen = "127.0.0.1:{nats_port}"\n'
        "[consumer]\n"
        "batch_wait_ms = 50\n"
        "[metrics]\n"
        f'listen = "127.0.0.1:{metrics_port}"\n'
        "[[exports]]\n"
        'name = "latest_fills"\n'
        'depends_on = ["fills"]\n'
        'sql = "SELECT * FROM data.fills"\n',
        encoding="utf-8",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BUSD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    proc = Process.start(
        "busd serve",
        [*BUSD, "serve", "--config", str(config)],
        root / "serve.log",
        cwd=root,
        env=env,
    )
    try:
        metrics = f"127.0.0.1:{metrics_port}"
        wait_until("busd /readyz", lambda: http_get(f"http://{metrics}/readyz")[0] == 200, proc, 60)
        yield Busd(root, config, f"nats://127.0.0.1:{nats_port}", metrics, proc)
    finally:
        proc.stop()


@dataclass
class Prometheus:
    url: str
    proc: Process

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout_s=10)
        answer = json.loads(body) if body else {}
        assert status == 200 and answer.get("status") == "success", (path, params, body[:500])
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", (promql, data)
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture
def prometheus(prometheus_binary: str, busd: Busd, tmp_path: Path) -> Iterator[Prometheus]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "rule_files:\n"
        f"  - {json.dumps(str(RULES))}\n"
        "scrape_configs:\n"
        "  - job_name: busd\n"
        "    static_configs:\n"
        f"      - targets: [{json.dumps(busd.metrics_address)}]\n",
        encoding="utf-8",
    )
    port = free_port()
    proc = Process.start(
        "prometheus",
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        folder / "prometheus.log",
        cwd=folder,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until("prometheus /-/ready", lambda: http_get(f"{url}/-/ready")[0] == 200, proc, 60)
        yield Prometheus(url, proc)
    finally:
        proc.stop(grace_s=20)


def finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in series)


def returns_a_number(prom: Prometheus, promql: str) -> Callable[[], bool]:
    return lambda: finite(prom.query(promql))


def returns_series(prom: Prometheus, promql: str) -> Callable[[], bool]:
    return lambda: bool(prom.query(promql))


def alert_rules(prom: Prometheus) -> dict[str, dict[str, Any]]:
    groups = prom.api("rules", type="alert")["groups"]
    return {rule["name"]: rule for group in groups for rule in group["rules"]}


def test_every_panel_and_alert_against_a_real_busd(busd: Busd, prometheus: Prometheus) -> None:
    # Scraped at least twice before anything happens, so counters are seen going up from 0.
    wait_until(
        "two scrapes of busd",
        lambda: bool(prometheus.query('count_over_time(up{job="busd"}[1m]) >= 2')),
        prometheus.proc,
        DEADLINE_S,
    )
    assert prometheus.query('up{job="busd"}')[0]["value"][1] == "1"

    for i in range(3):
        run = f"live-{i}"
        files = {}
        for name, rows in (("fills", 5 + i), ("positions", 2)):
            path = busd.root / "artifacts" / run / f"{name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"x": list(range(rows)), "run": [run] * rows}), path)
            files[name] = path
        busd.submit(run, **files)
    # Not a valid event: rejected with reason `schema` (no run, no artifacts).
    busd.publish_raw("artifacts.test", b'{"schema_version": 1}')

    queries = dashboard_queries()
    rules = RULES.read_text(encoding="utf-8")
    checks: dict[str, Callable[[], bool]] = {}
    for query in queries:
        checks[f"panel {query}"] = returns_a_number(prometheus, query.promql)
    for name in sorted(metric_names_in(rules)):
        checks[f"alert metric {name}"] = returns_series(prometheus, name)
    checks["BusdRejections fires for reason schema"] = lambda: any(
        a["labels"].get("alertname") == "BusdRejections"
        and a["labels"].get("reason") == "schema"
        and a["state"] == "firing"
        for a in prometheus.api("alerts")["alerts"]
    )
    checks["every alert rule evaluated without error"] = lambda: (
        set(alert_rules(prometheus)) == set(ALERTS)
        # A rule never evaluated reports lastEvaluation 0001-01-01T00:00:00Z.
        and all(
            r["health"] == "ok" and not r["lastEvaluation"].startswith("0001-")
            for r in alert_rules(prometheus).values()
        )
    )

    deadline = time.monotonic() + DEADLINE_S
    failing = dict(checks)
    while failing and time.monotonic() < deadline:
        failing = {what: check for what, check in failing.items() if not check()}
        if failing:
            time.sleep(1)
    assert not failing, (
        f"no data after {DEADLINE_S:.0f}s for:\n  "
        + "\n  ".join(failing)
        + "\n--- busd ---\n"
        + busd.proc.log_tail()
        + "\n--- /metrics ---\n"
        + http_get(f"http://{busd.metrics_address}/metrics")[1].decode()[:6000]
    )

    # Every alert expression is valid PromQL here, and only BusdRejections holds on this busd.
    for name, rule in alert_rules(prometheus).items():
        result = prometheus.query(rule["query"])
        if name == "BusdRejections":
            assert {s["metric"]["reason"] for s in result} == {"schema"}, result
        else:
            assert result == [], f"{name} holds on a healthy busd: {result}"
    firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert firing == {"BusdRejections"}, firing
