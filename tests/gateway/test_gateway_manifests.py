"""Reading the gateway's manifests: what is accepted, and what is refused with file:line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from gateway_harness import EXAMPLES, SCENARIOS

from epp.gateway import manifests
from epp.gateway.httproute import PoolRef
from epp.gateway.manifests import ManifestError

GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: my-inference-gateway}
spec:
  gatewayClassName: gke-l7-regional-external-managed
  listeners:
    - {name: http, protocol: HTTP, port: 80}
"""
POOLS = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llm}
spec:
  selector: {matchLabels: {app: llm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: llm-epp, failureMode: FailOpen}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llm-new}
spec:
  selector: {matchLabels: {app: llm-new}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: llm-new-epp}
---
apiVersion: v1
kind: Pod
metadata: {name: llm-0, labels: {app: llm}}
status: {podIP: 127.0.20.1}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: llm}
"""
# The rollout guide's route exactly as GKE prints it: rules as a mapping, parentRef an InferenceGateway.
GKE_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: routes-to-llm
spec:
  parentRefs:
    - name: my-inference-gateway
      group: inference.networking.k8s.io
      kind: InferenceGateway
  rules:
    backendRefs:
    - name: llm
      group: inference.networking.k8s.io
      kind: InferencePool
      weight: 90
    - name: llm-new
      group: inference.networking.k8s.io
      kind: InferencePool
      weight: 10
"""


def write(tmp_path: Path, **files: str) -> str:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return str(tmp_path)


def problems(tmp_path: Path, **files: str) -> list[str]:
    with pytest.raises(ManifestError) as e:
        manifests.load([write(tmp_path, **files)])
    return e.value.problems


# The same route as the error message shows the fix: rules a list.
FIXED_ROUTE = GKE_ROUTE.split("  rules:\n")[0] + """\
  rules:
    - backendRefs:
        - name: llm
          group: inference.networking.k8s.io
          kind: InferencePool
          weight: 90
        - name: llm-new
          group: inference.networking.k8s.io
          kind: InferencePool
          weight: 10
"""


def test_gke_rollout_route_says_rules_must_be_a_list_and_shows_the_fix(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, gateway=GATEWAY, pools=POOLS, route=GKE_ROUTE)
    assert problem.startswith(f"{tmp_path}/route.yaml:11: HTTPRoute routes-to-llm: spec.rules must be a list")
    shown = problem.split("indenting what follows:\n", 1)[1]
    assert yaml.safe_load(shown) == {"rules": [{"backendRefs": [
        {"name": "llm", "group": "inference.networking.k8s.io", "kind": "InferencePool", "weight": 90},
        {"name": "llm-new", "group": "inference.networking.k8s.io", "kind": "InferencePool", "weight": 10}]}]}


def test_the_fixed_gke_route_attaches_to_the_gateway_through_its_inference_gateway_parent(tmp_path: Path) -> None:
    spec = manifests.load([write(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE)])
    (route,) = spec.routes
    assert [lst.name for lst in spec.attachments[route.key]] == ["http"]
    (rule,) = route.rules
    assert [(str(b.pool), b.weight) for b in rule.backends] == [("default/llm", 90), ("default/llm-new", 10)]
    assert spec.pools[PoolRef("default", "llm")].fail_open is True
    assert spec.pools[PoolRef("default", "llm-new")].fail_open is False
    assert [ep.hostport for ep in spec.pools[PoolRef("default", "llm")].snapshot.endpoints] == ["127.0.20.1:8000"]
    assert spec.skipped == {"Deployment": 1}


@pytest.mark.parametrize(("edit", "expected"), [
    (("weight: 10", "weight: -1"), r"route.yaml:\d+: HTTPRoute routes-to-llm: backendRef weight must be an integer"),
    (("name: llm-new\n", "name: llm-newer\n"),
     r"route.yaml:\d+: .*names InferencePool default/llm-newer, which is not in the manifests "
     r"\(InferencePools here: default/llm, default/llm-new\)"),
    (("name: my-inference-gateway", "name: other"), r"route.yaml:7: .*parentRef names InferenceGateway default/other"),
    (("kind: InferencePool\n          weight: 90", "kind: Service\n          weight: 90"),
     r"backendRef to Service .* is not supported: epp gateway routes to InferencePools"),
    (("  rules:\n", "  hostnames: [a.example.com:80]\n  rules:\n"), r"hostname 'a.example.com:80' is not valid"),
])
def test_route_problems_name_their_line(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    route = FIXED_ROUTE.replace(*edit)
    assert route != FIXED_ROUTE
    found = problems(tmp_path, gateway=GATEWAY, pools=POOLS, route=route)
    assert any(re.search(expected, p) for p in found), found


@pytest.mark.parametrize(("extra", "expected"), [
    ("      filters:\n        - type: URLRewrite\n          urlRewrite: {hostname: x}\n",
     "filter type 'URLRewrite' is not supported"),
    ("      timeouts: {request: 10 seconds}\n", "timeouts.request: '10 seconds' is not a Gateway API duration"),
    ("      timeouts: {request: 5s, backendRequest: 10s}\n", "backendRequest must not be longer"),
    ("      sessionPersistence: {type: Cookie}\n", "rules[0].sessionPersistence is not supported"),
    ("      matches:\n        - path: {type: RegularExpression, value: '/v1/(?=chat)'}\n",
     "RE2 (Envoy's regular expressions) has no lookaround"),
])
def test_what_the_gateway_cannot_honour_is_refused_not_ignored(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE + extra)
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, gateway=GATEWAY.replace("HTTP,", "HTTPS,"), pools=POOLS,
                     route=FIXED_ROUTE.replace("weight: 90", "weight: x"),
                     objective="apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
                               "metadata: {name: batch}\nspec: {priority: high, poolRef: {name: llm}}\n")
    assert len(found) == 3, found
    assert any("gateway.yaml:7: Gateway my-inference-gateway: listener http: protocol HTTPS is not supported" in p
               for p in found)
    assert any("objective.yaml:4:" in p and "priority must be an integer" in p for p in found)


