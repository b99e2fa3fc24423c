"""One HTTPRoute's rules, checked field by field, as the gateway will serve them.

What Envoy is told comes from here: matches (path, headers, query parameters,
method), backendRefs to InferencePools with weights, the RequestMirror and header
modifier filters, and timeouts. A field the gateway cannot honour is an error that
names it, never a rule quietly served differently. GKE's rollout guide prints
`rules:` as a mapping where the Gateway API needs a list; that error shows the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from epp.durations import parse_duration
from epp.yaml_lines import where

GATEWAY_GROUP = "gateway.networking.k8s.io"
POOL_GROUPS = ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
# GEP-2257 durations: up to four number-unit pairs of h, m, s, ms ("1h", "10s", "500ms", "0s").
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\(\?>|\\[1-9]")  # what Python's re takes and RE2 refuses
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


class RouteError(ValueError):
    """A problem in an HTTPRoute; the message names the file and line."""


@dataclass(frozen=True)
class PoolRef:
    """An InferencePool, by namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter match: `kind` is Exact or RegularExpression."""

    kind: str
    name: str
    value: str


@dataclass(frozen=True)
class Match:
    path_kind: str  # Exact, PathPrefix or RegularExpression
    path: str
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True)
class Backend:
    pool: PoolRef
    weight: int


@dataclass(frozen=True)
class Mirror:
    pool: PoolRef
    percent: float  # of requests copied, 0-100


@dataclass(frozen=True)
class HeaderEdits:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    route: str  # namespace/name of its HTTPRoute
    index: int
    where: str
    matches: tuple[Match, ...]
    backends: tuple[Backend, ...]
    mirrors: tuple[Mirror, ...] = ()
    request_headers: HeaderEdits = HeaderEdits()
    response_headers: HeaderEdits = HeaderEdits()
    # Seconds for the whole request; 0 = no limit; None = not set (the gateway's default applies).
    timeout: float | None = None


@dataclass(frozen=True)
class ParentRef:
    kind: str  # Gateway or InferenceGateway
    namespace: str
    name: str
    section: str | None
    port: int | None
    where: str


@dataclass(frozen=True)
class Route:
    namespace: str
    name: str
    where: str
    created: str  # metadata.creationTimestamp, "" when not set
    hostnames: tuple[str, ...]
    parents: tuple[ParentRef, ...]
    rules: tuple[Rule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


Fail = Callable[[Any, str], RouteError]


def parse_route(obj: dict[str, Any], source: str, namespace: str,
                backend_allowed: Callable[[str, PoolRef], bool] | None = None) -> Route:
    """The HTTPRoute `obj` (from `source`), its namespace defaulting to `namespace`.

    `backend_allowed(route_namespace, pool)` says whether a backendRef to another
    namespace is allowed (a ReferenceGrant); without it, cross-namespace refs are refused.
    """
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    ns = str(meta.get("namespace") or namespace)

    def fail(node: Any, msg: str) -> RouteError:
        return RouteError(f"{where(node, source)}: HTTPRoute {name or '(unnamed)'}: {msg}")

    if not name:
        raise fail(obj, "metadata.name is required")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise fail(obj, "spec must be a mapping")
    _only(spec, ("parentRefs", "hostnames", "rules"), "spec", fail)
    parents = _parents(spec, ns, source, fail)
    hostnames = _hostnames(spec.get("hostnames"), spec, fail)
    rules_node = spec.get("rules")
    if rules_node is None:
        rules_node = [{}]  # no rules: one rule, matching every path, with no backends (404)
    if isinstance(rules_node, dict):
        raise fail(rules_node, _rules_mapping_message(rules_node))
    if not isinstance(rules_node, list):
        raise fail(spec, f"spec.rules must be a list of rules, got {type(rules_node).__name__}")
    key = f"{ns}/{name}"
    rules = tuple(_rule(r, i, key, ns, source, fail, backend_allowed) for i, r in enumerate(rules_node))
    return Route(ns, name, where(obj, source), str(meta.get("creationTimestamp") or ""), hostnames, parents, rules)


def _rules_mapping_message(rules: dict[str, Any]) -> str:
    fixed = yaml.safe_dump({"rules": [_plain(rules)]}, sort_keys=False, default_flow_style=False)
    shown = "".join(f"    {ln}\n" for ln in fixed.splitlines())
    return ("spec.rules must be a list of rules, but here it is a mapping (as GKE's rollout guide prints it). "
            "The Gateway API needs a list: start the rule with '- ', indenting what follows:\n" + shown.rstrip())


def _plain(node: Any) -> Any:
    """Plain dicts and lists (for yaml.safe_dump, which refuses the line-tracking subclasses)."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _only(node: dict[str, Any], allowed: tuple[str, ...], what: str, fail: Fail) -> None:
    for key in node:
        if key not in allowed:
            raise fail(node, f"{what}.{key} is not supported by epp gateway (it supports {', '.join(allowed)})")


