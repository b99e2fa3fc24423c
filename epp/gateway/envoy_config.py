"""The gateway's Envoy configuration, as typed xDS resources (envoy protos from xds-protos).

Per Gateway port, a Listener whose HttpConnectionManager takes its routes over RDS, so
that a route edit (a weight, a match, a pool added or removed) never touches the listener
and never drains a connection. The filter chain is fixed:

  epp.bbr (body-based routing; on for virtual hosts whose routes match on the model headers)
  -> the pick (ext_proc) -> the response observer (ext_proc) -> router

The pick and observer filters are the shipped bootstrap's (epp/bootstraps/envoy.yaml),
disabled by default; each route, or each weighted cluster of a split, enables them
pointed at its pool's picker. Envoy chooses the pool (the weighted cluster) when it
matches the route, so the pool's own picker chooses the pod. Each pool is an EDS
cluster of its ready pods with the override_host load balancer: Envoy sends a request
to the pod named by the pick (envoy.lb metadata x-gateway-destination-endpoint), a
retry of one that never reached its pod to the pick's next fallback, and, once those
are used up or for a FailOpen pool whose picker is unreachable, round robin among the
pool's pods; never outside the pool. The retry policy and the JSON bodies of Envoy's
own errors are the shipped bootstrap's.

RequestMirror: the copy goes to a second, internal listener on loopback, which routes
it (by a header naming the mirror pool) through that pool's picker like any request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import yaml
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401 - the local replies' filter
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 - the bootstrap's router type
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401 - the retries' predicate
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import http_status_pb2, percent_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, message, wrappers_pb2

from epp.envoy import POOL_CLUSTER, bootstrap_text
from epp.gateway.httproute import Backend, HeaderEdits, Match, Mirror, PoolRef, Rule
from epp.gateway.manifests import GatewaySpec, Listener, Pool
from epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, EXCHANGE_HEADER, HANDOFF_HEADER

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Envoy applies a cluster before a route may name it, and a route change before a cluster goes.
APPLY_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

MODEL_HEADER = "x-gateway-model-name"
BASE_MODEL_HEADER = "x-gateway-base-model-name"
MIRROR_POOL_HEADER = "x-epp-mirror-pool"
BBR_FILTER = "epp.bbr"
PICK_FILTER = "envoy.filters.http.ext_proc"  # the names the shipped bootstrap gives its filters
OBSERVER_FILTER = "epp.response_observer"
BBR_CLUSTER = "epp-bbr"
MIRROR_CLUSTER = "epp-mirror"
MIRROR_LISTENER = "epp-mirror"
UNSET_PICKER = "epp-no-pool"  # the pick filters' default service: every route that enables them overrides it
STREAM_IDLE = 300  # seconds; a stalled stream is cut, a long generation is not
_BIG = 40000  # circuit-breaker thresholds: Envoy's defaults (1024) would cap concurrency


@dataclass(frozen=True)
class Ports:
    """Where the gateway's own parts listen (all on loopback)."""

    pickers: dict[PoolRef, int]
    bbr: int
    mirror: int
    address: str = "0.0.0.0"  # the Gateway listeners' address
    port_map: dict[int, int] = field(default_factory=dict)  # Gateway port -> local port


Resources = dict[str, dict[str, message.Message]]


def pool_cluster(ref: PoolRef) -> str:
    return f"pool|{ref.namespace}|{ref.name}"


def picker_cluster(ref: PoolRef) -> str:
    return f"picker|{ref.namespace}|{ref.name}"


def _any(msg: message.Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _seconds(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


def _socket(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def _grpc(cluster: str) -> grpc_service_pb2.GrpcService:
    return grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=cluster),
                                        timeout=_seconds(10))


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(),
                                          resource_api_version=config_source_pb2.V3)


def _thresholds() -> circuit_breaker_pb2.CircuitBreakers:
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        max_connections=wrappers_pb2.UInt32Value(value=_BIG), max_pending_requests=wrappers_pb2.UInt32Value(value=_BIG),
        max_requests=wrappers_pb2.UInt32Value(value=_BIG), max_retries=wrappers_pb2.UInt32Value(value=_BIG))
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[t])


def _h2_options() -> dict[str, any_pb2.Any]:
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(
                initial_stream_window_size=wrappers_pb2.UInt32Value(value=65536),
                initial_connection_window_size=wrappers_pb2.UInt32Value(value=1 << 20))))
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(opts)}


