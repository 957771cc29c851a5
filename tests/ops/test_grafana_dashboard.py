"""ops/grafana/busd.json is a dashboard Grafana can provision as is.

Grafana itself is not installable here (not in Debian), so this checks what provisioning needs:
a stable uid, a data source chosen by the DS_PROMETHEUS variable (never a hard-coded one), and
a layout whose panels do not overlap. That the queries return data is test_grafana_live.py.
"""

from __future__ import annotations

from typing import Any

from opsfiles import OPS, dashboard_panels, load_dashboard

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_identity() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "busd"
    assert dashboard["title"] == "busd"
    assert isinstance(dashboard["schemaVersion"], int)
    # Provisioning assigns the id; a fixed one would clash between Grafana instances.
    assert "id" not in dashboard or dashboard["id"] is None


def test_data_source_is_a_variable() -> None:
    templating: Any = load_dashboard()["templating"]
    variables = {v["name"]: v for v in templating["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["datasource"] == DATASOURCE
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets: Any = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_ids_and_ref_ids_are_unique() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    for panel in panels:
        targets: Any = panel.get("targets", [])
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]


def test_layout_fits_and_does_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos: Any = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), str(panel["title"]))
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_required_panels_are_there() -> None:
    titles = {str(p["title"]) for p in dashboard_panels()}
    for title in (
        "Lag",
        "Throughput by outcome",
        "Rejections by reason",
        "Commit latency",
        "Export latency p99 by export",
        "Export age",
        "Event latency (publish → ack)",
        "Batch size",
        "Artifacts committed",
        "Catalog sequence",
        "NATS connected",
        "Build info",
        "Lag in time (oldest unsettled)",
        "Consumer (stream, consumer)",
        "Process memory",
        "Process CPU",
        "Open files",
    ):
        assert title in titles


def test_provisioning_examples_point_at_each_other() -> None:
    dashboards = (OPS / "grafana/provisioning/dashboards/busd.yaml").read_text(encoding="utf-8")
    datasources = (OPS / "grafana/provisioning/datasources/prometheus.yaml").read_text(
        encoding="utf-8"
    )
    assert "apiVersion: 1" in dashboards and "type: file" in dashboards
    assert "apiVersion: 1" in datasources and "type: prometheus" in datasources
    assert "url: http://127.0.0.1:9090" in datasources