def _str(node: dict[str, Any], key: str, what: str, fail: Fail, *, required: bool = False) -> str | None:
    value = node.get(key)
    if value is None:
        if required:
            raise fail(node, f"{what}.{key} is required")
        return None
    if not isinstance(value, str) or not value:
        raise fail(node, f"{what}.{key} must be a non-empty string, got {value!r}")
    return value


def _parents(spec: dict[str, Any], ns: str, source: str, fail: Fail) -> tuple[ParentRef, ...]:
    refs = spec.get("parentRefs")
    if not isinstance(refs, list) or not refs:
        raise fail(spec, "spec.parentRefs must list the Gateway(s) the route attaches to")
    out = []
    for ref in refs:
        if not isinstance(ref, dict):
            raise fail(refs, "each parentRef must be a mapping")
        _only(ref, ("group", "kind", "name", "namespace", "sectionName", "port"), "parentRef", fail)
        kind = str(ref.get("kind") or "Gateway")
        group = str(ref.get("group") if ref.get("group") is not None else GATEWAY_GROUP)
        if (kind, group) not in (("Gateway", GATEWAY_GROUP), ("InferenceGateway", POOL_GROUPS[0])):
            raise fail(ref, f"parentRef of kind {kind} (group {group!r}) is not supported: name a Gateway "
                            f"(group {GATEWAY_GROUP}) or an InferenceGateway (group {POOL_GROUPS[0]})")
        name = _str(ref, "name", "parentRef", fail, required=True)
        port = ref.get("port")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise fail(ref, f"parentRef.port must be a port number, got {port!r}")
        out.append(ParentRef(kind, str(ref.get("namespace") or ns), str(name),
                             _str(ref, "sectionName", "parentRef", fail), port, where(ref, source)))
    return tuple(out)


def _hostnames(node: Any, spec: dict[str, Any], fail: Fail) -> tuple[str, ...]:
    if node is None:
        return ()
    if not isinstance(node, list) or not all(isinstance(h, str) and h for h in node):
        raise fail(spec, "spec.hostnames must be a list of host names")
    for h in node:
        if ":" in h or (h.count("*") and not (h.startswith("*.") and h.count("*") == 1)):
            raise fail(node, f"hostname {h!r} is not valid: a DNS name, optionally starting with '*.'")
    return tuple(h.lower() for h in node)


def _rule(node: Any, index: int, route: str, ns: str, source: str, fail: Fail,
          backend_allowed: Callable[[str, PoolRef], bool] | None) -> Rule:
    if not isinstance(node, dict):
        raise fail(node, f"rule {index} must be a mapping")
    _only(node, ("name", "matches", "filters", "backendRefs", "timeouts"), f"rules[{index}]", fail)
    matches_node = node.get("matches")
    if matches_node is None:
        matches: tuple[Match, ...] = (Match("PathPrefix", "/"),)
    elif not isinstance(matches_node, list):
        raise fail(node, f"rules[{index}].matches must be a list")
    else:
        matches = tuple(_match(m, fail) for m in matches_node) or (Match("PathPrefix", "/"),)
    backends = _backends(node.get("backendRefs"), node, index, ns, fail, backend_allowed)
    mirrors: list[Mirror] = []
    request_headers = response_headers = HeaderEdits()
    filters = node.get("filters") or []
    if not isinstance(filters, list):
        raise fail(node, f"rules[{index}].filters must be a list")
    for f in filters:
        if not isinstance(f, dict):
            raise fail(filters, "each filter must be a mapping")
        ftype = f.get("type")
        if ftype == "RequestMirror":
            mirrors.append(_mirror(f, ns, fail, backend_allowed))
        elif ftype == "RequestHeaderModifier":
            request_headers = _header_edits(f.get("requestHeaderModifier"), f, "requestHeaderModifier", fail)
        elif ftype == "ResponseHeaderModifier":
            response_headers = _header_edits(f.get("responseHeaderModifier"), f, "responseHeaderModifier", fail)
        else:
            raise fail(f, f"filter type {ftype!r} is not supported by epp gateway "
                          "(it supports RequestMirror, RequestHeaderModifier, ResponseHeaderModifier)")
    return Rule(route, index, where(node, source), matches, backends, tuple(mirrors), request_headers,
                response_headers, _timeout(node.get("timeouts"), node, fail))


