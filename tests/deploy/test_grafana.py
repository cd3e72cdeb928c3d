"""The Grafana dashboard and its provisioning."""

import json
import re

import pytest
from deploy_helpers import DEPLOY, REPO_ROOT, load_yaml

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "quept-serving.json"


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard, title):
    matches = [p for p in panels(dashboard) if p.get("title") == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}"
    return [t["expr"] for t in matches[0]["targets"]]


def _quantile_panel(exprs, metric):
    quantiles = set()
    for expr in exprs:
        match = re.match(r"histogram_quantile\((0\.\d+),\s*sum by \(([^)]*)\) \(rate\((\w+)\{", expr)
        assert match and match.group(3) == f"{metric}_bucket", expr
        assert {"le", "precision_served"} <= {s.strip() for s in match.group(2).split(",")}, expr
        quantiles.add(match.group(1))
    return quantiles == {"0.5", "0.95", "0.99"}


REQUIRED_PANELS = {
    "Requests by precision served":
        lambda e: any(re.search(r"by \(precision_served\) \(rate\(quept_requests_total", x) for x in e),
    "Time to first token p50/p95/p99 by precision":
        lambda e: _quantile_panel(e, "quept_time_to_first_token_seconds"),
    "Inter-token latency p50/p95/p99 by precision":
        lambda e: _quantile_panel(e, "quept_inter_token_latency_seconds"),
    "Queue depth (running / waiting)":
        lambda e: any("quept_requests_running" in x for x in e) and any("quept_requests_waiting" in x for x in e),
    "Precision downgrades and reasons":
        lambda e: any(re.search(r"by \([^)]*reason[^)]*\) \(rate\(quept_precision_downgrades_total", x) for x in e),
    "Tokens per second":
        lambda e: any("rate(quept_generation_tokens_total" in x for x in e),
    "Resident weight bytes by precision":
        lambda e: any(re.search(r"by \(precision\) \(quept_weights_resident_bytes", x) for x in e),
    "Errors and failures by reason":
        lambda e: any(re.search(r"by \(reason\) \(rate\(quept_request_failures_total", x) for x in e),
    "Admission rejections by reason":
        lambda e: any(re.search(r"by \(reason\) \(rate\(quept_admission_rejections_total", x) for x in e),
}


@pytest.mark.parametrize("title", REQUIRED_PANELS)
def test_required_panel(dashboard, title):
    exprs = panel_exprs(dashboard, title)
    assert REQUIRED_PANELS[title](exprs), f"{title}: {exprs}"


def test_layout_and_targets(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["description"], f"panel {panel['title']!r} needs a description"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()


def test_datasource_variable_defaults_to_the_provisioned_datasource(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    (provisioned,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert variables["datasource"]["current"]["value"] == provisioned["uid"]
    assert provisioned["type"] == "prometheus"
    compose = load_yaml(REPO_ROOT / "docker-compose.yml")
    assert provisioned["url"] == "http://prometheus:9090" and compose["services"]["prometheus"]["ports"] == ["9090:9090"]
    instance = variables["instance"]
    assert instance["includeAll"] and instance["allValue"] == ".*"


def test_provisioned_dashboard_folder_is_mounted():
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "quept.yml")["providers"]
    grafana = load_yaml(REPO_ROOT / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
