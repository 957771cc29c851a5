"""Every metric name used in ops/ is one busd exports, and the dashboard shows every metric.

Dashboards and alerts that name a metric busd does not have stay silent forever: this catches
a rename in busd/metrics.py that ops/ did not follow (and the reverse).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opsfiles import (
    DASHBOARD,
    RULES,
    RULES_TEST,
    dashboard_queries,
    load_dashboard,
    metric_names_in,
)

from busd.metrics import METRIC_NAMES

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Metrics deliberately not on the dashboard, with the reason.
NOT_ON_DASHBOARD = {
    "busd_up": 'Prometheus\' own up{job="busd"} says the same, and BusdDown alerts on it',
    "busd_lineage_events_total": "lineage is off by default; docs/lineage.md gives the query "
    "for a panel where it is on",
}


def known(name: str) -> bool:
    if name in METRIC_NAMES:
        return True
    return any(name.endswith(s) and name[: -len(s)] in METRIC_NAMES for s in HISTOGRAM_SUFFIXES)


@pytest.mark.parametrize("path", [RULES, RULES_TEST, DASHBOARD], ids=lambda p: p.name)
def test_ops_files_use_only_busd_metrics(path: Path) -> None:
    used = metric_names_in(path.read_text(encoding="utf-8"))
    assert used, f"no busd metric found in {path.name}"
    unknown = sorted(name for name in used if not known(name))
    assert not unknown, f"{path.name} uses metrics busd does not export: {unknown}"


def test_each_panel_query_uses_known_metrics() -> None:
    # The test above reads whole files; this one names the panel of a bad query.
    for query in dashboard_queries():
        for name in metric_names_in(query.expr):
            assert known(name), f"{query}: {name} is not a busd metric"


def test_dashboard_shows_every_metric() -> None:
    used = {name for query in dashboard_queries() for name in metric_names_in(query.expr)}
    bases = {
        next(
            (
                n[: -len(s)]
                for s in HISTOGRAM_SUFFIXES
                if n.endswith(s) and n[: -len(s)] in METRIC_NAMES
            ),
            n,
        )
        for n in used
    }
    missing = sorted(set(METRIC_NAMES) - bases - set(NOT_ON_DASHBOARD))
    assert not missing, f"metrics with no panel on ops/grafana/busd.json: {missing}"


def test_histograms_are_queried_through_buckets() -> None:
    # histogram_quantile over anything but *_bucket returns nothing.
    for query in dashboard_queries():
        if "histogram_quantile" in query.expr:
            assert "_bucket" in query.expr, str(query)


def test_dashboard_template_variables_use_busd_metrics() -> None:
    templating = load_dashboard()["templating"]
    assert isinstance(templating, dict)
    text = str(templating["list"])
    assert all(known(name) for name in metric_names_in(text))