def _match(node: Any, fail: Fail) -> Match:
    if not isinstance(node, dict):
        raise fail(node, "each match must be a mapping")
    _only(node, ("path", "headers", "queryParams", "method"), "match", fail)
    path = node.get("path") or {}
    if not isinstance(path, dict):
        raise fail(node, "match.path must be a mapping with type and value")
    _only(path, ("type", "value"), "path", fail)
    kind = str(path.get("type") or "PathPrefix")
    value = path.get("value", "/")
    if kind not in ("Exact", "PathPrefix", "RegularExpression"):
        raise fail(path, f"path type {kind!r} is not one of Exact, PathPrefix, RegularExpression")
    if not isinstance(value, str) or not value:
        raise fail(path, f"path value must be a non-empty string, got {value!r}")
    if kind != "RegularExpression" and not value.startswith("/"):
        raise fail(path, f"path value {value!r} must start with '/'")
    if kind == "RegularExpression":
        _regex(value, path, fail)
    method = node.get("method")
    if method is not None and method not in _METHODS:
        raise fail(node, f"method {method!r} is not one of {', '.join(_METHODS)}")
    return Match(kind, value, _value_matches(node.get("headers"), node, "headers", fail),
                 _value_matches(node.get("queryParams"), node, "queryParams", fail), method)


