"""k8s/: each overlay rendered by kubectl's kustomize, validated strictly against the Kubernetes
schemas (kubernetes-validate, offline) and, for the KEDA and Prometheus-operator objects,
against their CRD schemas vendored under schemas/. Plus the wiring a schema cannot see:
selectors, secrets, probes, GPU, autoscaling target. Applies nothing to any cluster."""
from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_helpers import OVERLAYS, RULES, containers, env_of, find, render

SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest we support (preStop sleep) and newest schemas shipped
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def _ecma_pattern(pattern: str) -> str:
    """RE2's leading (?i) (used by the operator's CRDs) has no ECMA-262 form: spell letters as [aA]."""
    if "(?i)" not in pattern:
        return pattern
    return re.sub(r"[A-Za-z]", lambda m: f"[{m[0].lower()}{m[0].upper()}]", pattern.replace("(?i)", ""))


def to_json_schema(node):
    """CRD openAPIV3Schema -> JSON Schema, strict like the API server's fieldValidation=Strict."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-")}
    if isinstance(node.get("pattern"), str):
        out["pattern"] = _ecma_pattern(node["pattern"])
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> tuple[dict, dict]:
    raw = yaml.safe_load((SCHEMAS / f"{api_version.split('/')[0]}_{api_version.split('/')[1]}_{kind}.yaml").read_text())
    return to_json_schema(raw["openAPIV3Schema"]), raw.get("x-opd-scaler-metadata", {})


def validate_crd_object(doc: dict) -> None:
    schema, scalers = crd_schema(doc["apiVersion"], doc["kind"])
    jsonschema.validate(doc, schema)
    for trig in doc.get("spec", {}).get("triggers", []) if doc["kind"] == "ScaledObject" else []:
        spec = scalers[trig["type"]]
        keys = set(trig["metadata"])
        assert keys <= set(spec["keys"]), f"unknown {trig['type']} metadata: {keys - set(spec['keys'])}"
        assert set(spec["required"]) <= keys and all(keys & set(g) for g in spec["one_of"])


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(request.param)


def test_overlay_validates_strictly_against_kubernetes_schemas(overlay):
    name, docs = overlay
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRDS]
    assert len(builtin) >= 15
    for version in K8S_VERSIONS:
        for d in builtin:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']} invalid for k8s {version}: {e.message} at {list(e.path)}")


def test_overlay_custom_resources_validate_against_vendored_crds(overlay):
    name, docs = overlay
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CRDS]
    assert {(d["apiVersion"], d["kind"]) for d in custom} == CRDS, f"{name} lacks some KEDA / operator objects"
    for d in custom:
        validate_crd_object(d)


def test_strict_validators_reject_unknown_fields(overlay):
    """The validators are not vacuous: a typo'd field fails both of them."""
    _, docs = overlay
    so = copy.deepcopy(find(docs, "ScaledObject")[0])
    so["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_crd_object(so)
    so = copy.deepcopy(find(docs, "ScaledObject")[0])
    so["spec"]["triggers"][0]["metadata"]["lagcount"] = "5"
    with pytest.raises(AssertionError):
        validate_crd_object(so)
    dep = copy.deepcopy(find(docs, "Deployment", "opd-teacher")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_prometheusrule_equals_monitoring_rules(overlay):
    _, docs = overlay
    (rule,) = find(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], \
        "k8s/components/prometheus-operator/prometheusrule.yaml drifted from monitoring/rules/opd-alerts.yml"


def _teacher(docs) -> tuple[dict, dict]:
    dep = find(docs, "Deployment", "opd-teacher")[0]
    return dep, dep["spec"]["template"]["spec"]["containers"][0]


def test_gpu_overlay_runs_vllm_on_a_gpu_and_cpu_does_not():
    for name in OVERLAYS:
        _, c = _teacher(render(name))
        env = env_of(c)
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if name == "gpu":
            assert env["OPD_ENGINE"] == "vllm" and env["OPD_DEVICE"] == "cuda" and gpus == 1
            assert "vllm" in c["image"]
        else:
            assert env["OPD_ENGINE"] == "torch" and gpus is None and "vllm" not in c["image"]


def test_teacher_probes_grace_and_disruption_budget(overlay):
    _, docs = overlay
    dep, c = _teacher(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (pdb,) = find(docs, "PodDisruptionBudget", "opd-teacher")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for svc_name, port_name in (("opd-teacher", "http"), ("opd-teacher-grpc", "grpc")):
        (svc,) = find(docs, "Service", svc_name)
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert svc["spec"]["ports"][0]["targetPort"] == port_name and port_name in ports


def test_only_the_teacher_scorers_and_trainers_reach_redis(overlay):
    """The teacher reaches Redis for the experiments registry (keys, weights, quotas, ACL users)."""
    _, docs = overlay
    (pol,) = find(docs, "NetworkPolicy", "opd-redis")
    (redis,) = find(docs, "StatefulSet", "opd-redis")
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    allowed = pol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    admitted = {d["metadata"]["name"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")
                and allowed.items() <= d["spec"]["template"]["metadata"].get("labels", {}).items()}
    teachers = {d["metadata"]["name"] for d in find(docs, "Deployment") if d["metadata"]["name"].startswith("opd-teacher")}
    assert admitted == teachers | {"opd-scorer", "opd-trainer"}
    others = pol["spec"]["ingress"][0]["from"][1:]
    assert [o["namespaceSelector"]["matchLabels"] for o in others] == [{"kubernetes.io/metadata.name": "keda"}]


def test_redis_persists_with_aof_on_a_volume(overlay):
    _, docs = overlay
    (redis,) = find(docs, "StatefulSet", "opd-redis")
    conf = find(docs, "ConfigMap", "opd-redis-config")[0]["data"]["redis.conf"]
    assert "appendonly yes" in conf and "dir /data" in conf
    mounts = {m["name"]: m["mountPath"] for m in redis["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data"
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    acl = find(docs, "ConfigMap", "opd-redis-config")[0]["data"]["render-acl.sh"]
    assert "user default off" in acl and acl.count("~opd:*") == 3


def test_every_secret_reference_exists(overlay):
    _, docs = overlay
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in find(docs, "Secret")}
    refs = [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for _, _, c in containers(docs) for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    for ta in find(docs, "TriggerAuthentication"):
        refs += [(r["name"], r["key"]) for r in ta["spec"]["secretTargetRef"]]
    assert refs
    for name, key in refs:
        assert key in secrets.get(name, set()), f"secret {name}/{key} is referenced but not defined"


def test_keda_scales_the_scorer_on_its_rollouts_stream(overlay):
    _, docs = overlay
    (so,) = find(docs, "ScaledObject", "opd-scorer")
    target = so["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "opd-scorer") and find(docs, "Deployment", "opd-scorer")
    (trig,) = so["spec"]["triggers"]
    meta = trig["metadata"]
    assert trig["type"] == "redis-streams" and meta["consumerGroup"] == "scorers"
    assert meta["stream"].startswith("opd:{") and meta["stream"].endswith("}:rollouts")
    (svc,) = find(docs, "Service", "opd-redis")
    ns = svc["metadata"]["namespace"]
    assert meta["address"] == f"opd-redis.{ns}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    assert trig["authenticationRef"]["name"] == find(docs, "TriggerAuthentication")[0]["metadata"]["name"]


def test_keda_scales_the_teacher_on_its_own_load(overlay):
    _, docs = overlay
    (so,) = find(docs, "ScaledObject", "opd-teacher")
    target = so["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "opd-teacher") and find(docs, "Deployment", "opd-teacher")
    assert so["spec"]["minReplicaCount"] >= 2          # failover needs a second replica
    queries = {t["metadata"]["query"] for t in so["spec"]["triggers"] if t["type"] == "prometheus"}
    assert any("opd_inflight_tokens" in q for q in queries) and any("opd_batcher_queued_sequences" in q for q in queries)


def test_servicemonitor_scrapes_teacher_scorer_trainer(overlay):
    _, docs = overlay
    (sm,) = find(docs, "ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    selected = {s["metadata"]["name"]: {p["name"] for p in s["spec"]["ports"]}
                for s in find(docs, "Service") if sel.items() <= s["metadata"].get("labels", {}).items()}
    # job label = the Service's jobLabel: must equal the job names of monitoring/prometheus.yml and the rules
    jobs = {s["metadata"]["labels"][sm["spec"]["jobLabel"]] for s in find(docs, "Service") if s["metadata"]["name"] in selected}
    assert jobs == {"opd-teacher", "opd-scorer", "opd-trainer"}
    endpoint_ports = {e["port"] for e in sm["spec"]["endpoints"]}
    assert all(ports & endpoint_ports for ports in selected.values())
