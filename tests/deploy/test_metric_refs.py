"""metric_refs finds every quept_* metric that deploy/ depends on, and only contract metrics."""

import json
import textwrap
from pathlib import Path

import metric_refs

# The metric table of the serving contract (shared serving-conventions.md, "Metrics") and the server's own.
CONTRACT_METRICS = {
    "quept_requests_total",
    "quept_request_duration_seconds",
    "quept_time_to_first_token_seconds",
    "quept_inter_token_latency_seconds",
    "quept_queue_duration_seconds",
    "quept_requests_running",
    "quept_requests_waiting",
    "quept_prompt_tokens_total",
    "quept_generation_tokens_total",
    "quept_precision_downgrades_total",
    "quept_controller_decisions_total",
    "quept_budget_violations_total",
    "quept_admission_rejections_total",
    "quept_request_failures_total",
    "quept_weights_resident_bytes",
    "quept_kv_cache_usage_ratio",
    "quept_precision_switch_seconds",
    "quept_build_info",
    # added by docs/controller.md ("Metrics")
    "quept_latency_prediction_ratio",
    "quept_host_speed_ratio",
    "quept_engine_threads",
    "quept_budget_choices_total",
}


def test_exposed_metric_families_reads_type_lines():
    text = ("# HELP quept_a_total a\n# TYPE quept_a_total counter\nquept_a_total{x=\"1\"} 3\n"
            "# TYPE quept_b counter\n# TYPE quept_c_seconds histogram\nquept_c_seconds_count 0\n"
            "# TYPE quept_build info\nquept_untyped_sample 1\n")
    assert metric_refs.exposed_metric_families(text) == {
        "quept_a_total", "quept_b", "quept_b_total", "quept_c_seconds", "quept_build", "quept_build_info"}


def test_metric_names_normalises_histograms_and_ignores_strings():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(quept_ttft_seconds_bucket{job="quept_fake"}[5m])))'
            " / on() quept_x_seconds_sum + quept_x_seconds_count - quept_gauge_ratio"
            " + label_replace(up, 'a', 'quept_not_a_metric', '', '')")
    assert metric_refs.metric_names(expr) == {"quept_ttft_seconds", "quept_x_seconds", "quept_gauge_ratio"}


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_referenced_metrics_reads_every_kind_of_source(tmp_path):
    dashboard = {
        "panels": [
            {"title": "a", "targets": [{"refId": "A", "expr": "sum(rate(quept_a_total[$__rate_interval]))"}]},
            {"type": "row", "title": "collapsed", "panels": [
                {"title": "b", "targets": [{"refId": "A", "expr": "histogram_quantile(0.5, quept_b_seconds_bucket)"}]},
            ]},
        ],
        "templating": {"list": [
            {"name": "instance", "type": "query", "query": {"query": "label_values(quept_c_info, instance)"}},
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
        ]},
    }
    _write(tmp_path, "deploy/grafana/dashboards/d.json", json.dumps(dashboard))
    _write(tmp_path, "deploy/prometheus/rules.yml", """
        groups:
          - name: g
            rules:
              - alert: A
                expr: quept_d_waiting > 3
              - record: job:quept_e:rate5m
                expr: rate(quept_e_total[5m])
    """)
    _write(tmp_path, "deploy/k8s/keda/so.yaml", """
        apiVersion: keda.sh/v1alpha1
        kind: ScaledObject
        metadata: {name: x}
        spec:
          scaleTargetRef: {name: x}
          triggers:
            - type: prometheus
              metadata: {query: 'sum(quept_f_waiting{namespace="quept_ns"})', threshold: "4"}
            - type: cpu
              metadata: {value: "80"}
    """)
    _write(tmp_path, "deploy/k8s/hpa/hpa.yaml", """
        apiVersion: autoscaling/v2
        kind: HorizontalPodAutoscaler
        metadata: {name: x}
        spec:
          metrics:
            - type: Pods
              pods: {metric: {name: quept_g_waiting}, target: {type: AverageValue, averageValue: "4"}}
            - type: Resource
              resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
    """)
    _write(tmp_path, "deploy/k8s/hpa/values.yaml", """
        rules:
          custom:
            - seriesQuery: 'quept_h_waiting{namespace!="",pod!=""}'
              metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
    """)
    _write(tmp_path, "deploy/k8s/hpa/configmap.yaml", """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: adapter-config}
        data:
          config.yaml: |
            rules:
              - seriesQuery: 'quept_i_waiting{pod!=""}'
    """)

    refs = metric_refs.referenced_metrics(tmp_path)

    assert set(refs) == {"quept_a_total", "quept_b_seconds", "quept_c_info", "quept_d_waiting",
                         "quept_e_total", "quept_f_waiting", "quept_g_waiting", "quept_h_waiting",
                         "quept_i_waiting"}
    assert refs["quept_b_seconds"] == ["deploy/grafana/dashboards/d.json: panel 'b' A"]
    assert refs["quept_f_waiting"] == ["deploy/k8s/keda/so.yaml: ScaledObject trigger 0"]


def test_deploy_references_exactly_the_contract_metrics():
    refs = metric_refs.referenced_metrics()
    unknown = set(refs) - CONTRACT_METRICS
    assert not unknown, f"deploy/ uses metrics outside the serving contract: {sorted(unknown)}"
    # The dashboard covers the whole contract; a metric dropped from it is a lost panel.
    assert set(refs) == CONTRACT_METRICS


def test_each_source_references_the_metrics_it_is_built_on():
    by_kind: dict[str, set[str]] = {}
    for expression in metric_refs.promql_expressions():
        by_kind.setdefault(expression.kind, set()).update(metric_refs.metric_names(expression.expr))
    assert by_kind["keda"] == {"quept_requests_waiting"}
    assert by_kind["hpa"] == {"quept_requests_waiting"}
    assert by_kind["adapter"] == {"quept_requests_waiting"}
    assert {"quept_requests_waiting", "quept_precision_downgrades_total", "quept_requests_total",
            "quept_request_failures_total", "quept_admission_rejections_total"} <= by_kind["rule"]
    assert by_kind["dashboard"] == CONTRACT_METRICS
