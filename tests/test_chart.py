"""The inferencepool Helm chart and the Kubernetes examples, as an operator meets them.

The chart is rendered by Helm's own engine (Helm v4's Go SDK, from the `helm-python-sdk` wheel),
with the values an operator would pass: our defaults, each model-server type, each provider, HA,
monitoring, autoscaling, and upstream's own values layouts (GIE v1.0 and v1.5, llm-d-router).
Every rendered object and every example is schema-checked: core kinds with `kubernetes-validate`'s
Kubernetes schemas, the CRD kinds (InferencePool, objectives, rewrites, Gateway API, GKE and
Istio policies, monitors) with structural schemas below that encode the CRDs' constraints on the
fields we set, and the Gateway API, GKE, Istio and Prometheus Operator kinds also with the
validators their published CRDs compile to (npm's kubernetes-models). The render is what
`helm install` would send; no cluster is involved.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from epp.cli import build_parser
from epp.scheduling import picker_config
from tests.chart_helpers import CHART, args, epp_container, kinds, one, render, render_error

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "deploy" / "examples"
GUIDE = ROOT / "docs" / "kubernetes.md"
RELEASE = "vllm-llama3-8b-instruct"
NAMESPACE = "default"
EPP = f"{RELEASE}-epp"
KUBE_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())  # GKE Inference Gateway's minimum, latest
POOL = {"inferencePool": {"modelServers": {"matchLabels": {"app": RELEASE}}}}

# ---- rendering -------------------------------------------------------------------------------


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    """Values files given in order, later ones winning key by key (as `helm -f a -f b`)."""
    out: dict[str, Any] = {}
    for part in parts:
        _merge(out, copy.deepcopy(part))
    return out


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def sets(*exprs: str) -> dict[str, Any]:
    """`--set a=b --set c=d` as Helm parses them."""
    return merged(*(helm.parse_set_string(e) for e in exprs))


def arg_value(argv: list[str], flag: str) -> str:
    i = argv.index(flag)
    return argv[i + 1]


# ---- schemas for the CRD kinds ---------------------------------------------------------------
# Structural, as the CRDs' openAPIV3Schema are: the API server drops fields a CRD does not know,
# so a misspelt field would vanish silently there; here it fails.

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}


def obj(props: dict[str, Any], *required: str, open_: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": open_}


def arr(items: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **kw}


METADATA = obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.:]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string", "pattern": DNS_LABEL},
                "labels": {"type": "object", "additionalProperties": STR},
                "annotations": {"type": "object", "additionalProperties": STR}}, "name")


def resource(spec: dict[str, Any]) -> dict[str, Any]:
    return obj({"apiVersion": STR, "kind": STR, "metadata": METADATA, "spec": spec}, "apiVersion", "kind",
               "metadata", "spec")


POOL_REF = obj({"group": {"type": "string", "pattern": GROUP}, "kind": {"type": "string", "pattern": KIND},
                "name": {"type": "string", "minLength": 1, "maxLength": 253}}, "name")
FAILURE_MODE = {"enum": ["FailOpen", "FailClose"]}
MATCH_LABELS = {"type": "object", "minProperties": 1,
                "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE}}
OBJECTIVE = resource(obj({"priority": INT, "poolRef": POOL_REF}, "poolRef"))
REWRITE = resource(obj({
    "poolRef": POOL_REF,
    "rules": arr(obj({
        "matches": arr(obj({"model": obj({"type": {"enum": ["Exact"]}, "value": {"type": "string", "minLength": 1}},
                                         "value")}, "model")),
        "targets": arr(obj({"modelRewrite": STR, "weight": {"type": "integer", "minimum": 1, "maximum": 1000000}},
                           "modelRewrite"), minItems=1),
    })),
}, "poolRef", "rules"))
PARENT_REF = obj({"group": {"type": "string", "pattern": GROUP}, "kind": {"type": "string", "pattern": KIND},
                  "name": {"type": "string", "minLength": 1}, "namespace": {"type": "string", "pattern": DNS_LABEL},
                  "sectionName": STR, "port": PORT}, "name")
BACKEND_REF = obj({"group": {"type": "string", "pattern": GROUP}, "kind": {"type": "string", "pattern": KIND},
                   "name": {"type": "string", "minLength": 1}, "namespace": {"type": "string", "pattern": DNS_LABEL},
                   "port": PORT, "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}}, "name")
HTTP_MATCH = obj({
    "path": obj({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]}, "value": STR}),
    "headers": arr(obj({"type": {"enum": ["Exact", "RegularExpression"]}, "name": STR, "value": STR}, "name", "value"),
                   maxItems=16),
})
TARGET_REF = obj({"group": {"type": "string", "pattern": GROUP}, "kind": STR, "name": STR, "namespace": STR},
                 "group", "kind", "name")
MONITOR_AUTH_SECRET = obj({"name": STR, "key": STR}, "name", "key")

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): resource(obj({
        "targetPorts": arr(obj({"number": PORT}, "number"), minItems=1, maxItems=8),
        "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
        "selector": obj({"matchLabels": MATCH_LABELS}, "matchLabels"),
        "endpointPickerRef": obj({"group": {"type": "string", "pattern": GROUP},
                                  "kind": {"type": "string", "pattern": KIND},
                                  "name": {"type": "string", "minLength": 1, "maxLength": 253},
                                  "port": obj({"number": PORT}, "number"),
                                  "failureMode": FAILURE_MODE}, "name", "port"),
    }, "targetPorts", "selector", "endpointPickerRef")),
    ("inference.networking.x-k8s.io/v1alpha2", "InferencePool"): resource(obj({
        "targetPortNumber": PORT,
        "selector": MATCH_LABELS,
        "extensionRef": obj({"group": STR, "kind": STR, "name": {"type": "string", "minLength": 1},
                             "portNumber": PORT, "failureMode": FAILURE_MODE}, "name"),
    }, "targetPortNumber", "selector", "extensionRef")),
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): OBJECTIVE,
    ("llm-d.ai/v1alpha2", "InferenceObjective"): OBJECTIVE,
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite"): REWRITE,
    ("llm-d.ai/v1alpha2", "InferenceModelRewrite"): REWRITE,
    ("gateway.networking.k8s.io/v1", "Gateway"): resource(obj({
        "gatewayClassName": {"type": "string", "minLength": 1},
        "listeners": arr(obj({"name": {"type": "string", "pattern": DNS_LABEL}, "protocol": STR, "port": PORT,
                              "hostname": STR}, "name", "protocol", "port"), minItems=1, maxItems=64),
    }, "gatewayClassName", "listeners")),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): resource(obj({
        "parentRefs": arr(PARENT_REF, maxItems=32),
        "hostnames": arr(STR),
        "rules": arr(obj({"matches": arr(HTTP_MATCH, maxItems=64), "backendRefs": arr(BACKEND_REF, maxItems=16),
                          "timeouts": obj({"request": DURATION, "backendRequest": DURATION})}), maxItems=16),
    })),
    ("networking.gke.io/v1", "HealthCheckPolicy"): resource(obj({
        "targetRef": TARGET_REF,
        "default": obj({
            "timeoutSec": {"type": "integer", "minimum": 1, "maximum": 300},
            "checkIntervalSec": {"type": "integer", "minimum": 1, "maximum": 300},
            "config": obj({
                "type": {"enum": ["HTTP", "HTTPS", "HTTP2", "GRPC", "TCP"]},
                "httpHealthCheck": obj({"requestPath": STR, "port": PORT, "portSpecification": STR}),
                "grpcHealthCheck": obj({"portSpecification": {"enum": ["USE_FIXED_PORT", "USE_NAMED_PORT",
                                                                       "USE_SERVING_PORT"]},
                                        "port": PORT, "grpcServiceName": STR}),
            }, "type"),
        }),
    }, "targetRef")),
    ("networking.gke.io/v1", "GCPBackendPolicy"): resource(obj({
        "targetRef": TARGET_REF,
        "default": obj({"timeoutSec": {"type": "integer", "minimum": 1, "maximum": 86400},
                        "logging": obj({"enabled": BOOL, "sampleRate": INT})}),
    }, "targetRef")),
    ("networking.istio.io/v1beta1", "DestinationRule"): resource(obj({
        "host": {"type": "string", "minLength": 1},
        "trafficPolicy": obj({"tls": obj({"mode": {"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
                                          "insecureSkipVerify": BOOL}),
                              "connectionPool": {"type": "object"}}),
    }, "host")),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): resource(obj({
        "jobLabel": STR,
        "namespaceSelector": obj({"matchNames": arr(STR), "any": BOOL}),
        "selector": obj({"matchLabels": MATCH_LABELS}, "matchLabels"),
        "endpoints": arr(obj({"port": STR, "path": STR, "interval": DURATION, "scheme": {"enum": ["http", "https"]},
                              "authorization": obj({"type": STR, "credentials": MONITOR_AUTH_SECRET})}),
                         minItems=1),
    }, "selector", "endpoints")),
    ("monitoring.googleapis.com/v1", "PodMonitoring"): resource(obj({
        "selector": obj({"matchLabels": MATCH_LABELS}, "matchLabels"),
        "endpoints": arr(obj({"port": STR, "scheme": {"enum": ["http", "https"]}, "path": STR, "interval": DURATION,
                              "authorization": obj({"type": {"enum": ["Bearer"]},
                                                    "credentials": obj({"secret": MONITOR_AUTH_SECRET}, "secret")})},
                             "port"), minItems=1),
    }, "selector", "endpoints")),
}


def check_schema(doc: dict[str, Any]) -> None:
    """Core kinds against Kubernetes' own schemas; CRD kinds against SCHEMAS. Anything else fails."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in SCHEMAS:
        jsonschema.validate(doc, SCHEMAS[key])
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"no schema for {key}: add one to SCHEMAS")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{key} {doc['metadata'].get('name')} is invalid for Kubernetes {version}: {e.message}")


