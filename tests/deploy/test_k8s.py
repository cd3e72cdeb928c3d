"""Kubernetes manifests: schemas (kubernetes-validate, KEDA CRD models) and how the pieces fit."""

import copy
import re
from urllib.parse import urlparse

import pytest
from deploy_helpers import (
    K8S,
    REPO_ROOT,
    k8s_manifests,
    k8s_object,
    load_yaml,
    parse_dockerfile,
    require_module,
)

# Oldest Kubernetes minor still commonly run, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
NAMESPACE = "quept"
QUEPT_SETTINGS = {"QUEPT_CACHE_DIR", "QUEPT_HOST", "QUEPT_PORT", "QUEPT_MODEL", "QUEPT_DRAIN_TIMEOUT_S",
                  "QUEPT_MAX_QUEUE", "QUEPT_MEMORY_LIMIT_MB", "QUEPT_LOG_LEVEL"}
# Metadata keys of KEDA's prometheus scaler.
PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                           "customHeaders", "ignoreNullValues", "unsafeSsl", "queryParameters", "authModes"}

CORE_OBJECTS = [(path, i) for path, docs in k8s_manifests().items() for i, d in enumerate(docs)
                if not d["apiVersion"].startswith("keda.sh/")]


def _validate_core(doc, version):
    kubernetes_validate = require_module("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path or '/'}: {exc.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path, index", CORE_OBJECTS,
                         ids=[f"{p.relative_to(K8S)}#{i}" for p, i in CORE_OBJECTS])
def test_manifest_matches_kubernetes_schema(path, index, version):
    _validate_core(k8s_manifests()[path][index], version)


def test_kubernetes_schema_check_rejects_a_broken_manifest():
    kubernetes_validate = require_module("kubernetes_validate")
    broken = copy.deepcopy(k8s_object("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGets"] = {"path": "/ready"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def keda_schema():
    """JSON schema of KEDA's ScaledObject from the CRD-generated models, made strict like kubeconform -strict."""
    models = require_module("cloudcoil.models.keda.v1alpha1")
    schema = models.ScaledObject.model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    strict(schema)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


def keda_errors(doc):
    jsonschema = require_module("jsonschema")
    validator = jsonschema.Draft202012Validator(keda_schema())
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(doc)]


def test_scaledobject_matches_keda_crd_schema():
    scaled = k8s_object("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert not keda_errors(scaled)
    assert scaled["metadata"]["name"] and scaled["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("mutate", [
    lambda so: so["spec"].update(minReplicaCount="one"),
    lambda so: so["spec"].update(maxReplicas=8),
    lambda so: so["spec"].pop("scaleTargetRef"),
    lambda so: so["spec"]["triggers"][0].pop("type"),
    lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=4),
], ids=["wrong-type", "unknown-field", "missing-target", "missing-trigger-type", "non-string-metadata"])
def test_keda_schema_check_rejects_broken_scaledobjects(mutate):
    broken = copy.deepcopy(k8s_object("ScaledObject"))
    mutate(broken)
    assert keda_errors(broken)


def test_keda_prometheus_trigger_scales_on_queue_depth():
    spec = k8s_object("ScaledObject")["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_TRIGGER_KEYS, set(metadata) - PROMETHEUS_TRIGGER_KEYS
    assert {"serverAddress", "query", "threshold"} <= set(metadata)
    assert urlparse(metadata["serverAddress"]).scheme in {"http", "https"}
    assert float(metadata["threshold"]) > 0
    assert re.fullmatch(rf'sum\(quept_requests_waiting\{{namespace="{NAMESPACE}"\}}\)', metadata["query"])
    assert spec["minReplicaCount"] >= 1, "no scale to zero: loading and warm-up take too long"
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]


def test_hpa_is_the_same_policy_as_keda():
    scaled = k8s_object("ScaledObject")["spec"]
    hpa = k8s_object("HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "quept_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue",
                                        "averageValue": scaled["triggers"][0]["metadata"]["threshold"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (scaled["minReplicaCount"], scaled["maxReplicaCount"])
    assert hpa["behavior"] == scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    for target in (hpa["scaleTargetRef"], scaled["scaleTargetRef"]):
        assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "quept"}


def test_adapter_rule_provides_the_hpa_metric():
    values = load_yaml(K8S / "hpa" / "prometheus-adapter-values.yaml")
    (rule,) = values["rules"]["custom"]
    hpa_metric = k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == hpa_metric
    assert re.fullmatch(rule["name"]["matches"], "quept_requests_waiting")
    assert re.match(r"quept_requests_waiting\{", rule["seriesQuery"])
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    keda_server = urlparse(k8s_object("ScaledObject")["spec"]["triggers"][0]["metadata"]["serverAddress"])
    assert (urlparse(values["prometheus"]["url"]).hostname, values["prometheus"]["port"]) == \
        (keda_server.hostname, keda_server.port), "KEDA and the adapter should read the same Prometheus"


def _mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", quantity)
    assert match, f"unsupported quantity {quantity}"
    return float(match.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, None: 1 / 2**20}[match.group(2)]


def test_deployment_probes_resources_and_settings():
    deployment = k8s_object("Deployment")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_names[container[probe]["httpGet"]["port"]] == 8000

    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert _mebibytes(resources["limits"]["memory"]) >= _mebibytes(resources["requests"]["memory"])

    env = {e["name"]: e.get("value") for e in container["env"]}
    quept_env = {name for name in env if name.startswith("QUEPT_")}
    assert quept_env <= QUEPT_SETTINGS, quept_env - QUEPT_SETTINGS
    assert {"QUEPT_DRAIN_TIMEOUT_S", "QUEPT_CACHE_DIR", "QUEPT_MODEL", "QUEPT_MAX_QUEUE",
            "QUEPT_MEMORY_LIMIT_MB", "QUEPT_LOG_LEVEL"} <= quept_env
    assert float(env["QUEPT_MEMORY_LIMIT_MB"]) < _mebibytes(resources["limits"]["memory"])

    dockerfile_env = " ".join(i.args for i in parse_dockerfile(REPO_ROOT / "Dockerfile") if i.keyword == "ENV")
    assert f"QUEPT_CACHE_DIR={env['QUEPT_CACHE_DIR']}" in dockerfile_env, "same cache dir as the image"
    mounted = {m["mountPath"].rstrip("/") for m in container.get("volumeMounts", [])}
    assert env["QUEPT_CACHE_DIR"].rstrip("/") not in mounted, "a volume there would hide the baked artifact"


def test_grace_period_covers_prestop_and_drain():
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    drain = int(next(e["value"] for e in container["env"] if e["name"] == "QUEPT_DRAIN_TIMEOUT_S"))
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep = int(command[1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 5


def test_selectors_namespaces_and_targets_fit_together():
    deployment = k8s_object("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": k8s_object("Service")["spec"]["selector"],
        "PodDisruptionBudget": k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"{kind} selector does not match the pods"
    assert "maxUnavailable" in k8s_object("PodDisruptionBudget")["spec"], \
        "minAvailable with a single replica would block node drains"
    namespaced = [d for docs in k8s_manifests().values() for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {NAMESPACE}
    assert k8s_object("Namespace", NAMESPACE)