def test_an_object_defined_twice_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE, again=FIXED_ROUTE)
    assert found == [f"{tmp_path}/route.yaml:1: HTTPRoute default/routes-to-llm is defined twice (also at "
                     f"{tmp_path}/again.yaml:1); in a cluster the second would replace the first"]


def test_a_backend_in_another_namespace_needs_a_reference_grant(tmp_path: Path) -> None:
    elsewhere = POOLS.replace("metadata: {name: llm-new}", "metadata: {name: llm-new, namespace: v2}")
    route = FIXED_ROUTE.replace("name: llm-new\n", "name: llm-new\n          namespace: v2\n")
    found = problems(tmp_path, gateway=GATEWAY, pools=elsewhere, route=route)
    assert any("crosses namespaces; that needs a ReferenceGrant in namespace v2" in p for p in found), found
    grant = ("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: v2}\n"
             "spec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n"
             "  to: [{group: inference.networking.k8s.io, kind: InferencePool}]\n")
    spec = manifests.load([write(tmp_path, pools=elsewhere, route=route, grant=grant)])
    assert PoolRef("v2", "llm-new") in spec.pools


def test_objectives_and_rewrites_go_to_their_pool_and_must_name_one(tmp_path: Path) -> None:
    objective = ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
                 "metadata: {name: critical}\nspec: {priority: 10, poolRef: {name: llm-new}}\n")
    spec = manifests.load([write(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE, o=objective)])
    assert spec.pools[PoolRef("default", "llm-new")].snapshot.objectives == {"critical": 10}
    assert spec.pools[PoolRef("default", "llm")].snapshot.objectives == {}
    found = problems(tmp_path, o=objective.replace("llm-new", "gone"))
    assert any("o.yaml:1: InferenceObjective 'critical' names InferencePool default/gone" in p for p in found)


def test_body_based_routing_reads_its_base_model_configmaps(tmp_path: Path) -> None:
    cm = ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: qwen\n"
          "  labels: {inference.networking.k8s.io/bbr-managed: 'true'}\n"
          "data:\n  baseModel: Qwen/Qwen3-32B\n  adapters: |\n    - food-review-1\n    - ski-resorts\n")
    spec = manifests.load([write(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE, cm=cm)])
    bm = spec.base_models
    assert (bm.base_of("food-review-1"), bm.base_of("Qwen/Qwen3-32B"), bm.base_of("other")) == (
        "Qwen/Qwen3-32B", "Qwen/Qwen3-32B", "")
    other = cm.replace("name: qwen", "name: other").replace("Qwen/Qwen3-32B", "deepseek/r1")
    found = problems(tmp_path, gateway=GATEWAY, pools=POOLS, route=FIXED_ROUTE, cm=cm, other=other)
    assert any("adapter 'food-review-1' is already listed under base model 'Qwen/Qwen3-32B'" in p for p in found)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_example_scenario_loads(scenario: str) -> None:
    spec = manifests.load([str(EXAMPLES / scenario)])
    assert spec.routes
    assert spec.pools
    assert all(p.snapshot.endpoints for p in spec.pools.values())


def test_a_directory_is_read_recursively_without_hidden_files(tmp_path: Path) -> None:
    sub = tmp_path / "pools"
    sub.mkdir()
    (sub / "pools.yaml").write_text(POOLS)
    (tmp_path / "gateway.yaml").write_text(GATEWAY)
    (tmp_path / ".route.yaml.swp").write_text("not: [yaml")
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert manifests.manifest_files([str(tmp_path)]) == [f"{tmp_path}/gateway.yaml", f"{sub}/pools.yaml"]
    with pytest.raises(ManifestError, match="no such file or directory"):
        manifests.manifest_files([str(tmp_path / "missing")])