# ---- the same kinds against published schemas (npm's kubernetes-models) ------------------------
# Gateway API, GKE, Istio and Prometheus Operator publish their CRDs; the kubernetes-models
# packages compile them into validators. They check types, enums and limits (not unknown fields,
# which SCHEMAS does). Installed once into build/ with npm, pinned.

NPM_MODELS = ("@kubernetes-models/gateway-api@2.0.0", "@kubernetes-models/gke@4.6.2",
              "@kubernetes-models/istio@3.0.1", "@kubernetes-models/prometheus-operator@6.0.0")
PUBLISHED = {
    "gateway.networking.k8s.io/v1/Gateway": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway",
    "gateway.networking.k8s.io/v1/HTTPRoute": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute",
    "networking.gke.io/v1/HealthCheckPolicy": "@kubernetes-models/gke/networking.gke.io/v1/HealthCheckPolicy",
    "networking.gke.io/v1/GCPBackendPolicy": "@kubernetes-models/gke/networking.gke.io/v1/GCPBackendPolicy",
    "networking.istio.io/v1beta1/DestinationRule":
        "@kubernetes-models/istio/networking.istio.io/v1beta1/DestinationRule",
    "monitoring.coreos.com/v1/ServiceMonitor":
        "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
}
VALIDATOR = """
import { readFileSync } from "node:fs";
const models = JSON.parse(process.argv[2]);
const out = [];
for (const doc of JSON.parse(readFileSync(0, "utf8"))) {
  const kind = (await import(models[`${doc.apiVersion}/${doc.kind}`]))[doc.kind];
  try { new kind(doc).validate(); out.push(null); } catch (e) { out.push(String(e.message)); }
}
process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="session")
def published_schemas():
    """validate(docs) -> one error message (or None) per doc, from the published validators."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed for the published Gateway API / GKE / Istio schemas")
    where = ROOT / "build" / "k8s-models"
    stamp = where / "installed.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != list(NPM_MODELS):
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(where), "--no-audit", "--no-fund", "--loglevel=error",
                        *NPM_MODELS], check=True, capture_output=True, timeout=300)
        stamp.write_text(json.dumps(list(NPM_MODELS)))
    script = where / "validate.mjs"
    script.write_text(VALIDATOR)

    def validate(docs: list[dict[str, Any]]) -> list[str | None]:
        done = subprocess.run(["node", str(script), json.dumps(PUBLISHED)], input=json.dumps(docs), text=True,
                              capture_output=True, check=True, timeout=60)
        return json.loads(done.stdout)

    return validate


def published(doc: dict[str, Any]) -> bool:
    return f"{doc.get('apiVersion')}/{doc.get('kind')}" in PUBLISHED


