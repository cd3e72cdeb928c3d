"""Which `quept_*` metrics the files in deploy/ depend on.

The Grafana dashboard, the Prometheus alert rules, the KEDA ScaledObject, the HPA and the
prometheus-adapter rule all name metrics of the serving contract (shared serving-conventions.md).
`referenced_metrics()` collects every such name, normalised to the metric family a server exposes
(histogram series `_bucket`, `_sum` and `_count` become the histogram's base name), so a test can
check them against a live server's /metrics (`exposed_metric_families()`,
tests/deploy/test_metrics_emitted.py).

`promql_expressions()` returns the expressions themselves, for the PromQL syntax check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = "deploy/grafana/dashboards/*.json"
RULES = "deploy/prometheus/*rules*.yml"
K8S = "deploy/k8s/**/*.yaml"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![A-Za-z0-9_:])quept_[A-Za-z0-9_:]*")
_HISTOGRAM_SERIES = re.compile(r"_(?:bucket|sum|count)$")


@dataclass(frozen=True)
class Expression:
    source: str  # file (relative to the repo) and where in it
    expr: str  # PromQL; adapter expressions keep their <<.Series>> templates, dashboard ones $variables
    kind: str  # "dashboard", "rule", "keda", "hpa", "adapter"


def metric_names(expr: str) -> set[str]:
    """`quept_*` metric families named in one PromQL expression (string literals ignored)."""
    code = _STRING.sub('""', expr)
    return {_HISTOGRAM_SERIES.sub("", name) for name in _NAME.findall(code)}


def promql_expressions(root: Path = REPO_ROOT) -> list[Expression]:
    exprs: list[Expression] = []
    for path in sorted(root.glob(DASHBOARDS)):
        exprs += _dashboard_expressions(path, path.relative_to(root).as_posix())
    for path in sorted(root.glob(RULES)):
        exprs += _rule_expressions(path, path.relative_to(root).as_posix())
    for path in sorted(root.glob(K8S)):
        exprs += _k8s_expressions(path, path.relative_to(root).as_posix())
    return exprs


def referenced_metrics(root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """Every referenced `quept_*` metric family -> the places that reference it."""
    refs: dict[str, list[str]] = {}
    for expression in promql_expressions(root):
        for name in metric_names(expression.expr):
            refs.setdefault(name, []).append(expression.source)
    return dict(sorted(refs.items()))


def referenced_metric_names(root: Path = REPO_ROOT) -> set[str]:
    return set(referenced_metrics(root))


def exposed_metric_families(text: str) -> set[str]:
    """Metric family names in a Prometheus text (or OpenMetrics) exposition, from its `# TYPE` lines."""
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[:2] == ["#", "TYPE"]:
            name, kind = parts[2], parts[3]
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")  # OpenMetrics drops the suffix from the family name
            elif kind == "info":
                names.add(name + "_info")
    return names


def _dashboard_expressions(path: Path, rel: str) -> list[Expression]:
    dashboard = json.loads(path.read_text())
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if isinstance(target.get("expr"), str):
                where = f"{rel}: panel {panel.get('title')!r} {target.get('refId', '')}"
                exprs.append(Expression(where.rstrip(), target["expr"], "dashboard"))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if isinstance(query, str) and query:
            exprs.append(Expression(f"{rel}: variable ${variable.get('name')}", query, "dashboard"))
    return exprs


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def _rule_expressions(path: Path, rel: str) -> list[Expression]:
    exprs = []
    for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            exprs.append(Expression(f"{rel}: {group.get('name')}/{name}", str(rule["expr"]), "rule"))
    return exprs


def _k8s_expressions(path: Path, rel: str) -> list[Expression]:
    exprs = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not isinstance(doc, dict):
            continue
        kind = doc.get("kind")
        if kind == "ScaledObject":
            for i, trigger in enumerate(doc.get("spec", {}).get("triggers", [])):
                query = (trigger.get("metadata") or {}).get("query")
                if trigger.get("type") == "prometheus" and query:
                    exprs.append(Expression(f"{rel}: ScaledObject trigger {i}", query, "keda"))
        elif kind == "HorizontalPodAutoscaler":
            for i, metric in enumerate(doc.get("spec", {}).get("metrics", [])):
                name = (metric.get(_HPA_SOURCES.get(metric.get("type"), ""), {}).get("metric") or {}).get("name")
                if name:
                    exprs.append(Expression(f"{rel}: HorizontalPodAutoscaler metric {i}", name, "hpa"))
        elif kind == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    exprs += _adapter_expressions(yaml.safe_load(text), f"{rel}: {key}")
        elif kind is None:
            exprs += _adapter_expressions(doc, rel)
    return exprs


_HPA_SOURCES = {"Pods": "pods", "Object": "object", "External": "external"}


def _adapter_expressions(config: Any, where: str) -> list[Expression]:
    """prometheus-adapter rules: a config.yaml (`rules: [...]`) or Helm values (`rules: {custom: [...]}`)."""
    if not isinstance(config, dict):
        return []
    rules = config.get("rules")
    if isinstance(rules, dict):  # Helm chart values
        rules = [*(rules.get("custom") or []), *(rules.get("external") or [])]
    else:  # the adapter's own config.yaml
        rules = [*(rules or []), *(config.get("externalRules") or [])]
    exprs = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        for field in ("seriesQuery", "metricsQuery"):
            if rule.get(field):
                exprs.append(Expression(f"{where}: adapter rule {i} {field}", rule[field], "adapter"))
    return exprs