def _static_cluster(name: str, address: str, port: int, *, h2: bool) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.STATIC, connect_timeout=_seconds(1), circuit_breakers=_thresholds(),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=_socket(address, port)))])]))
    if h2:
        for k, v in _h2_options().items():
            c.typed_extension_protocol_options[k].CopyFrom(v)
    return c


def _pool_cluster(ref: PoolRef) -> cluster_pb2.Cluster:
    """The pool's pods (EDS): the pick and its fallbacks, in turn; then (or without a pick: FailOpen)
    round robin among them. Only the metadata names them: the header carries the pick alone, and
    Envoy would try the hosts of both sources, the pick twice."""
    name = pool_cluster(ref)
    override = override_host_pb2.OverrideHost(
        override_host_sources=[
            override_host_pb2.OverrideHost.OverrideHostSource(metadata=metadata_pb2.MetadataKey(
                key=DESTINATION_NAMESPACE, path=[metadata_pb2.MetadataKey.PathSegment(key=DESTINATION_HEADER)])),
        ],
        fallback_policy=cluster_pb2.LoadBalancingPolicy(policies=[cluster_pb2.LoadBalancingPolicy.Policy(
            typed_extension_config=extension_pb2.TypedExtensionConfig(
                name="envoy.load_balancing_policies.round_robin", typed_config=_any(round_robin_pb2.RoundRobin())))]),
    )
    return cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS, connect_timeout=_SHIPPED_POOL_CONNECT_TIMEOUT,
        circuit_breakers=_thresholds(),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        load_balancing_policy=cluster_pb2.LoadBalancingPolicy(policies=[cluster_pb2.LoadBalancingPolicy.Policy(
            typed_extension_config=extension_pb2.TypedExtensionConfig(
                name="envoy.load_balancing_policies.override_host", typed_config=_any(override)))]),
    )


def _pool_endpoints(ref: PoolRef, pool: Pool) -> endpoint_pb2.ClusterLoadAssignment:
    eps = [endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket(ep.host, ep.port)),
        health_status=health_check_pb2.HEALTHY)
        for ep in pool.snapshot.endpoints if ep.ready]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=pool_cluster(ref), endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=eps)])


def _shipped_filters() -> tuple[hcm.HttpFilter, hcm.HttpFilter, hcm.HttpFilter]:
    """The pick, the observer and the router exactly as the shipped ext_proc bootstrap defines them."""
    boot = yaml.safe_load(bootstrap_text("ext-proc"))
    hcm_cfg = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    by_name = {f["name"]: f for f in hcm_cfg["http_filters"]}
    out = []
    for name in (PICK_FILTER, OBSERVER_FILTER, "envoy.filters.http.router"):
        f = hcm.HttpFilter()
        json_format.ParseDict(by_name[name], f)
        out.append(f)
    pick, observer, router = out
    for f in (pick, observer):
        cfg = ext_proc_pb2.ExternalProcessor()
        f.typed_config.Unpack(cfg)
        cfg.grpc_service.envoy_grpc.cluster_name = UNSET_PICKER
        f.typed_config.Pack(cfg)
        f.disabled = True  # enabled by the routes to a pool, each naming its pool's picker
    return pick, observer, router


_PICK, _OBSERVER, _ROUTER = _shipped_filters()


def _shipped_reliability() -> tuple[hcm.LocalReplyConfig, rc.RetryPolicy, duration_pb2.Duration]:
    """The shipped ext_proc bootstrap's JSON bodies for Envoy's own errors, its route's retry policy
    and its pool's connect timeout (the only per-try bound)."""
    boot = yaml.safe_load(bootstrap_text("ext-proc"))
    hcm_cfg = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    replies = json_format.ParseDict(hcm_cfg["local_reply_config"], hcm.LocalReplyConfig())
    retry = json_format.ParseDict(hcm_cfg["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["retry_policy"],
                                  rc.RetryPolicy())
    pool = next(c for c in boot["static_resources"]["clusters"] if c["name"] == POOL_CLUSTER)
    timeout = json_format.ParseDict(pool["connect_timeout"], duration_pb2.Duration())
    return replies, retry, timeout


_LOCAL_REPLIES, _RETRY, _SHIPPED_POOL_CONNECT_TIMEOUT = _shipped_reliability()


def _bbr_filter() -> hcm.HttpFilter:
    mode = processing_mode_pb2.ProcessingMode
    cfg = ext_proc_pb2.ExternalProcessor(
        grpc_service=_grpc(BBR_CLUSTER),
        failure_mode_allow=False,
        status_on_error=http_status_pb2.HttpStatus(code=http_status_pb2.ServiceUnavailable),
        message_timeout=_seconds(30),
        processing_mode=mode(request_header_mode=mode.SEND, request_body_mode=mode.FULL_DUPLEX_STREAMED,
                             request_trailer_mode=mode.SEND, response_header_mode=mode.SKIP,
                             response_body_mode=mode.NONE, response_trailer_mode=mode.SKIP),
    )
    return hcm.HttpFilter(name=BBR_FILTER, typed_config=_any(cfg), disabled=True)


def _listener(name: str, address: str, port: int, route_name: str, stat_prefix: str) -> listener_pb2.Listener:
    manager = hcm.HttpConnectionManager(
        stat_prefix=stat_prefix, codec_type=hcm.HttpConnectionManager.AUTO,
        stream_idle_timeout=_seconds(STREAM_IDLE), strip_any_host_port=True,
        rds=hcm.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[_bbr_filter(), _PICK, _OBSERVER, _ROUTER], local_reply_config=_LOCAL_REPLIES,
    )
    return listener_pb2.Listener(
        name=name, address=_socket(address, port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=_any(manager))])])