# ---- values sets an operator would use -------------------------------------------------------

GIE_V15_VALUES = yaml.safe_load("""
inferenceExtension:
  replicas: 1
  image:
    registry: us-docker.pkg.dev/my-project/inference
    repository: epp
    tag: v1.2.3
    pullPolicy: Always
  extProcPort: 9002
  failureMode: FailClose
  env:
    - name: FEATURE_FLAG_ENABLED
      value: "true"
  pluginsConfigFile: custom-plugins.yaml
  pluginsCustomConfig:
    custom-plugins.yaml: |
      apiVersion: inference.networking.x-k8s.io/v1alpha1
      kind: EndpointPickerConfig
      plugins:
      - type: queue-scorer
      - type: kv-cache-utilization-scorer
      - type: prefix-cache-scorer
      schedulingProfiles:
      - name: default
        plugins:
        - pluginRef: queue-scorer
          weight: 2
        - pluginRef: kv-cache-utilization-scorer
          weight: 2
        - pluginRef: prefix-cache-scorer
          weight: 3
  extraContainerPorts:
    - name: zmq
      containerPort: 5557
      protocol: TCP
  extraServicePorts:
    - name: zmq
      port: 5557
      protocol: TCP
  flags:
    v: 3
    secure-serving: false
  resources:
    requests:
      cpu: "4"
      memory: 8Gi
    limits:
      memory: 16Gi
  monitoring:
    interval: 10s
    prometheus:
      enabled: true
      auth:
        enabled: true
        secretName: inference-gateway-sa-metrics-reader-secret
inferencePool:
  targetPorts:
    - number: 8000
  modelServerType: vllm
  modelServers:
    matchLabels:
      app: vllm-llama3-8b-instruct
provider:
  name: gke
inferenceObjectives:
  - name: high-priority
    priority: 5
""")

GIE_V10_VALUES = yaml.safe_load("""
inferenceExtension:
  replicas: 1
  image:
    name: epp
    hub: registry.example.com/inference
    tag: v1.0.0
    pullPolicy: Always
  extProcPort: 9002
  flags:
    - name: v
      value: 1
inferencePool:
  targetPortNumber: 8080
  modelServerType: triton-tensorrt-llm
  modelServers:
    matchLabels:
      app: triton-llama
provider:
  name: gke
""")

LLMD_VALUES = yaml.safe_load("""
router:
  modelServers:
    matchLabels:
      app: vllm-qwen3-32b
    type: sglang
    targetPorts:
      - number: 30000
  inferencePool:
    failureMode: FailClosed
  inferenceObjectives:
    - name: high-priority
      priority: 100
    - name: background-batch
      priority: -10
  epp:
    replicas: 3
    image:
      registry: my-registry.io
      repository: my-epp
      tag: v0.10.0
      pullPolicy: IfNotPresent
    flags:
      v: 3
    env:
      - name: POD_IP
        valueFrom:
          fieldRef:
            fieldPath: status.podIP
    resources:
      requests:
        cpu: "8"
        memory: 16Gi
  monitoring:
    prometheus:
      enabled: true
provider:
  name: istio
httpRoute:
  create: true
  inferenceGatewayName: my-company-gateway
  inferenceGatewayNamespace: gateway-infra
  requestTimeout: 120s
""")

