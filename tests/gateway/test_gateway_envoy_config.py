"""What Envoy is told for a set of manifests: the xDS resources, read back as Envoy would read them."""

from __future__ import annotations

from pathlib import Path

from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from gateway_harness import EXAMPLES

from epp.gateway import envoy_config, manifests
from epp.gateway.envoy_config import CLUSTER, ENDPOINT, LISTENER, ROUTE, Ports
from epp.gateway.httproute import PoolRef

GATEWAY = (EXAMPLES / "node-update" / "gateway.yaml").read_text()
POOLS = (EXAMPLES / "node-update" / "pool-llm.yaml").read_text() + "---\n" + (
    EXAMPLES / "node-update" / "pool-llm-new.yaml").read_text()
LLM, NEW = PoolRef("default", "llm"), PoolRef("default", "llm-new")


def route(rules: str, extra: str = "") -> str:
    return ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
            f"spec:\n  parentRefs: [{{name: inference-gateway}}]\n{extra}  rules:\n{rules}")


def build(tmp_path: Path, *routes: str, **kw: object) -> dict:
    (tmp_path / "gateway.yaml").write_text(GATEWAY)
    (tmp_path / "pools.yaml").write_text(POOLS)
    for i, r in enumerate(routes):
        (tmp_path / f"route{i}.yaml").write_text(r.replace("name: r}", f"name: r{i}}}"))
    spec = manifests.load([str(tmp_path)])
    return envoy_config.build(spec, Ports({LLM: 9100, NEW: 9101}, 18000, 18001, "127.0.0.1", {80: 8080}), **kw)


def per_route(config: object, name: str) -> ext_proc_pb2.ExtProcPerRoute:
    msg = ext_proc_pb2.ExtProcPerRoute()
    config.typed_per_filter_config[name].Unpack(msg)  # type: ignore[attr-defined]
    return msg


def routes_of(res: dict, port: int = 8080) -> route_pb2.RouteConfiguration:
    return res[ROUTE][f"port-{port}"]


SPLIT = """\
    - backendRefs:
        - {group: inference.networking.k8s.io, kind: InferencePool, name: llm, weight: 90}
        - {group: inference.networking.k8s.io, kind: InferencePool, name: llm-new, weight: 10}
"""


def test_a_split_chooses_the_pool_in_envoy_and_each_pool_picks_with_its_own_picker(tmp_path: Path) -> None:
    res = build(tmp_path, route(SPLIT))
    (vhost,) = routes_of(res).virtual_hosts
    split, fallback = vhost.routes
    weighted = split.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in weighted] == [("pool|default|llm", 90), ("pool|default|llm-new", 10)]
    for c, picker in zip(weighted, ("picker|default|llm", "picker|default|llm-new"), strict=True):
        for f in (envoy_config.PICK_FILTER, envoy_config.OBSERVER_FILTER):
            assert per_route(c, f).overrides.grpc_service.envoy_grpc.cluster_name == picker
    assert per_route(weighted[0], envoy_config.PICK_FILTER).overrides.failure_mode_allow.value is False
    assert fallback.direct_response.status == 404
    assert res[CLUSTER]["picker|default|llm"].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address \
        .socket_address.port_value == 9100
    eps = res[ENDPOINT]["pool|default|llm"].endpoints[0].lb_endpoints
    assert [e.endpoint.address.socket_address.address for e in eps] == ["127.0.10.1", "127.0.10.2"]
    listener = res[LISTENER]["port-8080"]
    assert listener.address.socket_address.port_value == 8080  # the Gateway's port 80, mapped
    manager = hcm.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == "port-8080"
    assert [(f.name, f.disabled) for f in manager.http_filters] == [
        ("epp.bbr", True), ("envoy.filters.http.ext_proc", True), ("epp.response_observer", True),
        ("envoy.filters.http.router", False)]


