"""Shared by the tests of ops/: where the files are, the external tools, the queries in them.

A plain module (not conftest.py, whose name tests/conftest.py already takes), imported as
``opsfiles``: pytest puts this folder on sys.path for the test modules in it.

External tools (promtool, prometheus, systemd-analyze) come from Debian packages that CI
installs. Without CI a missing tool skips the test with the package to install; under CI
(``CI`` set) it fails, so a missing install step cannot pass as green.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
RULES = OPS / "prometheus" / "busd.rules.yml"
RULES_TEST = OPS / "prometheus" / "busd.rules.test.yml"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
DASHBOARD = OPS / "grafana" / "busd.json"
UNIT = OPS / "systemd" / "busd.service"
NATS_CONF = OPS / "nats" / "nats-server.conf"
CONFIG_EXAMPLE = OPS / "busd.toml.example"
RUNBOOK = REPO / "docs" / "runbook.md"

# What Grafana substitutes before a query reaches Prometheus, for evaluating panels outside it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}

METRIC_NAME = re.compile(r"\bbusd_[a-z0-9_]+\b")


_tried_apt: set[str] = set()


def _apt_install(package: str) -> None:
    """As root with apt-get (a fresh CI machine), install the Debian package once."""
    if package in _tried_apt or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    _tried_apt.add(package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)


def find_tool(name: str, package: str) -> str:
    """The tool's path (installed from Debian when missing and we are root); a skip naming
    the package, or a failure under CI."""
    path = shutil.which(name)
    if path is None:
        _apt_install(package)
        path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found: apt-get install -y {package}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must install it)")
    pytest.skip(message)


def free_port() -> int:
    """A free loopback TCP port (bound, read and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel, as written and as Prometheus would receive it."""

    panel: str
    ref_id: str
    expr: str
    instant: bool

    @property
    def promql(self) -> str:
        text = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        return text

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref_id}: {self.promql}"


def load_dashboard() -> dict[str, object]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, object]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, object]] = []

    def walk(items: object) -> None:
        assert isinstance(items, list)
        for panel in items:
            assert isinstance(panel, dict)
            out.append(panel)
            walk(panel.get("panels", []))

    walk(load_dashboard()["panels"])
    return out


def dashboard_queries() -> list[PanelQuery]:
    queries: list[PanelQuery] = []
    for panel in dashboard_panels():
        targets = panel.get("targets", [])
        assert isinstance(targets, list)
        for target in targets:
            assert isinstance(target, dict)
            queries.append(
                PanelQuery(
                    str(panel["title"]),
                    str(target["refId"]),
                    str(target["expr"]),
                    bool(target.get("instant")),
                )
            )
    return queries


def metric_names_in(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))
