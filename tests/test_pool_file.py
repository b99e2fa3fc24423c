"""--pool-file: InferencePool, Pods, InferenceObjectives and InferenceModelRewrites from manifests.

There is no Kubernetes API server here; the stand-in is the manifests themselves, in
the shapes `kubectl get -o yaml` prints (single documents and `kind: List`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from epp.discovery.manifests import ManifestError, parse
from epp.rewrites import ModelRewrites, RewriteRule
from epp.server import EppServer, ServeOptions
from epp.stack import free_ports

POOL = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: llama, namespace: prod}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp}
"""


def pod(name: str, ip: str | None, *, ready: str = "True", labels: str = "{app: vllm}", ns: str = "prod") -> str:
    status = f"status: {{podIP: {ip}, phase: Running, conditions: [{{type: Ready, status: '{ready}'}}]}}" if ip else ""
    return f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n{status}\n"


def objective(name: str, priority: object, pool: str = "llama") -> str:
    return (f"apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
            f"metadata: {{name: {name}, namespace: prod}}\nspec: {{priority: {priority}, poolRef: {{name: {pool}}}}}\n")


def docs(*parts: str) -> str:
    return "---\n".join(parts)


def test_pool_selects_ready_labelled_pods_in_its_namespace() -> None:
    text = docs(
        POOL,
        pod("a", "10.0.0.1"),
        pod("b", "10.0.0.2", ready="False"),
        pod("c", "10.0.0.3", labels="{app: other}"),
        pod("d", None),  # not scheduled: no IP yet
        pod("e", "10.0.0.5", ns="staging"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vllm}\n",  # other kinds are skipped
    )
    snap = parse(text, "pool.yaml", "llama", "prod")
    assert snap.has_pool
    assert [(e.name, e.hostport, e.ready) for e in snap.endpoints] == [
        ("a", "10.0.0.1:8000", True), ("b", "10.0.0.2:8000", False)]


def test_kubectl_list_output_and_v1alpha2_pool_with_several_ports() -> None:
    text = """\
apiVersion: v1
kind: List
items:
- apiVersion: inference.networking.x-k8s.io/v1alpha2
  kind: InferencePool
  metadata: {name: llama, namespace: prod}
  spec:
    selector: {app: vllm}
    targetPortNumber: 8000
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: prod, labels: {app: vllm}}
  status: {podIP: 10.0.0.1}
"""
    snap = parse(text, "list.yaml", "llama", "prod")
    assert [e.hostport for e in snap.endpoints] == ["10.0.0.1:8000"]
    ranks = parse(docs(POOL.replace("[{number: 8000}]", "[{number: 8000}, {number: 8001}]"), pod("a", "10.0.0.1")),
                  "p", "llama", "prod")
    assert [(e.name, e.hostport) for e in ranks.endpoints] == [
        ("a-rank-0", "10.0.0.1:8000"), ("a-rank-1", "10.0.0.1:8001")]


def test_objectives_of_this_pool_only() -> None:
    snap = parse(docs(objective("batch", -1), objective("chat", 10), objective("x", 5, pool="other"),
                      "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
                      "metadata: {name: plain, namespace: prod}\nspec: {poolRef: {name: llama}}\n"),
                 "o.yaml", "llama", "prod")
    assert not snap.has_pool  # objectives alone: the endpoints come from --endpoints
    assert snap.objectives == {"batch": -1, "chat": 10, "plain": 0}


def test_objective_groups_pool_ref_group_and_active_ports() -> None:
    llmd = objective("batch", 4).replace("inference.networking.x-k8s.io", "llm-d.ai")
    other_group = objective("chat", 1).replace("poolRef: {name: llama}",
                                               "poolRef: {name: llama, group: inference.networking.x-k8s.io}")
    two_ports = POOL.replace("[{number: 8000}]", "[{number: 8000}, {number: 8001}]")
    narrowed = pod("a", "10.0.0.1").replace("labels: {app: vllm}}",
                                            "labels: {app: vllm}, annotations: "
                                            "{inference.networking.k8s.io/active-ports: '8001'}}")
    snap = parse(docs(two_ports, narrowed, objective("batch", -1), llmd, other_group), "p.yaml", "llama", "prod")
    assert snap.objectives == {"batch": 4}  # llm-d.ai's wins the name; a poolRef to another group is not ours
    assert [(e.name, e.hostport) for e in snap.endpoints] == [("a-rank-1", "10.0.0.1:8001")]


REWRITE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: %s, namespace: prod, creationTimestamp: "%s"}
spec:
  poolRef: {name: llama}
  rules:
  - matches: [{model: {value: food-review}}]
    targets:
    - {modelRewrite: %s, weight: 90}
    - {modelRewrite: food-review-v2, weight: 10}