def _pick_config(ref: PoolRef, fail_open: bool) -> dict[str, any_pb2.Any]:
    """Per-route filter configs that send the pick and the observer to this pool's picker."""
    pick = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides(
        grpc_service=_grpc(picker_cluster(ref)), failure_mode_allow=wrappers_pb2.BoolValue(value=fail_open)))
    if fail_open:
        # Envoy fails a FULL_DUPLEX_STREAMED request closed once its body is on its way to the picker,
        # whatever failure_mode_allow says; a buffered body can still go on without a pick.
        cfg = ext_proc_pb2.ExternalProcessor()
        _PICK.typed_config.Unpack(cfg)
        pick.overrides.processing_mode.CopyFrom(cfg.processing_mode)
        pick.overrides.processing_mode.request_body_mode = processing_mode_pb2.ProcessingMode.BUFFERED
    observer = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides(
        grpc_service=_grpc(picker_cluster(ref))))
    return {PICK_FILTER: _any(pick), OBSERVER_FILTER: _any(observer)}


def _json_error(status: int, message: str, etype: str) -> rc.DirectResponseAction:
    body = orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": status}})
    return rc.DirectResponseAction(status=status, body=base_pb2.DataSource(inline_bytes=body))


def _string_match(kind: str, value: str) -> string_pb2.StringMatcher:
    if kind == "Exact":
        return string_pb2.StringMatcher(exact=value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))


def _route_match(m: Match) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if m.path_kind == "Exact":
        out.path = m.path
    elif m.path_kind == "RegularExpression":
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.path))
    else:
        prefix = m.path.rstrip("/")
        if prefix:
            out.path_separated_prefix = prefix  # element-wise, as the Gateway API's PathPrefix
        else:
            out.prefix = "/"
    for h in m.headers:
        out.headers.append(rc.HeaderMatcher(name=h.name, string_match=_string_match(h.kind, h.value)))
    if m.method:
        out.headers.append(rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact=m.method)))
    for q in m.query:
        out.query_parameters.append(rc.QueryParameterMatcher(name=q.name, string_match=_string_match(q.kind, q.value)))
    return out


def _header_options(pairs: Sequence[tuple[str, str]], action: int) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v), append_action=action)
            for k, v in pairs]


def _apply_headers(route: rc.Route, req: HeaderEdits, resp: HeaderEdits) -> None:
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    append = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    route.request_headers_to_add.extend(_header_options(req.set, overwrite) + _header_options(req.add, append))
    route.request_headers_to_remove.extend(req.remove)
    route.response_headers_to_add.extend(_header_options(resp.set, overwrite) + _header_options(resp.add, append))
    route.response_headers_to_remove.extend(resp.remove)


