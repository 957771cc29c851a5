"""The Prometheus files of ops/ pass promtool: syntax, the alert rules' unit tests, the config.

The dashboard's queries are checked by promtool too, as recording rules in a temporary file,
so a typo in a panel fails here rather than as an empty panel in Grafana.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from opsfiles import (
    PROMETHEUS_CONFIG,
    RULES,
    RULES_TEST,
    RUNBOOK,
    dashboard_queries,
)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_rules_are_valid(promtool: str) -> None:
    done = run([promtool, "check", "rules", str(RULES)], RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_rules_unit_tests_pass(promtool: str) -> None:
    done = run([promtool, "test", "rules", RULES_TEST.name], RULES_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test() -> None:
    rules = RULES.read_text(encoding="utf-8")
    tests = RULES_TEST.read_text(encoding="utf-8")
    alerts = [
        line.split(":", 1)[1].strip()
        for line in rules.splitlines()
        if line.strip().startswith("- alert:")
    ]
    assert len(alerts) == 8
    for alert in alerts:
        # Shown firing (an exp_alerts list with labels) and not firing (an empty list).
        assert f"alertname: {alert}\n        exp_alerts: []" in tests, alert
        assert f"alertname: {alert}\n        exp_alerts:\n" in tests, alert


def test_config_is_valid_from_any_directory(promtool: str, tmp_path: Path) -> None:
    # The rules path inside is relative to the config file, not to the working directory.
    done = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout
    assert "SUCCESS: 8 rules found" in done.stdout


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert queries
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(queries):
        assert "$" not in query.promql, f"unsubstituted Grafana variable in {query}"
        lines += [
            f"      - record: dashboard:query_{i}",
            "        expr: '" + query.promql.replace("'", "''") + "'",
        ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = run([promtool, "check", "rules", str(path)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_a_runbook_section() -> None:
    urls: dict[str, str] = {}  # alert → its runbook_url ("" when it has none)
    alert = None
    for line in RULES.read_text(encoding="utf-8").splitlines():
        found = re.match(r"\s*- alert: (\w+)$", line)
        if found:
            alert = found.group(1)
            urls[alert] = ""
        found = re.match(r"\s*runbook_url: (\S+)$", line)
        if found and alert is not None:
            urls[alert] = found.group(1)
    runbook = RUNBOOK.read_text(encoding="utf-8")
    anchors = {
        github_anchor(line.lstrip("#")) for line in runbook.splitlines() if line.startswith("#")
    }
    assert len(urls) == 8
    for alert, url in urls.items():
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md", f"{alert}: runbook_url {url!r}"
        assert anchor in anchors, f"{alert}: no section #{anchor} in docs/runbook.md"
        section = runbook.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
        # what it means, what to check, what to run
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in section, f"{alert}: its runbook section lacks {part}"