def test_weights_at_zero_leave_one_cluster_and_none_left_is_a_500(tmp_path: Path) -> None:
    res = build(tmp_path, route(SPLIT.replace("weight: 90", "weight: 0")))
    single = routes_of(res).virtual_hosts[0].routes[0]
    assert single.route.cluster == "pool|default|llm-new"
    assert per_route(single, envoy_config.PICK_FILTER).overrides.grpc_service.envoy_grpc.cluster_name == \
        "picker|default|llm-new"
    res = build(tmp_path, route(SPLIT.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0")))
    assert routes_of(res).virtual_hosts[0].routes[0].direct_response.status == 500


def test_rules_follow_the_gateway_api_precedence(tmp_path: Path) -> None:
    rules = """\
    - matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm}]
    - matches: [{path: {type: PathPrefix, value: /v1/}, headers: [{name: x-tier, value: gold}]}]
      backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm-new}]
    - matches: [{path: {type: PathPrefix, value: /v1/}}]
      backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm}]
    - matches: [{path: {type: Exact, value: /v1/completions}, method: POST}]
      backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm-new}]
"""
    order = [r.name for r in routes_of(build(tmp_path, route(rules))).virtual_hosts[0].routes]
    assert order == ["default/r0/rule-3/match-0", "default/r0/rule-1/match-0", "default/r0/rule-2/match-0",
                     "default/r0/rule-0/match-0", "no-match"]
    first = routes_of(build(tmp_path, route(rules))).virtual_hosts[0].routes[1].match
    assert first.path_separated_prefix == "/v1"  # element-wise: /v1/x and /v1, not /v1x
    assert [(h.name, h.string_match.exact) for h in first.headers] == [("x-tier", "gold")]


def test_hosts_routed_on_the_model_header_run_body_based_routing_first(tmp_path: Path) -> None:
    by_model = """\
    - matches: [{headers: [{name: X-Gateway-Model-Name, value: food-review}]}]
      backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm}]
"""
    res = build(tmp_path, route(by_model, extra="  hostnames: [models.example.com]\n"), route(SPLIT))
    hosts = {v.name: v for v in routes_of(res).virtual_hosts}
    assert set(hosts) == {"models.example.com", "*"}
    bbr = hosts["models.example.com"]
    assert per_route(bbr, envoy_config.BBR_FILTER).overrides.grpc_service.envoy_grpc.cluster_name == "epp-bbr"
    assert per_route(bbr, envoy_config.PICK_FILTER).disabled  # in the chain, skipped where no pool is routed to
    assert envoy_config.BBR_FILTER not in hosts["*"].typed_per_filter_config  # no body parsing where none matters
    # A host's own routes first, then the routes for any host.
    assert [r.name for r in bbr.routes] == ["default/r0/rule-0/match-0", "default/r1/rule-0/match-0", "no-match"]


def test_a_mirror_goes_to_the_mirror_listener_which_picks_in_the_mirror_pool(tmp_path: Path) -> None:
    mirrored = SPLIT.replace("    - backendRefs:", """\
    - filters:
        - type: RequestMirror
          requestMirror:
            backendRef: {group: inference.networking.k8s.io, kind: InferencePool, name: llm-new}
            percent: 25
      backendRefs:""")
    res = build(tmp_path, route(mirrored))
    (policy,) = routes_of(res).virtual_hosts[0].routes[0].route.request_mirror_policies
    assert policy.cluster == "epp-mirror"
    assert policy.runtime_fraction.default_value.numerator == 250_000  # of a million
    set_header = [m.append.header for m in policy.request_headers_mutations if m.HasField("append")]
    assert [(h.key, h.value) for h in set_header] == [("x-epp-mirror-pool", "default/llm-new")]
    assert "x-gateway-destination-endpoint" in [m.remove for m in policy.request_headers_mutations]
    (mroute,) = res[ROUTE]["epp-mirror"].virtual_hosts[0].routes
    assert mroute.route.cluster == "pool|default|llm-new"
    assert per_route(mroute, envoy_config.PICK_FILTER).overrides.grpc_service.envoy_grpc.cluster_name == \
        "picker|default|llm-new"
    assert res[LISTENER]["epp-mirror"].address.socket_address.port_value == 18001


def test_a_draining_pool_keeps_its_clusters_and_endpoints(tmp_path: Path) -> None:
    only_llm = route("    - backendRefs: [{group: inference.networking.k8s.io, kind: InferencePool, name: llm}]\n")
    (tmp_path / "gateway.yaml").write_text(GATEWAY)
    (tmp_path / "pools.yaml").write_text(POOLS)
    (tmp_path / "route0.yaml").write_text(only_llm)
    before = manifests.load([str(tmp_path)])
    (tmp_path / "pools.yaml").write_text((EXAMPLES / "node-update" / "pool-llm.yaml").read_text())
    after = manifests.load([str(tmp_path)])
    ports = Ports({LLM: 9100, NEW: 9101}, 18000, 18001)
    assert "pool|default|llm-new" not in envoy_config.build(after, ports)[CLUSTER]
    kept = envoy_config.build(after, ports, {NEW: before.pools[NEW]})
    assert {"pool|default|llm-new", "picker|default|llm-new"} <= set(kept[CLUSTER])
    assert len(kept[ENDPOINT]["pool|default|llm-new"].endpoints[0].lb_endpoints) == 2


def test_a_request_that_never_reached_its_pod_is_retried_on_the_picks_fallbacks(tmp_path: Path) -> None:
    """The shipped bootstrap's retry policy on every route to a pool, a pool cluster that reads the pick's
    whole list (the metadata: the header names the pick alone), and the JSON bodies of Envoy's own errors."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2

    res = build(tmp_path, route(SPLIT))
    split = routes_of(res).virtual_hosts[0].routes[0]
    retry = split.route.retry_policy
    assert retry.retry_on == "connect-failure,refused-stream,reset-before-request"
    assert retry.num_retries.value == 2
    assert [p.name for p in retry.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert not retry.HasField("per_try_timeout")  # a long generation is never cut by a try's deadline
    pool: cluster_pb2.Cluster = res[CLUSTER]["pool|default|llm"]
    assert pool.connect_timeout.seconds == 2
    override = override_host_pb2.OverrideHost()
    pool.load_balancing_policy.policies[0].typed_extension_config.typed_config.Unpack(override)
    sources = [(s.header, s.metadata.key, [p.key for p in s.metadata.path]) for s in override.override_host_sources]
    assert sources == [("", "envoy.lb", ["x-gateway-destination-endpoint"])]
    manager = hcm.HttpConnectionManager()
    res[LISTENER]["port-8080"].filter_chains[0].filters[0].typed_config.Unpack(manager)
    bodies = [m.body_format_override.text_format_source.inline_string for m in manager.local_reply_config.mappers]
    assert any('"code":"endpoint_picker_unavailable"' in b for b in bodies), bodies


def test_a_failopen_pool_buffers_the_body_so_that_it_can_go_on_without_a_pick(tmp_path: Path) -> None:
    """Envoy fails a FULL_DUPLEX_STREAMED request closed once its body is on its way, whatever
    failure_mode_allow says: a FailOpen pool's pick buffers it instead."""
    (tmp_path / "gateway.yaml").write_text(GATEWAY)
    (tmp_path / "pools.yaml").write_text(POOLS.replace("failureMode: FailClose", "failureMode: FailOpen", 1))
    (tmp_path / "route0.yaml").write_text(route(SPLIT).replace("name: r}", "name: r0}"))
    res = envoy_config.build(manifests.load([str(tmp_path)]),
                             Ports({LLM: 9100, NEW: 9101}, 18000, 18001, "127.0.0.1", {80: 8080}))
    opened, closed = routes_of(res).virtual_hosts[0].routes[0].route.weighted_clusters.clusters
    fail_open = per_route(opened, envoy_config.PICK_FILTER).overrides
    assert fail_open.failure_mode_allow.value is True
    assert fail_open.processing_mode.request_body_mode == fail_open.processing_mode.BUFFERED
    fail_close = per_route(closed, envoy_config.PICK_FILTER).overrides
    assert fail_close.failure_mode_allow.value is False
    assert not fail_close.HasField("processing_mode")