VALUE_SETS = {
    "defaults": POOL,
    "sglang": merged(POOL, {"inferencePool": {"modelServerType": "sglang"}}),
    "triton-tensorrt-llm": merged(POOL, {"inferencePool": {"modelServerType": "triton-tensorrt-llm"}}),
    "trtllm-serve": merged(POOL, {"inferencePool": {"modelServerType": "trtllm-serve"}}),
    "gke": merged(POOL, {"provider": {"name": "gke"}}),
    "gke-monitoring-autopilot": merged(POOL, sets("provider.name=gke", "provider.gke.autopilot=true",
                                                  "inferenceExtension.monitoring.prometheus.enabled=true")),
    "istio": merged(POOL, {"provider": {"name": "istio"}}),
    "ha": merged(POOL, {"inferenceExtension": {"replicas": 3}}),
    "monitoring": merged(POOL, sets("inferenceExtension.monitoring.prometheus.enabled=true")),
    "metrics-auth-off": merged(POOL, sets("inferenceExtension.monitoring.prometheus.enabled=true",
                                          "inferenceExtension.monitoring.prometheus.auth.enabled=false")),
    "hpa-gke": merged(POOL, sets("provider.name=gke", "autoscaling.enabled=true",
                                 f"autoscaling.scaleTargetRef.name={RELEASE}")),
    "hpa-prometheus-adapter": merged(POOL, sets("autoscaling.enabled=true",
                                                f"autoscaling.scaleTargetRef.name={RELEASE}")),
    "alpha-pool": merged(POOL, sets("inferencePool.apiVersion=inference.networking.x-k8s.io/v1alpha2")),
    "several-ports": merged(POOL, {"inferencePool": {"targetPorts": [{"number": 8000}, {"number": 8001}]}}),
    "httproute": merged(POOL, sets("experimentalHttpRoute.enabled=true", "experimentalHttpRoute.baseModel=llama")),
    "objectives": merged(POOL, {"inferenceObjectives": [{"name": "food-review", "priority": 10},
                                                        {"name": "batch", "priority": -1}]}),
    "health-port": merged(POOL, sets("provider.name=gke", "inferenceExtension.grpcHealthPort=9103")),
    "pool-less": merged(POOL, sets("inferenceExtension.endpointsServer.createInferencePool=false")),
    "gie-v1.5-file": GIE_V15_VALUES,
    "gie-v1.0-file": GIE_V10_VALUES,
    "llm-d-router-file": LLMD_VALUES,
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


# ---- every render, every example: valid ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_schema_valid(rendered, name):
    docs = rendered[name]
    assert docs
    for doc in docs:
        check_schema(doc)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects in {name}"


def test_helm_lint_is_clean():
    result = helm.lint(CHART, POOL, strict=True)
    assert result["errors"] == [], result
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result["messages"]


def example_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def test_every_example_is_schema_valid():
    docs = example_docs()
    assert {f for f, _ in docs} == {p.name for p in EXAMPLES.glob("*.yaml")}
    for _, doc in docs:
        check_schema(doc)


def test_gateway_gke_istio_and_monitor_kinds_pass_their_published_schemas(rendered, published_schemas):
    docs = [d for name in sorted(rendered) for d in rendered[name] if published(d)]
    docs += [d for _, d in example_docs() if published(d)]
    assert {f"{d['apiVersion']}/{d['kind']}" for d in docs} == set(PUBLISHED)
    errors = published_schemas(docs)
    assert [(d["kind"], d["metadata"]["name"], e) for d, e in zip(docs, errors, strict=True) if e] == []
    # They do reject what the Gateway API does not allow: the rollout guide's `rules:` as a mapping.
    (route,) = [d for f, d in example_docs() if f == "rollout-node-update.yaml" and d["kind"] == "HTTPRoute"]
    bad = copy.deepcopy(route)
    bad["spec"]["rules"] = bad["spec"]["rules"][0]
    bad_policy = copy.deepcopy(one(rendered["gke"], "HealthCheckPolicy"))
    bad_policy["spec"]["default"]["config"]["type"] = "HTTP3"
    assert all(published_schemas([bad, bad_policy]))


def test_schema_checks_catch_mistakes():
    """The structural schemas are not vacuous: a misspelt or mistyped field fails."""
    pool = one(render(POOL), "InferencePool")
    bad = copy.deepcopy(pool)
    bad["spec"]["endpointPickerRef"]["failuremode"] = "FailOpen"
    with pytest.raises(jsonschema.ValidationError):
        check_schema(bad)
    bad = copy.deepcopy(pool)
    bad["spec"]["targetPorts"] = [{"number": 70000}]
    with pytest.raises(jsonschema.ValidationError):
        check_schema(bad)
    (route,) = [d for f, d in example_docs() if f == "gateway.yaml" and d["kind"] == "HTTPRoute"]
    bad = copy.deepcopy(route)
    bad["spec"]["rules"] = {"backendRefs": bad["spec"]["rules"][0]["backendRefs"]}  # the rollout guide's typo
    with pytest.raises(jsonschema.ValidationError):
        check_schema(bad)


# ---- what a default install creates -----------------------------------------------------------


def test_default_install_creates_the_pool_and_its_picker(rendered):
    docs = rendered["defaults"]
    assert kinds(docs) == sorted([
        "InferencePool", "Deployment", "Service", "ConfigMap", "ServiceAccount",
        "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
    ])
    pool = one(docs, "InferencePool", RELEASE)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["namespace"] == NAMESPACE
    assert pool["spec"]["selector"] == {"matchLabels": {"app": RELEASE}}
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["appProtocol"] == "http"
    # The pool names the picker's Service and its ext_proc port.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref == {"name": EPP, "port": {"number": 9002}, "failureMode": "FailOpen"}
    svc = one(docs, "Service", EPP)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc-ext-proc": 9002, "http-metrics": 9090}


def test_default_args_are_upstreams(rendered):
    """The Deployment's args: upstream's chart's, plus the ports stated explicitly."""
    assert args(rendered["defaults"]) == [
        "--pool-name", RELEASE,
        "--pool-namespace", NAMESPACE,
        "--pool-group", "inference.networking.k8s.io",
        "--zap-encoder", "json",
        "--config-file", "/config/default-plugins.yaml",
        "--grpc-port", "9002",
        "--grpc-health-port", "9003",
        "--metrics-port", "9090",
        "--prefix-index-snapshot=/tmp/epp-prefix-index",  # epp's own: the index outlives a container restart
        "--tracing=false",
    ]


def test_the_prefix_index_snapshot_is_in_the_pods_tmp_and_can_be_turned_off():
    """/tmp is the pod's emptyDir (it outlives the container); the value turns it off, a flag moves it."""
    off = args(render(merged(POOL, {"inferenceExtension": {"prefixIndexSnapshot": {"enabled": False}}})))
    assert not [a for a in off if a.startswith("--prefix-index-snapshot")]
    moved = args(render(merged(POOL, {"inferenceExtension": {"flags": {"prefix-index-snapshot": "/data/index"}}})))
    assert [a for a in moved if a.startswith("--prefix-index-snapshot")] == ["--prefix-index-snapshot=/data/index"]


def test_image_defaults_to_epp_at_the_charts_app_version(rendered):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    # The chart's default tag is the version of the epp it was written for.
    assert app_version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    container = epp_container(rendered["defaults"])
    assert container["image"] == f"epp:{app_version}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    docs = render(merged(POOL, sets("inferenceExtension.image.registry=us-docker.pkg.dev/p/r",
                                    "inferenceExtension.image.tag=abc123")))
    assert epp_container(docs)["image"] == "us-docker.pkg.dev/p/r/epp:abc123"


@pytest.mark.parametrize(("model_server_type", "expected"), [
    ("vllm", []),
    ("sglang", [
        '--total-queued-requests-metric="sglang:num_queue_reqs"',
        '--total-running-requests-metric="sglang:num_running_reqs"',
        '--kv-cache-usage-percentage-metric="sglang:token_usage"',
        '--cache-info-metric="sglang:cache_config_info"',
    ]),
    ("triton-tensorrt-llm", [
        "--total-queued-requests-metric", "nv_trt_llm_request_metrics{request_type=waiting}",
        "--total-running-requests-metric", "nv_trt_llm_request_metrics{request_type=scheduled}",
        "--kv-cache-usage-percentage-metric", "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",
        "--lora-info-metric", "",
    ]),
    ("trtllm-serve", [
        '--total-queued-requests-metric="trtllm_num_requests_waiting"',
        '--total-running-requests-metric="trtllm_num_requests_running"',
        '--kv-cache-usage-percentage-metric="trtllm_kv_cache_utilization"',
        '--cache-info-metric="trtllm_cache_config_info"',
        '--model-server-metrics-path="/prometheus/metrics"',
        "--lora-info-metric", "",
    ]),
])
def test_model_server_type_passes_upstreams_metric_flags(rendered, model_server_type, expected):
    """Between --pool-group's value and --zap-encoder, exactly the flags upstream's chart passes."""
    argv = args(rendered["defaults" if model_server_type == "vllm" else model_server_type])
    start = argv.index("--pool-group") + 2
    assert argv[start:argv.index("--zap-encoder")] == expected


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_epp_accepts_every_rendered_arg(rendered, name):
    """The container's args parse with epp's own command line: no pod dies on an unknown flag."""
    build_parser().parse_args(["serve", *args(rendered[name])])