def _mirror_policy(m: Mirror) -> rc.RouteAction.RequestMirrorPolicy:
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    mutations = [mutation_rules_pb2.HeaderMutation(append=base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=MIRROR_POOL_HEADER, value=str(m.pool)), append_action=overwrite))]
    # The copy is picked afresh by the mirror pool: the primary's pick and exchange do not travel with it.
    mutations += [mutation_rules_pb2.HeaderMutation(remove=h) for h in (DESTINATION_HEADER, EXCHANGE_HEADER,
                                                                         HANDOFF_HEADER)]
    policy = rc.RouteAction.RequestMirrorPolicy(cluster=MIRROR_CLUSTER, request_headers_mutations=mutations)
    if m.percent < 100:
        policy.runtime_fraction.default_value.CopyFrom(percent_pb2.FractionalPercent(
            numerator=round(m.percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION))
    return policy


def _action(rule: Rule, spec: GatewaySpec) -> tuple[rc.RouteAction | None, dict[str, any_pb2.Any]]:
    """The route action of a rule (None: no pool takes its traffic) and its per-route filter configs."""
    live: list[Backend] = [b for b in rule.backends if b.weight > 0]
    if not live:
        return None, {}
    action = rc.RouteAction(timeout=_seconds(rule.timeout or 0), idle_timeout=_seconds(STREAM_IDLE),
                            retry_policy=_RETRY)
    per_route: dict[str, any_pb2.Any] = {}
    if len(live) == 1:
        pool = live[0].pool
        action.cluster = pool_cluster(pool)
        per_route = _pick_config(pool, spec.pools[pool].fail_open)
    else:
        for b in live:
            cw = rc.WeightedCluster.ClusterWeight(name=pool_cluster(b.pool),
                                                  weight=wrappers_pb2.UInt32Value(value=b.weight))
            for k, v in _pick_config(b.pool, spec.pools[b.pool].fail_open).items():
                cw.typed_per_filter_config[k].CopyFrom(v)
            action.weighted_clusters.clusters.append(cw)
    action.request_mirror_policies.extend(_mirror_policy(m) for m in rule.mirrors)
    return action, per_route


def _envoy_route(rule: Rule, mi: int, m: Match, spec: GatewaySpec) -> rc.Route:
    route = rc.Route(name=f"{rule.route}/rule-{rule.index}/match-{mi}", match=_route_match(m))
    action, per_route = _action(rule, spec)
    if action is None:
        route.direct_response.CopyFrom(_json_error(
            500, f"HTTPRoute {rule.route} rule {rule.index} has no InferencePool with weight above 0", "InternalError"))
    else:
        route.route.CopyFrom(action)
        for k, v in per_route.items():
            route.typed_per_filter_config[k].CopyFrom(v)
    _apply_headers(route, rule.request_headers, rule.response_headers)
    return route


def _precedence(created: str, route_key: str, rule: Rule, mi: int, m: Match) -> tuple[Any, ...]:
    """The Gateway API's order among matches: exact path, longest prefix, method, most headers, most query
    parameters; then the oldest route, then namespace/name, then rule and match order."""
    path_rank = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}[m.path_kind]
    return (path_rank, -len(m.path), 0 if m.method else 1, -len(m.headers), -len(m.query),
            created == "", created, route_key, rule.index, mi)


def _domains(route_hosts: Sequence[str], listener_host: str | None) -> list[str]:
    """The host names a route serves on a listener: the intersection of theirs ('*' for any)."""
    if not route_hosts:
        return [listener_host or "*"]
    if listener_host is None:
        return list(route_hosts)
    out = []
    for h in route_hosts:
        if _host_covers(listener_host, h):
            out.append(h)
        elif _host_covers(h, listener_host):
            out.append(listener_host)
    return out


def _host_covers(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:]) and not host.startswith("*.")


def _uses_model_headers(rules: Sequence[Rule]) -> bool:
    return any(h.name in (MODEL_HEADER, BASE_MODEL_HEADER) for r in rules for m in r.matches for h in m.headers)


def _route_configuration(name: str, entries: dict[str, list[tuple[tuple[Any, ...], rc.Route, Rule]]],
                         ) -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=name)
    wildcard = entries.get("*", [])
    for domain in sorted(entries, key=lambda d: (d == "*", d.startswith("*."), d)):
        own = sorted(entries[domain], key=lambda e: e[0])
        if domain != "*":
            covering = [e for d, es in entries.items() if d != domain and d.startswith("*.") and _host_covers(d, domain)
                        for e in es]
            own += sorted(covering, key=lambda e: e[0]) + sorted(wildcard, key=lambda e: e[0])
        vhost = rc.VirtualHost(name=domain, domains=[domain])
        vhost.routes.extend(r for _, r, _ in own)
        vhost.routes.append(rc.Route(name="no-match", match=rc.RouteMatch(prefix="/"), direct_response=_json_error(
            404, "no HTTPRoute rule matches this request", "NotFoundError")))
        if _uses_model_headers([rule for _, _, rule in own]):
            # Body-based routing runs before the route is chosen, so it is enabled for the whole host.
            vhost.typed_per_filter_config[BBR_FILTER].CopyFrom(_any(ext_proc_pb2.ExtProcPerRoute(
                overrides=ext_proc_pb2.ExtProcOverrides(grpc_service=_grpc(BBR_CLUSTER)))))
            # Envoy decides which filters a request's chain has from the route matched before body-based
            # routing ran; so here the pick and the observer are in every chain, and skip (disabled per
            # route) unless the route chosen after it, naming a pool, points them at its picker.
            for name in (PICK_FILTER, OBSERVER_FILTER):
                vhost.typed_per_filter_config[name].CopyFrom(_any(ext_proc_pb2.ExtProcPerRoute(disabled=True)))
        config.virtual_hosts.append(vhost)
    return config