def _value_matches(node: Any, parent: Any, what: str, fail: Fail) -> tuple[ValueMatch, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        raise fail(parent, f"match.{what} must be a list")
    out, seen = [], set()
    for m in node:
        if not isinstance(m, dict):
            raise fail(node, f"each of match.{what} must be a mapping")
        _only(m, ("type", "name", "value"), what, fail)
        kind = str(m.get("type") or "Exact")
        name, value = m.get("name"), m.get("value")
        if kind not in ("Exact", "RegularExpression"):
            raise fail(m, f"{what} match type {kind!r} is not one of Exact, RegularExpression")
        if not isinstance(name, str) or not name or (what == "headers" and not _HEADER_NAME.match(name)):
            raise fail(m, f"{what} match needs a valid name, got {name!r}")
        if not isinstance(value, str):
            raise fail(m, f"{what} match {name!r} needs a string value, got {value!r}")
        if kind == "RegularExpression":
            _regex(value, m, fail)
        folded = name.lower() if what == "headers" else name
        if folded in seen:
            raise fail(m, f"{what} match {name!r} is given twice in one match")
        seen.add(folded)
        out.append(ValueMatch(kind, folded, value))
    return tuple(out)


def _regex(value: str, node: Any, fail: Fail) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise fail(node, f"regular expression {value!r} does not compile: {e}") from None
    if _NOT_RE2.search(value):
        raise fail(node, f"regular expression {value!r}: RE2 (Envoy's regular expressions) has no lookaround, "
                         "backreferences or atomic groups")


def _pool_ref(ref: Any, ns: str, what: str, fail: Fail,
              backend_allowed: Callable[[str, PoolRef], bool] | None) -> PoolRef:
    if not isinstance(ref, dict):
        raise fail(ref, f"{what} must be a mapping")
    kind = ref.get("kind", "Service")
    group = ref.get("group", "")
    if kind != "InferencePool" or group not in POOL_GROUPS:
        raise fail(ref, f"{what} to {kind} (group {group!r}) is not supported: epp gateway routes to "
                        f"InferencePools (kind InferencePool, group {POOL_GROUPS[0]})")
    name = _str(ref, "name", what, fail, required=True)
    port = ref.get("port")
    if port is not None:
        raise fail(ref, f"{what}.port must not be set for an InferencePool (its targetPorts say where pods listen)")
    pool = PoolRef(str(ref.get("namespace") or ns), str(name))
    if pool.namespace != ns and not (backend_allowed and backend_allowed(ns, pool)):
        raise fail(ref, f"{what} to InferencePool {pool} crosses namespaces; that needs a ReferenceGrant in "
                        f"namespace {pool.namespace} from HTTPRoutes in {ns}")
    return pool


def _backends(node: Any, rule: dict[str, Any], index: int, ns: str, fail: Fail,
              backend_allowed: Callable[[str, PoolRef], bool] | None) -> tuple[Backend, ...]:
    if node is None:
        return ()
    if not isinstance(node, list):
        raise fail(rule, f"rules[{index}].backendRefs must be a list")
    out, seen = [], set()
    for ref in node:
        if isinstance(ref, dict):
            _only(ref, ("group", "kind", "name", "namespace", "port", "weight"), "backendRef", fail)
        pool = _pool_ref(ref, ns, "backendRef", fail, backend_allowed)
        weight = ref.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise fail(ref, f"backendRef weight must be an integer 0-1000000, got {weight!r}")
        if pool in seen:
            raise fail(ref, f"InferencePool {pool} is listed twice in one rule's backendRefs")
        seen.add(pool)
        out.append(Backend(pool, weight))
    return tuple(out)


def _mirror(f: dict[str, Any], ns: str, fail: Fail, backend_allowed: Callable[[str, PoolRef], bool] | None) -> Mirror:
    _only(f, ("type", "requestMirror"), "filter", fail)
    spec = f.get("requestMirror")
    if not isinstance(spec, dict):
        raise fail(f, "a RequestMirror filter needs requestMirror.backendRef")
    _only(spec, ("backendRef", "percent", "fraction"), "requestMirror", fail)
    ref = spec.get("backendRef")
    if isinstance(ref, dict):
        _only(ref, ("group", "kind", "name", "namespace", "port"), "requestMirror.backendRef", fail)
    pool = _pool_ref(ref, ns, "requestMirror.backendRef", fail, backend_allowed)
    percent = 100.0
    if "percent" in spec and "fraction" in spec:
        raise fail(spec, "requestMirror takes percent or fraction, not both")
    if "percent" in spec:
        p = spec["percent"]
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 100:
            raise fail(spec, f"requestMirror.percent must be an integer 0-100, got {p!r}")
        percent = float(p)
    elif "fraction" in spec:
        fr = spec["fraction"]
        num = fr.get("numerator") if isinstance(fr, dict) else None
        den = fr.get("denominator", 100) if isinstance(fr, dict) else None
        if (not isinstance(num, int) or not isinstance(den, int) or isinstance(num, bool)
                or isinstance(den, bool) or den <= 0 or not 0 <= num <= den):
            raise fail(spec, "requestMirror.fraction needs integers 0 <= numerator <= denominator, denominator > 0")
        percent = 100.0 * num / den
    return Mirror(pool, percent)


def _header_edits(spec: Any, f: dict[str, Any], what: str, fail: Fail) -> HeaderEdits:
    _only(f, ("type", what), "filter", fail)
    if not isinstance(spec, dict):
        raise fail(f, f"a {f.get('type')} filter needs {what}")
    _only(spec, ("set", "add", "remove"), what, fail)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        items = spec.get(key) or []
        if not isinstance(items, list):
            raise fail(spec, f"{what}.{key} must be a list of name/value")
        out = []
        for h in items:
            if (not isinstance(h, dict) or not isinstance(h.get("name"), str) or not _HEADER_NAME.match(h["name"])
                    or not isinstance(h.get("value"), str)):
                raise fail(items, f"{what}.{key}: each entry needs a header name and a string value")
            out.append((h["name"].lower(), h["value"]))
        return tuple(out)

    remove = spec.get("remove") or []
    if not isinstance(remove, list) or not all(isinstance(h, str) and _HEADER_NAME.match(h) for h in remove):
        raise fail(spec, f"{what}.remove must be a list of header names")
    return HeaderEdits(pairs("set"), pairs("add"), tuple(h.lower() for h in remove))


def gateway_duration(value: Any) -> float:
    """Seconds from a Gateway API duration (GEP-2257: "10s", "1m30s", "500ms"; "0s" means none)."""
    if not isinstance(value, str) or not _GATEWAY_DURATION.match(value):
        raise ValueError(f"{value!r} is not a Gateway API duration (e.g. 10s, 1m30s, 500ms; 0s for no limit)")
    return parse_duration(value)


def _timeout(node: Any, rule: dict[str, Any], fail: Fail) -> float | None:
    """The rule's limit on one request: `request`, narrowed by `backendRequest` (no retries here)."""
    if node is None:
        return None
    if not isinstance(node, dict):
        raise fail(rule, "timeouts must be a mapping with request and/or backendRequest")
    _only(node, ("request", "backendRequest"), "timeouts", fail)
    values = {}
    for key in ("request", "backendRequest"):
        if key in node:
            try:
                values[key] = gateway_duration(node[key])
            except ValueError as e:
                raise fail(node, f"timeouts.{key}: {e}") from None
    request, backend = values.get("request"), values.get("backendRequest")
    if request and backend and backend > request:
        raise fail(node, "timeouts.backendRequest must not be longer than timeouts.request")
    limits = [t for t in (request, backend) if t]
    if limits:
        return min(limits)
    return 0.0 if values else None