def test_unknown_model_server_type_fails_clearly():
    assert "modelServerType \"triton\" is not supported" in render_error(
        merged(POOL, {"inferencePool": {"modelServerType": "triton"}}))
    assert "modelServerProtocol \"grpc\" is not supported" in render_error(
        merged(POOL, {"inferencePool": {"modelServerProtocol": "grpc"}}))


# ---- probes, ports, config -------------------------------------------------------------------


def test_probes_ask_upstreams_health_service_names(rendered):
    single = epp_container(rendered["defaults"])
    assert single["livenessProbe"]["grpc"] == {"port": 9003, "service": "inference-extension"}
    assert single["readinessProbe"]["grpc"] == {"port": 9003, "service": "inference-extension"}
    ha = epp_container(rendered["ha"])
    assert ha["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert ha["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    ports = {p["name"]: p["containerPort"] for p in single["ports"]}
    assert ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}


def test_a_moved_health_port_moves_everything_that_uses_it(rendered):
    docs = rendered["health-port"]
    c = epp_container(docs)
    assert arg_value(c["args"], "--grpc-health-port") == "9103"
    assert c["readinessProbe"]["grpc"]["port"] == 9103
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc-health"] == 9103
    hc = one(docs, "HealthCheckPolicy", f"{RELEASE}-epp")
    assert hc["spec"]["targetRef"] == {"group": "", "kind": "Service", "name": EPP}
    assert hc["spec"]["default"]["config"]["grpcHealthCheck"]["port"] == 9103


def test_a_moved_ext_proc_port_is_where_the_container_listens():
    docs = render(merged(POOL, sets("inferenceExtension.extProcPort=9102")))
    c = epp_container(docs)
    assert arg_value(c["args"], "--grpc-port") == "9102"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == 9102
    (svc_port,) = [p for p in one(docs, "Service", EPP)["spec"]["ports"] if p["name"] == "grpc-ext-proc"]
    assert svc_port["port"] == 9102
    assert svc_port["targetPort"] == "grpc"
    assert one(docs, "InferencePool")["spec"]["endpointPickerRef"]["port"] == {"number": 9102}