def _mirror_routes(spec: GatewaySpec) -> route_pb2.RouteConfiguration:
    pools = sorted({m.pool for r in spec.routes for rule in r.rules for m in rule.mirrors}, key=str)
    vhost = rc.VirtualHost(name="mirror", domains=["*"])
    for pool in pools:
        match = rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(
            name=MIRROR_POOL_HEADER, string_match=string_pb2.StringMatcher(exact=str(pool)))])
        route = rc.Route(name=f"mirror/{pool}", match=match, route=rc.RouteAction(
            cluster=pool_cluster(pool), timeout=_seconds(0), idle_timeout=_seconds(STREAM_IDLE), retry_policy=_RETRY))
        for k, v in _pick_config(pool, spec.pools[pool].fail_open).items():
            route.typed_per_filter_config[k].CopyFrom(v)
        route.request_headers_to_remove.append(MIRROR_POOL_HEADER)
        vhost.routes.append(route)
    return route_pb2.RouteConfiguration(name=MIRROR_LISTENER, virtual_hosts=[vhost])


def local_port(listener: Listener, port_map: Mapping[int, int]) -> int:
    """The local port a Gateway listener is served on (`--port-map`)."""
    return port_map.get(listener.port, listener.port)


def build(spec: GatewaySpec, ports: Ports, draining: Mapping[PoolRef, Pool] | None = None) -> Resources:
    """Every resource Envoy needs for `spec`. `draining`: pools no route uses any more, whose
    clusters stay until their requests in flight are done."""
    clusters: dict[str, message.Message] = {
        BBR_CLUSTER: _static_cluster(BBR_CLUSTER, "127.0.0.1", ports.bbr, h2=True),
        MIRROR_CLUSTER: _static_cluster(MIRROR_CLUSTER, "127.0.0.1", ports.mirror, h2=True),
    }
    endpoints: dict[str, message.Message] = {}
    for ref, pool in {**(draining or {}), **spec.pools}.items():
        clusters[picker_cluster(ref)] = _static_cluster(picker_cluster(ref), "127.0.0.1", ports.pickers[ref], h2=True)
        clusters[pool_cluster(ref)] = _pool_cluster(ref)
        endpoints[pool_cluster(ref)] = _pool_endpoints(ref, pool)
    listeners: dict[str, message.Message] = {}
    routes: dict[str, message.Message] = {}
    by_port: dict[int, dict[str, list[tuple[tuple[Any, ...], rc.Route, Rule]]]] = {}
    for lst in spec.listeners:
        by_port.setdefault(local_port(lst, ports.port_map), {})
    for route in spec.routes:
        for lst in spec.attachments.get(route.key, ()):
            entries = by_port.setdefault(local_port(lst, ports.port_map), {})
            for domain in _domains(route.hostnames, lst.hostname):
                bucket = entries.setdefault(domain, [])
                for rule in route.rules:
                    for mi, m in enumerate(rule.matches):
                        key = _precedence(route.created, route.key, rule, mi, m)
                        if not any(k == key for k, _, _ in bucket):  # a route on two listeners of one port
                            bucket.append((key, _envoy_route(rule, mi, m, spec), rule))
    for port, entries in by_port.items():
        name = f"port-{port}"
        listeners[name] = _listener(name, ports.address, port, name, f"gateway-{port}")
        routes[name] = _route_configuration(name, entries or {"*": []})
    listeners[MIRROR_LISTENER] = _listener(MIRROR_LISTENER, "127.0.0.1", ports.mirror, MIRROR_LISTENER, "mirror")
    routes[MIRROR_LISTENER] = _mirror_routes(spec)
    return {CLUSTER: clusters, ENDPOINT: endpoints, LISTENER: listeners, ROUTE: routes}