"""


def test_rewrite_precedence_exact_beats_generic_and_oldest_wins() -> None:
    generic = ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n"
               "metadata: {name: catch-all, namespace: prod, creationTimestamp: '2020-01-01T00:00:00Z'}\n"
               "spec: {poolRef: {name: llama}, rules: [{targets: [{modelRewrite: base}]}]}\n")
    text = docs(REWRITE % ("newer", "2026-02-01T00:00:00Z", "from-newer"), generic,
                REWRITE % ("older", "2025-02-01T00:00:00Z", "from-older"))
    rewrites = ModelRewrites(parse(text, "r.yaml", "llama", "prod").rewrites, seed=1)
    assert rewrites.rule_for("food-review").resource == "older"
    assert rewrites.rewrite("anything-else") == ("base", "catch-all")


def test_weighted_split_within_tolerance_seeded() -> None:
    rule = RewriteRule("rollout", frozenset({"food-review"}), ("food-review-v1", "food-review-v2"), (90, 10))
    rewrites = ModelRewrites([rule], seed=42)
    n = 20000
    counts = Counter(rewrites.rewrite("food-review")[0] for _ in range(n))
    assert counts["food-review-v2"] / n == pytest.approx(0.10, abs=0.01)
    assert rewrites.rewrite("other-model") is None
    a, b = ModelRewrites([rule], seed=7), ModelRewrites([rule], seed=7)
    assert [a.rewrite("food-review") for _ in range(200)] == [b.rewrite("food-review") for _ in range(200)]


def test_equal_weights_zero_means_uniform() -> None:
    rule = RewriteRule("r", frozenset(), ("x", "y"), (0, 0))
    rewrites = ModelRewrites([rule], seed=3)
    counts = Counter(rewrites.rewrite("m")[0] for _ in range(4000))
    assert counts["x"] / 4000 == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (POOL.replace("{matchLabels: {app: vllm}}", "{}"), 5, "selector must name at least one label"),
        (POOL.replace("[{number: 8000}]", "[{number: 70000}]"), 6, "target port must be a number 1-65535"),
        (objective("batch", "high"), 4, "priority must be an integer"),
        ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n"
         "metadata: {name: b}\nspec: {priority: 1}\n", 1, "needs spec.poolRef.name"),
        ((REWRITE % ("r", "", "v1")).replace("weight: 10", "weight: -3"), 7, "weight must be an integer"),
        ((REWRITE % ("r", "", "v1")).replace("    - {modelRewrite: food-review-v2, weight: 10}\n",
                                              "    - {modelRewrite: food-review-v2}\n"), 7,
         "give a weight for every target or for none"),
        ("kind: Pod\n- a\n", 0, "not valid YAML"),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse(text, "pool.yaml", "llama", "prod")
    assert message in str(e.value)
    assert str(e.value).startswith(f"pool.yaml:{line}:" if line else "pool.yaml:")


def test_wrong_pool_name_is_an_error_not_an_empty_pool() -> None:
    with pytest.raises(ManifestError, match="no InferencePool prod/llama2 here"):
        parse(POOL, "pool.yaml", "llama2", "prod")


async def test_server_loads_pool_file_and_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(docs(POOL, pod("a", "127.0.0.1"), objective("batch", -1)))
    ports = free_ports(2)
    server = EppServer(ServeOptions(
        grpc_port=ports[0], grpc_health_port=ports[1], metrics_port=0, bind_address="127.0.0.1",
        pool_file=str(path), pool_name="llama", pool_namespace="prod", pool_file_reload_interval=0.02,
    ))
    await server.start()
    try:
        ds = server.datastore
        assert [e.name for e in ds.ready_endpoints()] == ["a"]
        assert ds.objectives == {"batch": -1}
        path.write_text(docs(POOL, pod("a", "127.0.0.1"), pod("b", "127.0.0.2"), objective("batch", 3)))
        await _until(lambda: len(ds.ready_endpoints()) == 2)
        assert ds.objectives == {"batch": 3}
        # A broken edit keeps the last good state and says why.
        path.write_text(docs(POOL, objective("batch", "oops")))
        await _until(lambda: server.pool_file.last_error is not None)
        assert "priority must be an integer" in server.pool_file.last_error
        assert len(ds.ready_endpoints()) == 2
        assert ds.objectives == {"batch": 3}
    finally:
        await server.stop(grace=0)


def test_pool_file_and_endpoints_both_defining_the_pool_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(docs(POOL, pod("a", "127.0.0.1")))
    with pytest.raises(ManifestError, match="give one of them"):
        EppServer(ServeOptions(pool_file=str(path), pool_name="llama", pool_namespace="prod",
                               endpoints=["127.0.0.1:9"]))


async def _until(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