def test_service_selects_the_picker_pods_and_speaks_h2(rendered):
    docs = rendered["defaults"]
    svc = one(docs, "Service", EPP)
    labels = one(docs, "Deployment", EPP)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert one(docs, "Deployment", EPP)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (grpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc"]
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    container_ports = {p["name"] for p in epp_container(docs)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


@pytest.mark.parametrize("name", ["defaults", "gie-v1.5-file"])
def test_config_map_is_mounted_where_config_file_points(rendered, name):
    docs = rendered[name]
    deployment = one(docs, "Deployment", EPP)
    pod = deployment["spec"]["template"]["spec"]
    container = epp_container(docs)
    config_file = arg_value(container["args"], "--config-file")
    (mount,) = [m for m in container["volumeMounts"] if config_file.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    cm = one(docs, "ConfigMap", volume["configMap"]["name"])
    key = config_file[len(mount["mountPath"].rstrip("/")) + 1:]
    assert key in cm["data"]
    # epp loads it: the file it will read is a valid EndpointPickerConfig.
    picker_config.load_text(cm["data"][key], key)


def test_default_config_is_epps_default_profile(rendered):
    cm = one(rendered["defaults"], "ConfigMap", EPP)
    assert yaml.safe_load(cm["data"]["default-plugins.yaml"]) == yaml.safe_load(picker_config.DEFAULT_CONFIG)


def test_a_config_file_that_is_not_there_fails_clearly():
    msg = render_error(merged(POOL, sets("inferenceExtension.pluginsConfigFile=mine.yaml")))
    assert 'pluginsConfigFile "mine.yaml" names no file' in msg


def test_a_config_change_restarts_the_pickers():
    def checksum(values):
        return one(render(values), "Deployment", EPP)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    custom = {"inferenceExtension": {"pluginsCustomConfig": {"x.yaml": "plugins: []\n"}}}
    assert checksum(POOL) != checksum(merged(POOL, custom))
    assert checksum(POOL) == checksum(copy.deepcopy(POOL))


def test_pod_runs_non_root_on_a_read_only_root(rendered):
    docs = rendered["defaults"]
    pod = one(docs, "Deployment", EPP)["spec"]["template"]["spec"]
    c = epp_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert {e["name"] for e in c["env"]} >= {"NAMESPACE", "POD_NAME"}


# ---- RBAC ------------------------------------------------------------------------------------


def granted(docs: list[dict[str, Any]], sa: str = EPP) -> set[tuple[str, str, str, str]]:
    """(scope, apiGroup, resource-or-URL, verb) the ServiceAccount gets, through any binding."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = set()
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        role = roles[(ref["kind"], ref["name"])]
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        for rule in role["rules"]:
            targets = rule.get("resources", []) + rule.get("nonResourceURLs", [])
            for group in rule.get("apiGroups", ["(url)"]):
                for t in targets:
                    for verb in rule["verbs"]:
                        assert "*" not in (group, t, verb), f"wildcard in {ref}"
                        out.add((scope, group, t, verb))
    return out


def read(scope: str, group: str, *resources: str) -> set[tuple[str, str, str, str]]:
    return {(scope, group, r, v) for r in resources for v in ("get", "list", "watch")}


EPP_READS = (
    read(NAMESPACE, "", "pods")
    | read(NAMESPACE, "inference.networking.k8s.io", "inferencepools")
    | read(NAMESPACE, "inference.networking.x-k8s.io", "inferenceobjectives", "inferencemodelrewrites")
    | read(NAMESPACE, "llm-d.ai", "inferenceobjectives", "inferencemodelrewrites")
)
METRICS_AUTH = {("cluster", "authentication.k8s.io", "tokenreviews", "create"),
                ("cluster", "authorization.k8s.io", "subjectaccessreviews", "create")}
LEASES = {(NAMESPACE, "coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def test_epp_gets_exactly_what_it_reads(rendered):
    assert granted(rendered["defaults"]) == EPP_READS | METRICS_AUTH
    service_account = one(rendered["defaults"], "ServiceAccount", EPP)
    pod = one(rendered["defaults"], "Deployment", EPP)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == service_account["metadata"]["name"]


def test_leader_election_adds_only_its_lease_verbs(rendered):
    assert granted(rendered["ha"]) == EPP_READS | METRICS_AUTH | LEASES
    argv = args(rendered["ha"])
    assert argv.count("--ha-enable-leader-election") == 1
    assert one(rendered["ha"], "Deployment", EPP)["spec"]["replicas"] == 3


def test_active_active_replicas_take_no_lease():
    """llm-d's active-active mode: replicas > 1 with the flag set false."""
    docs = render(merged(POOL, {"inferenceExtension": {"replicas": 2,
                                                       "flags": {"ha-enable-leader-election": False}}}))
    argv = args(docs)
    assert "--ha-enable-leader-election" not in argv
    assert "--ha-enable-leader-election=false" in argv
    assert not any(g[1] == "coordination.k8s.io" for g in granted(docs))


def test_metrics_auth_off_needs_no_cluster_grant(rendered):
    docs = rendered["metrics-auth-off"]
    assert granted(docs) == EPP_READS
    assert "--metrics-endpoint-auth=false" in args(docs)
    monitor = one(docs, "ServiceMonitor")
    assert "authorization" not in monitor["spec"]["endpoints"][0]


def test_alpha_pool_reads_its_own_group(rendered):
    docs = rendered["alpha-pool"]
    reads = {g for g in granted(docs) if g[2] == "inferencepools"}
    assert reads == read(NAMESPACE, "inference.networking.x-k8s.io", "inferencepools")
    assert arg_value(args(docs), "--pool-group") == "inference.networking.x-k8s.io"
    pool = one(docs, "InferencePool")
    assert pool["spec"] == {"targetPortNumber": 8000, "selector": {"app": RELEASE},
                            "extensionRef": {"name": EPP, "portNumber": 9002, "failureMode": "FailOpen"}}


# ---- metrics and the metrics reader ----------------------------------------------------------


def assert_guides_metrics_reader(docs: list[dict[str, Any]]) -> None:
    sa = one(docs, "ServiceAccount", "inference-gateway-sa-metrics-reader")
    assert sa["metadata"]["namespace"] == NAMESPACE
    role = one(docs, "ClusterRole", "inference-gateway-metrics-reader")
    assert role["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    one(docs, "ClusterRoleBinding", "inference-gateway-sa-metrics-reader-role-binding")
    assert granted(docs, "inference-gateway-sa-metrics-reader") == {("cluster", "(url)", "/metrics", "get")}
    secret = one(docs, "Secret", "inference-gateway-sa-metrics-reader-secret")
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": sa["metadata"]["name"]}


def test_prometheus_operator_scrapes_with_the_metrics_readers_token(rendered):
    docs = rendered["monitoring"]
    assert_guides_metrics_reader(docs)
    monitor = one(docs, "ServiceMonitor", f"{EPP}-monitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "inference-gateway-sa-metrics-reader-secret",
                                                        "key": "token"}
    svc = one(docs, "Service", EPP)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert "http-metrics" in {p["name"] for p in svc["spec"]["ports"]}
    # epp's own identity gets nothing more for it.
    assert granted(docs) == EPP_READS | METRICS_AUTH


def test_gke_managed_prometheus_scrapes_the_pods_with_that_token(rendered):
    docs = rendered["gke-monitoring-autopilot"]
    assert_guides_metrics_reader(docs)
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    mon = one(docs, "PodMonitoring")
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in epp_container(docs)["ports"]}
    assert endpoint["authorization"]["credentials"]["secret"] == {
        "name": "inference-gateway-sa-metrics-reader-secret", "key": "token"}
    pod_labels = one(docs, "Deployment", EPP)["spec"]["template"]["metadata"]["labels"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The collector (Autopilot: in gke-gmp-system) may read that one Secret, nothing else.
    grants = granted(docs, "collector")
    assert grants == read(NAMESPACE, "", "secrets")
    (role,) = [d for d in docs if d["kind"] == "Role" and d["rules"][0].get("resources") == ["secrets"]]
    assert role["rules"][0]["resourceNames"] == ["inference-gateway-sa-metrics-reader-secret"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["subjects"][0]["name"] == "collector"]
    assert binding["subjects"][0]["namespace"] == "gke-gmp-system"


def test_metrics_reader_can_be_left_to_the_guides_manifest():
    docs = render(merged(POOL, sets("inferenceExtension.monitoring.prometheus.enabled=true",
                                    "metricsReader.create=false")))
    assert not [d for d in docs if "metrics-reader" in d["metadata"]["name"]]
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]["credentials"]["name"] == \
        "inference-gateway-sa-metrics-reader-secret"


# ---- providers -------------------------------------------------------------------------------


def test_gke_provider_health_checks_the_model_servers(rendered):
    docs = rendered["gke"]
    hc = one(docs, "HealthCheckPolicy", RELEASE)
    assert hc["spec"]["targetRef"] == {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                       "name": RELEASE}
    assert hc["spec"]["default"]["config"] == {"type": "HTTP",
                                               "httpHealthCheck": {"requestPath": "/health", "port": 8000}}
    bp = one(docs, "GCPBackendPolicy", RELEASE)
    assert bp["spec"]["targetRef"] == hc["spec"]["targetRef"]
    assert bp["spec"]["default"]["timeoutSec"] == 300
    # GKE checks the picker on 9003 by default: no policy for it then.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "HealthCheckPolicy"] == [RELEASE]


def test_istio_provider_reaches_epp_over_tls(rendered):
    dr = one(rendered["istio"], "DestinationRule", EPP)
    assert dr["spec"]["host"] == f"{EPP}.{NAMESPACE}.svc.cluster.local"
    assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    plain = one(render(merged(POOL, {"provider": {"name": "istio"},
                                     "inferenceExtension": {"flags": {"secure-serving": False}}})), "DestinationRule")
    assert "tls" not in plain["spec"].get("trafficPolicy", {})


def test_chart_httproute_sends_the_gateways_traffic_to_the_pool(rendered):
    route = one(rendered["httproute"], "HTTPRoute", RELEASE)
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gateway"}]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": RELEASE}]
    assert rule["matches"][0]["headers"] == [{"type": "Exact", "name": "X-Gateway-Base-Model-Name",
                                              "value": "llama"}]
    assert rule["timeouts"] == {"request": "300s"}


# ---- autoscaling -----------------------------------------------------------------------------


def test_hpa_scales_the_model_servers_on_the_pools_queue_and_kv_cache(rendered):
    hpa = one(rendered["hpa-gke"], "HorizontalPodAutoscaler", RELEASE)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 10)
    metrics = {m["external"]["metric"]["name"]: m for m in hpa["spec"]["metrics"]}
    assert set(metrics) == {"prometheus.googleapis.com|inference_pool_average_queue_size|gauge",
                            "prometheus.googleapis.com|inference_pool_average_kv_cache_utilization|gauge"}
    for m in metrics.values():
        assert m["type"] == "External"
        assert m["external"]["metric"]["selector"] == {"matchLabels": {"metric.labels.name": RELEASE}}
    assert metrics["prometheus.googleapis.com|inference_pool_average_queue_size|gauge"]["external"]["target"] == \
        {"type": "Value", "value": "5"}
    assert metrics["prometheus.googleapis.com|inference_pool_average_kv_cache_utilization|gauge"]["external"][
        "target"] == {"type": "Value", "value": "0.8"}
    adapter = one(rendered["hpa-prometheus-adapter"], "HorizontalPodAutoscaler")
    assert {m["external"]["metric"]["name"]: m["external"]["metric"]["selector"]
            for m in adapter["spec"]["metrics"]} == {
        "inference_pool_average_queue_size": {"matchLabels": {"name": RELEASE}},
        "inference_pool_average_kv_cache_utilization": {"matchLabels": {"name": RELEASE}},
    }
    assert not [d for d in rendered["defaults"] if d["kind"] == "HorizontalPodAutoscaler"]


