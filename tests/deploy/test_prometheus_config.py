"""Prometheus config and alert rules (promtool), and every PromQL expression in deploy/ parses."""

import re
import subprocess

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO_ROOT, load_yaml, require_apt_tool
from metric_refs import promql_expressions

PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULE_TESTS = REPO_ROOT / "tests" / "deploy" / "prometheus" / "rules_test.yml"


def promtool(*args):
    tool = require_apt_tool("promtool", "prometheus")
    return subprocess.run([tool, *args], check=False, capture_output=True, text=True, timeout=120)


def test_promtool_check_config():
    result = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


def test_alerts_cover_queue_downgrades_errors_and_target_down():
    alerts = [r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]
    for alert in alerts:
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]

    def find(predicate, what):
        found = [a for a in alerts if predicate(a)]
        assert found, f"no alert for {what}"
        return found[0]

    queue = find(lambda a: "quept_requests_waiting" in a["expr"], "a growing queue")
    assert _seconds(queue.get("for", "0s")) >= 120, "queue must stay high for minutes, not a blip"
    find(lambda a: re.search(r"rate\(quept_precision_downgrades_total", a["expr"]), "the downgrade rate")
    find(lambda a: 'status=~"5.."' in a["expr"] and "quept_requests_total" in a["expr"], "the error rate")
    find(lambda a: re.fullmatch(r'up\{job="quept"\}\s*==\s*0', a["expr"].strip()), "a target that is down")


def test_compose_mounts_the_config_and_its_rule_files():
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    compose = load_yaml(REPO_ROOT / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()
        assert mounts[f"./deploy/prometheus/{rule_file}"] == f"/etc/prometheus/{rule_file}"
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["services"]["prometheus"]["command"]


# Grafana's variables and prometheus-adapter's templates, replaced by plain PromQL for the syntax check.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "<<.Series>>": "adapter_series",
    "<<.LabelMatchers>>": 'namespace="quept", pod="quept-0"',
    "<<.GroupBy>>": "pod",
}


def plain_promql(expr: str) -> str:
    match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", expr, re.DOTALL)  # Grafana variable query
    if match:
        expr = match.group(1)
    for placeholder, value in SUBSTITUTIONS.items():
        expr = expr.replace(placeholder, value)
    return expr


def test_every_promql_expression_in_deploy_parses(tmp_path):
    expressions = promql_expressions()
    assert len({e.kind for e in expressions}) == 5, "dashboard, rule, keda, hpa and adapter expressions"
    rules = []
    for i, expression in enumerate(expressions):
        expr = plain_promql(expression.expr)
        assert "$" not in expr and "<<" not in expr, f"unknown placeholder in {expression.source}: {expr}"
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    rules_file = tmp_path / "expressions.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "deploy", "rules": rules}]}))
    result = promtool("check", "rules", str(rules_file))
    if result.returncode != 0:
        where = "\n".join(f"  check:expr_{i} = {e.source}" for i, e in enumerate(expressions))
        pytest.fail(f"{result.stdout}{result.stderr}\nexpressions:\n{where}")
