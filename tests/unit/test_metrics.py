"""service/metrics.py defines exactly the contract's metrics (serving-conventions.md) and those docs/controller.md
adds, and /metrics lints clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT.parent / "shared" / "docs" / "serving-conventions.md"
CONTROLLER_DOC = ROOT / "docs" / "controller.md"


def contract_table(path: Path = CONTRACT) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the Metrics table of the contract (or of another document)."""
    text = path.read_text()
    section = text[text.index("## Metrics"):]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`quept_"):
            continue
        kind = cells[1].split()[0]
        labels = tuple(re.findall(r"`([a-z_]+)`", cells[2]))
        for name in re.findall(r"`(quept_[a-z_]+)`", cells[0]):
            rows[name] = (kind, labels)
    return rows


def defined() -> dict[str, tuple[str, tuple[str, ...]]]:
    metrics = Metrics()
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (value._type, tuple(value._labelnames))
    return found


def test_the_contract_table_is_read():
    table = contract_table()
    assert len(table) == 18 and table["quept_requests_total"][0] == "counter"


def test_every_metric_has_the_contract_name_type_and_labels():
    added = contract_table(CONTROLLER_DOC)
    assert set(added) == {"quept_latency_prediction_ratio", "quept_host_speed_ratio", "quept_engine_threads",
                          "quept_budget_choices_total"}
    assert defined() == {**contract_table(), **added}


def test_inter_token_latency_buckets_start_at_one_millisecond():
    assert Metrics().inter_token_latency._upper_bounds[0] == 0.001


def test_metric_label_values_stay_within_fixed_sets(make_client):
    client = make_client()
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "precision": "mixed:4.5"})
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "precision": "fp"})
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 2, "precision": "w8", "latency_budget_ms": 1e-3})
    text = client.get("/metrics").text
    served = set(re.findall(r'precision_served="([^"]+)"', text))
    assert served <= {"fp", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "mixed", "none"}
    assert {"mixed", "fp"} <= served
    assert set(re.findall(r'quept_controller_decisions_total\{mode="([^"]+)"', text)) == {"uniform", "mixed"}


def test_metrics_pass_promtool(make_client, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    client = make_client()
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 3, "precision": "w4"})
    client.post("/generate", json={"prompt": "x", "max_new_tokens": 3, "stream": True})
    exposition = client.get("/metrics")
    assert exposition.headers["content-type"].startswith("text/plain")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition.content, capture_output=True, check=False,
                            timeout=60)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()


def test_counters_with_known_label_values_are_exported_at_zero_before_any_request(make_client):
    text = make_client().get("/metrics").text
    for series in ['quept_request_failures_total{reason="dropped"}', 'quept_request_failures_total{reason="deadline"}',
                   'quept_request_failures_total{reason="error"}', 'quept_budget_violations_total{budget="latency"}',
                   'quept_budget_violations_total{budget="memory"}',
                   'quept_budget_choices_total{outcome="best"}',
                   'quept_budget_choices_total{outcome="better_plan_fitted"}',
                   'quept_admission_rejections_total{reason="queue_full"}',
                   'quept_admission_rejections_total{reason="infeasible"}',
                   'quept_admission_rejections_total{reason="body_too_large"}',
                   'quept_controller_decisions_total{mode="mixed"}',
                   'quept_precision_downgrades_total{from="w8",reason="brownout",to="w4"}',
                   'quept_precision_downgrades_total{from="fp",reason="latency_budget",to="w8"}',
                   'quept_precision_downgrades_total{from="mixed",reason="memory_budget",to="w3"}']:
        assert f"{series} 0.0" in text.splitlines(), series
    # Only pairs the controller can make: never up to more bits and a worse measured quality.
    assert 'quept_precision_downgrades_total{from="w3",reason="brownout",to="w8"}' not in text
    assert 'to="fp"' not in text