def test_hpa_without_a_target_fails_clearly():
    assert "autoscaling.scaleTargetRef.name is required" in render_error(merged(POOL, sets("autoscaling.enabled=true")))


# ---- upstream's values files -----------------------------------------------------------------


def test_gie_v15_values_file_works_unchanged(rendered):
    docs = rendered["gie-v1.5-file"]
    c = epp_container(docs)
    assert c["image"] == "us-docker.pkg.dev/my-project/inference/epp:v1.2.3"
    assert c["imagePullPolicy"] == "Always"
    assert "--v=3" in c["args"]
    assert "--secure-serving=false" in c["args"]
    assert arg_value(c["args"], "--config-file") == "/config/custom-plugins.yaml"
    assert {"name": "FEATURE_FLAG_ENABLED", "value": "true"} in c["env"]
    assert {"name": "zmq", "containerPort": 5557, "protocol": "TCP"} in c["ports"]
    assert {"name": "zmq", "port": 5557, "protocol": "TCP"} in one(docs, "Service", EPP)["spec"]["ports"]
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "8Gi"}
    assert one(docs, "InferencePool")["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    objective = one(docs, "InferenceObjective", "high-priority")
    assert objective["apiVersion"] == "inference.networking.x-k8s.io/v1alpha2"
    assert objective["spec"] == {"priority": 5, "poolRef": {"group": "inference.networking.k8s.io", "name": RELEASE}}
    one(docs, "PodMonitoring")
    one(docs, "HealthCheckPolicy", RELEASE)
    assert c["args"].count("--secure-serving=false") == 1


def test_gie_v10_values_file_works_unchanged(rendered):
    docs = rendered["gie-v1.0-file"]
    c = epp_container(docs)
    assert c["image"] == "registry.example.com/inference/epp:v1.0.0"
    assert "--v=1" in c["args"]
    assert arg_value(c["args"], "--total-queued-requests-metric") == "nv_trt_llm_request_metrics{request_type=waiting}"
    pool = one(docs, "InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]  # the older targetPortNumber
    assert pool["spec"]["selector"]["matchLabels"] == {"app": "triton-llama"}
    hc = one(docs, "HealthCheckPolicy", RELEASE)
    assert hc["spec"]["default"]["config"]["httpHealthCheck"]["port"] == 8080


def test_llm_d_router_values_file_works_unchanged(rendered):
    docs = rendered["llm-d-router-file"]
    c = epp_container(docs)
    assert c["image"] == "my-registry.io/my-epp:v0.10.0"
    assert one(docs, "Deployment", EPP)["spec"]["replicas"] == 3
    assert "--ha-enable-leader-election" in c["args"]
    assert "--v=3" in c["args"]
    assert '--total-queued-requests-metric="sglang:num_queue_reqs"' in c["args"]
    assert c["readinessProbe"]["grpc"]["service"] == "readiness"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
    pool = one(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == {"app": "vllm-qwen3-32b"}
    assert pool["spec"]["targetPorts"] == [{"number": 30000}]
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    objectives = {d["metadata"]["name"]: d for d in docs if d["kind"] == "InferenceObjective"}
    assert {n: (d["apiVersion"], d["spec"]["priority"]) for n, d in objectives.items()} == {
        "high-priority": ("llm-d.ai/v1alpha2", 100), "background-batch": ("llm-d.ai/v1alpha2", -10)}
    route = one(docs, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == "my-company-gateway"
    assert route["spec"]["parentRefs"][0]["namespace"] == "gateway-infra"
    assert route["spec"]["rules"][0]["timeouts"] == {"request": "120s"}
    one(docs, "DestinationRule", EPP)
    one(docs, "ServiceMonitor")
    assert granted(docs) == EPP_READS | METRICS_AUTH | LEASES


def test_router_values_win_over_upstream_gie_values():
    docs = render(merged(POOL, {"inferenceExtension": {"replicas": 2},
                                "router": {"epp": {"replicas": 1},
                                           "monitoring": {"prometheus": {"enabled": True,
                                                                         "auth": {"enabled": False}}}}}))
    assert one(docs, "Deployment", EPP)["spec"]["replicas"] == 1
    assert "--metrics-endpoint-auth=false" in args(docs)


def test_flags_render_as_name_equals_value():
    docs = render(merged(POOL, {"inferenceExtension": {"flags": {"v": 4, "enable-pprof": False,
                                                                 "refresh-metrics-interval": "100ms"}}}))
    argv = args(docs)
    assert [a for a in argv if a.startswith(("--enable-pprof", "--refresh-metrics", "--v="))] == \
        ["--enable-pprof=false", "--refresh-metrics-interval=100ms", "--v=4"]
    assert argv[-1] == "--tracing=false"


def test_tracing_renders_the_flag_and_upstreams_otel_environment():
    docs = render(merged(POOL, sets("inferenceExtension.tracing.enabled=true",
                                    "inferenceExtension.tracing.sampling.samplerArg=0.5")))
    assert args(docs)[-1] == "--tracing=true"
    env = {e["name"]: e.get("value") for e in epp_container(docs)["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://localhost:4317"
    assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.5")
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert "OTEL_TRACES_EXPORTER" not in {e["name"] for e in epp_container(render(POOL))["env"]}


@pytest.mark.parametrize(("values", "message"), [
    ({"inferencePool": {"modelServers": {}}}, "matchLabels is required"),
    (merged(POOL, sets("inferenceExtension.latencyPredictor.enabled=true")), "not supported by epp"),
    (merged(POOL, sets("inferenceExtension.sidecar.enabled=true")), "runs no proxy sidecar"),
    (merged(POOL, sets("inferencePool.parser=anthropic-parser")), 'parser "anthropic-parser" is not supported'),
    (merged(POOL, sets("provider.name=nginx")), 'provider.name "nginx"'),
    (merged(POOL, sets("provider.gke.preferredBackends.enabled=true")), "preferredBackends.enabled: not supported"),
    (merged(POOL, sets("inferenceExtension.failureMode=Fallback")), 'failureMode "Fallback"'),
    (merged(POOL, {"inferencePool": {"targetPorts": [{"number": 8000}, {"number": 8000}]}}), "must be unique"),
    (merged(POOL, {"inferenceExtension": {"resources": None}}), "resources.requests.cpu and .memory are required"),
])
def test_values_epp_cannot_honour_fail_with_the_reason(values, message):
    assert message in render_error(values)


def test_pool_less_mode_selects_pods_by_label(rendered):
    docs = rendered["pool-less"]
    argv = args(docs)
    assert arg_value(argv, "--endpoint-selector") == f"app={RELEASE}"
    assert arg_value(argv, "--endpoint-target-ports") == "8000"
    assert "--pool-name" not in argv
    assert not [d for d in docs if d["kind"] == "InferencePool"]
    assert not any(g[2] == "inferencepools" for g in granted(docs))


def test_several_target_ports_are_one_pool(rendered):
    assert one(rendered["several-ports"], "InferencePool")["spec"]["targetPorts"] == [{"number": 8000},
                                                                                      {"number": 8001}]


# ---- the examples and the guide --------------------------------------------------------------


def route_weights(doc: dict[str, Any]) -> dict[str, int]:
    (rule,) = doc["spec"]["rules"]
    for ref in rule["backendRefs"]:
        assert (ref["group"], ref["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    return {ref["name"]: ref.get("weight", 1) for ref in rule["backendRefs"]}


@pytest.mark.parametrize(("file", "weights"), [
    ("rollout-node-update.yaml", {"llm": 90, "llm-new": 10}),
    ("rollout-base-model.yaml", {"llm-pool": 90, "llm-pool-version-2": 10}),
])
def test_rollouts_split_one_route_across_two_pools(file, weights):
    docs = [d for f, d in example_docs() if f == file]
    route = one(docs, "HTTPRoute", "routes-to-llm")
    assert route_weights(route) == weights
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                            "name": "inference-gateway"}]
    # The new pool's model servers carry the label its Helm release selects (the release name).
    (new_pool,) = [name for name, w in weights.items() if w == 10]
    deployment = one(docs, "Deployment", new_pool)
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": new_pool}
    chart = render(merged({"inferencePool": {"modelServers": {"matchLabels": {"app": new_pool}}}}), name=new_pool)
    assert one(chart, "InferencePool", new_pool)["spec"]["selector"]["matchLabels"] == {"app": new_pool}


def test_lora_rollout_splits_one_model_name_within_the_pool():
    (rewrite,) = [d for f, d in example_docs() if f == "rollout-lora-adapter.yaml"]
    assert rewrite["kind"] == "InferenceModelRewrite"
    (rule,) = rewrite["spec"]["rules"]
    assert rule["matches"] == [{"model": {"type": "Exact", "value": "food-review"}}]
    assert {t["modelRewrite"]: t["weight"] for t in rule["targets"]} == {"food-review-1": 90, "food-review-2": 10}
    assert rewrite["spec"]["poolRef"]["name"] == RELEASE


def test_examples_fit_the_chart_they_sit_beside():
    """The Gateway's route, the objectives and the model servers all meet the pool the guide installs."""
    docs = example_docs()
    pool = one(render(POOL), "InferencePool", RELEASE)
    (route,) = [d for f, d in docs if f == "gateway.yaml" and d["kind"] == "HTTPRoute"]
    (gateway,) = [d for f, d in docs if f == "gateway.yaml" and d["kind"] == "Gateway"]
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    assert route_weights(route) == {RELEASE: 1}
    objectives = [d for f, d in docs if f == "inference-objectives.yaml"]
    assert len({d["spec"]["priority"] for d in objectives}) >= 3
    assert any(d["spec"]["priority"] < 0 for d in objectives)
    assert {d["spec"]["poolRef"]["name"] for d in objectives} == {RELEASE}
    (server,) = [d for f, d in docs if f == "vllm-model-server.yaml"]
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (vllm,) = server["spec"]["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in vllm["ports"]} >= {t["number"] for t in pool["spec"]["targetPorts"]}


def guide_helm_installs() -> list[tuple[str, dict[str, Any]]]:
    """The guide's `helm install` commands of this chart, with their --set values."""
    text = GUIDE.read_text()
    commands = re.findall(r"^helm install .*?(?<!\\)$", text.replace("\\\n", " "), flags=re.M)
    out = []
    for command in commands:
        words = shlex.split(command)
        if "deploy/charts/inferencepool" not in words:
            continue
        values = merged(*(helm.parse_set_string(words[i + 1]) for i, w in enumerate(words) if w == "--set"))
        out.append((words[2], values))
    return out


def test_the_guides_helm_commands_render_valid_manifests():
    installs = guide_helm_installs()
    assert len(installs) >= 3
    for release, values in installs:
        docs = render(values, name=release)
        for doc in docs:
            check_schema(doc)
        build_parser().parse_args(["serve", *args(docs)])
