"""The gateway's configuration from the manifests users `kubectl apply`: files or directories of YAML.

Read: Gateways (and GKE's InferenceGateway) for listeners, HTTPRoutes (epp.gateway.httproute),
ReferenceGrants for backendRefs across namespaces, InferencePools with the Pods they select,
their InferenceObjectives and InferenceModelRewrites (the pool side is
epp.discovery.manifests.snapshot_from_objects, as `epp serve --pool-file` reads it), and
body-based routing's bbr-managed ConfigMaps. Other kinds (Deployments, Services, ...)
are counted and skipped, so a whole application manifest can be given.

Every problem found is reported with file:line, all of them at once; nothing is applied
from a set of manifests with a problem (the caller keeps its last good configuration).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.discovery import manifests as pool_manifests
from epp.discovery.manifests import OBJECTIVE_GROUPS, POOL_GROUPS, PoolSnapshot
from epp.gateway import base_models
from epp.gateway.base_models import BaseModelError, BaseModels
from epp.gateway.httproute import GATEWAY_GROUP, PoolRef, Route, RouteError, parse_route
from epp.yaml_lines import YamlError, load_documents, where

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
GATEWAY_KINDS = {("Gateway", GATEWAY_GROUP), ("InferenceGateway", POOL_GROUPS[0])}
FAIL_OPEN, FAIL_CLOSE = "FailOpen", "FailClose"


class ManifestError(ValueError):
    """Problems in the manifests, each 'file:line: what'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"{head} in the manifests:\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class Listener:
    gateway: str  # namespace/name
    name: str
    port: int
    hostname: str | None
    allowed_namespaces: str  # Same or All
    namespace: str  # the Gateway's
    where: str


@dataclass
class Pool:
    ref: PoolRef
    where: str
    snapshot: PoolSnapshot
    fail_open: bool
    document: str  # the pool's own objects as YAML: its picker's pool file


@dataclass
class GatewaySpec:
    listeners: tuple[Listener, ...]
    routes: tuple[Route, ...]
    attachments: dict[str, tuple[Listener, ...]]  # route key -> the listeners it attached to
    pools: dict[PoolRef, Pool]
    base_models: BaseModels
    files: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> objects the gateway does not use


@dataclass
class _Loaded:
    obj: dict[str, Any]
    source: str

    @property
    def where(self) -> str:
        return where(self.obj, self.source)

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind") or "")

    @property
    def group(self) -> str:
        api = str(self.obj.get("apiVersion") or "")
        return api.partition("/")[0] if "/" in api else ""

    def meta(self, default_namespace: str) -> tuple[str, str]:
        m = self.obj.get("metadata") or {}
        return str(m.get("namespace") or default_namespace), str(m.get("name") or "")


def manifest_files(paths: Sequence[str]) -> list[str]:
    """The files `paths` name: files as given, directories walked for *.yaml, *.yml and *.json.

    Hidden files and directories (editors' swap files, `.git`) are skipped.
    """
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out.extend(os.path.join(root, f) for f in sorted(files)
                           if f.endswith(MANIFEST_SUFFIXES) and not f.startswith("."))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise ManifestError([f"{p}: no such file or directory"])
    if not out:
        raise ManifestError([f"{', '.join(paths)}: no manifest files (*.yaml, *.yml, *.json)"])
    return out


def stamp(files: Iterable[str]) -> tuple[tuple[str, int, int], ...]:
    """What changes when any of the files does (mtime and size), to notice edits cheaply."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, -1, -1))
    return tuple(out)


def load(paths: Sequence[str], namespace: str = "default") -> GatewaySpec:
    """Read and check every manifest under `paths`; ManifestError lists every problem."""
    files = manifest_files(paths)
    problems: list[str] = []
    loaded: list[_Loaded] = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            docs = load_documents(text, f)
        except OSError as e:
            problems.append(f"{f}: cannot read: {e.strerror}")
            continue
        except YamlError as e:
            problems.append(str(e))
            continue
        _flatten(docs, f, loaded, problems)
    spec = _assemble(loaded, namespace, problems)
    if problems:
        raise ManifestError(problems)
    spec.files = tuple(files)
    return spec


def _flatten(docs: list[Any], source: str, out: list[_Loaded], problems: list[str]) -> None:
    for doc in docs:
        if not isinstance(doc, dict):
            problems.append(f"{where(doc, source)}: each document must be a Kubernetes object (a mapping)")
        elif str(doc.get("kind", "")).endswith("List") and "items" in doc:
            items = doc.get("items") or []
            if isinstance(items, list):
                _flatten(items, source, out, problems)
            else:
                problems.append(f"{where(doc, source)}: 'items' must be a list")
        else:
            out.append(_Loaded(doc, source))


def _assemble(loaded: list[_Loaded], namespace: str, problems: list[str]) -> GatewaySpec:
    seen: dict[tuple[str, str, str, str], str] = {}
    gateways: dict[tuple[str, str], _Loaded] = {}
    routes: list[_Loaded] = []
    grants: list[_Loaded] = []
    pools: dict[PoolRef, _Loaded] = {}
    pods: list[_Loaded] = []
    pool_objects: list[_Loaded] = []  # objectives and rewrites
    configmaps: list[tuple[dict[str, Any], str]] = []
    skipped: Counter[str] = Counter()
    for item in loaded:
        kind, group = item.kind, item.group
        ns, name = item.meta(namespace)
        if not kind:
            problems.append(f"{item.where}: the object has no kind")
            continue
        ident = (kind, group, ns, name)
        if name and ident in seen:
            problems.append(f"{item.where}: {kind} {ns}/{name} is defined twice (also at {seen[ident]}); "
                            "in a cluster the second would replace the first")
            continue
        seen[ident] = item.where
        if (kind, group) in GATEWAY_KINDS:
            gateways[(ns, name)] = item
        elif kind == "HTTPRoute" and group == GATEWAY_GROUP:
            routes.append(item)
        elif kind == "ReferenceGrant" and group == GATEWAY_GROUP:
            grants.append(item)
        elif kind == "InferencePool" and group in POOL_GROUPS:
            pools[PoolRef(ns, name)] = item
        elif kind == "Pod" and group == "":
            pods.append(item)
        elif kind in ("InferenceObjective", "InferenceModelRewrite") and group in OBJECTIVE_GROUPS:
            pool_objects.append(item)
        elif base_models.is_bbr_configmap(item.obj):
            configmaps.append((item.obj, item.where))
        else:
            skipped[kind] += 1
    listeners = _listeners(gateways, problems)
    allowed = _grants(grants, namespace, problems)
    parsed_routes, attachments = _routes(routes, namespace, gateways, listeners, allowed, problems)
    built = _pools(pools, pods, pool_objects, namespace, problems)
    for route in parsed_routes:
        for rule in route.rules:
            refs = [(b.pool, "backendRef") for b in rule.backends] + [(m.pool, "RequestMirror") for m in rule.mirrors]
            for pool, what in refs:
                if pool not in built and pool not in pools:
                    known = ", ".join(sorted(map(str, pools))) or "none"
                    problems.append(f"{rule.where}: HTTPRoute {route.name}: {what} names InferencePool {pool}, which "
                                    f"is not in the manifests (InferencePools here: {known})")
    try:
        bm = base_models.from_configmaps(configmaps)
    except BaseModelError as e:
        problems.append(str(e))
        bm = BaseModels()
    all_listeners = tuple(lst for ls in listeners.values() for lst in ls)
    return GatewaySpec(all_listeners, tuple(parsed_routes), attachments, built, bm, (), dict(skipped))


def _listeners(gateways: dict[tuple[str, str], _Loaded], problems: list[str]) -> dict[tuple[str, str], list[Listener]]:
    out: dict[tuple[str, str], list[Listener]] = {}
    for (ns, name), item in gateways.items():
        kind = item.kind

        def bad(node: Any, msg: str, item: _Loaded = item, kind: str = kind, name: str = name) -> None:
            problems.append(f"{where(node, item.source)}: {kind} {name}: {msg}")

        spec = item.obj.get("spec")
        if not name:
            bad(item.obj, "metadata.name is required")
            continue
        if not isinstance(spec, dict):
            bad(item.obj, "spec must be a mapping")
            continue
        for key in spec:
            if key == "addresses" and spec[key]:
                bad(spec, "spec.addresses is not supported: epp gateway listens on the address given by --address")
            elif key not in ("gatewayClassName", "listeners", "addresses"):
                bad(spec, f"spec.{key} is not supported by epp gateway (it reads gatewayClassName and listeners)")
        entries = spec.get("listeners")
        if not isinstance(entries, list) or not entries:
            bad(spec, "spec.listeners must list at least one listener")
            continue
        got: list[Listener] = []
        for entry in entries:
            lst = _listener(entry, ns, name, bad)
            if lst is None:
                continue
            if any(o.name == lst.name for o in got):
                bad(entry, f"listener name {lst.name!r} is used twice")
            elif any(o.port == lst.port and o.hostname == lst.hostname for o in got):
                bad(entry, f"listeners {lst.name!r} and another both take port {lst.port}"
                           + (f" for {lst.hostname}" if lst.hostname else ""))
            else:
                got.append(Listener(f"{ns}/{name}", lst.name, lst.port, lst.hostname, lst.allowed_namespaces, ns,
                                    where(entry, item.source)))
        out[(ns, name)] = got
    return out


def _listener(entry: Any, ns: str, gateway: str, bad: Any) -> Listener | None:
    if not isinstance(entry, dict):
        bad(entry, "each listener must be a mapping")
        return None
    for key in entry:
        if key not in ("name", "port", "protocol", "hostname", "allowedRoutes"):
            bad(entry, f"listener field {key!r} is not supported by epp gateway")
            return None
    name, port, protocol = entry.get("name"), entry.get("port"), entry.get("protocol", "HTTP")
    if not isinstance(name, str) or not name:
        bad(entry, "a listener needs a name")
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        bad(entry, f"listener {name}: port must be 1-65535, got {port!r}")
        return None
    if protocol != "HTTP":
        bad(entry, f"listener {name}: protocol {protocol} is not supported by epp gateway (HTTP only; terminate "
                   "TLS in front of it)")
        return None
    hostname = entry.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not hostname):
        bad(entry, f"listener {name}: hostname must be a host name")
        return None
    allowed = "Same"
    routes = entry.get("allowedRoutes") or {}
    if not isinstance(routes, dict):
        bad(entry, f"listener {name}: allowedRoutes must be a mapping")
        return None
    kinds = routes.get("kinds")
    if kinds is not None and not any(isinstance(k, dict) and k.get("kind") == "HTTPRoute"
                                     and k.get("group", GATEWAY_GROUP) == GATEWAY_GROUP for k in kinds):
        bad(routes, f"listener {name}: allowedRoutes.kinds does not include HTTPRoute, the kind epp gateway serves")
        return None
    namespaces = routes.get("namespaces") or {}
    allowed = str(namespaces.get("from") or "Same") if isinstance(namespaces, dict) else ""
    if allowed not in ("Same", "All"):
        bad(routes, f"listener {name}: allowedRoutes.namespaces.from {allowed or namespaces!r} is not supported "
                    "(Same or All)")
        return None
    return Listener(f"{ns}/{gateway}", name, port, hostname.lower() if hostname else None, allowed, ns, "")


def _grants(grants: list[_Loaded], namespace: str, problems: list[str]) -> set[tuple[str, str, str | None]]:
    """(route namespace, pool namespace, pool name or None for any) pairs ReferenceGrants allow."""
    allowed: set[tuple[str, str, str | None]] = set()
    for item in grants:
        ns, name = item.meta(namespace)
        spec = item.obj.get("spec") or {}
        froms, tos = spec.get("from"), spec.get("to")
        if not isinstance(froms, list) or not isinstance(tos, list):
            problems.append(f"{item.where}: ReferenceGrant {name}: spec.from and spec.to must be lists")
            continue
        for f in froms:
            if not (isinstance(f, dict) and f.get("kind") == "HTTPRoute" and f.get("group") == GATEWAY_GROUP
                    and f.get("namespace")):
                continue
            for t in tos:
                if isinstance(t, dict) and t.get("kind") == "InferencePool" and t.get("group") in POOL_GROUPS:
                    allowed.add((str(f["namespace"]), ns, str(t["name"]) if t.get("name") else None))
    return allowed


def _routes(routes: list[_Loaded], namespace: str, gateways: dict[tuple[str, str], _Loaded],
            listeners: dict[tuple[str, str], list[Listener]], allowed: set[tuple[str, str, str | None]],
            problems: list[str]) -> tuple[list[Route], dict[str, tuple[Listener, ...]]]:
    def backend_allowed(route_ns: str, pool: PoolRef) -> bool:
        return (route_ns, pool.namespace, pool.name) in allowed or (route_ns, pool.namespace, None) in allowed

    parsed: list[Route] = []
    attachments: dict[str, tuple[Listener, ...]] = {}
    for item in routes:
        try:
            route = parse_route(item.obj, item.source, namespace, backend_allowed)
        except RouteError as e:
            problems.append(str(e))
            continue
        attached: list[Listener] = []
        for ref in route.parents:
            gw = (ref.namespace, ref.name)
            if gw not in gateways:
                known = ", ".join(f"{n}/{m}" for n, m in sorted(gateways)) or "none"
                problems.append(f"{ref.where}: HTTPRoute {route.name}: parentRef names {ref.kind} {ref.namespace}/"
                                f"{ref.name}, which is not in the manifests (Gateways here: {known})")
                continue
            candidates = [lst for lst in listeners.get(gw, [])
                          if (ref.section is None or lst.name == ref.section)
                          and (ref.port is None or lst.port == ref.port)]
            if not candidates:
                what = " ".join(x for x in (f"sectionName {ref.section}" if ref.section else "",
                                            f"port {ref.port}" if ref.port else "") if x)
                problems.append(f"{ref.where}: HTTPRoute {route.name}: Gateway {ref.namespace}/{ref.name} has no "
                                f"listener with {what}")
                continue
            ok = [lst for lst in candidates if lst.allowed_namespaces == "All" or lst.namespace == route.namespace]
            if not ok:
                problems.append(f"{ref.where}: HTTPRoute {route.name} is in namespace {route.namespace}, and the "
                                f"listeners of Gateway {ref.namespace}/{ref.name} take routes from their own "
                                "namespace only (allowedRoutes.namespaces.from: Same)")
                continue
            attached.extend(lst for lst in ok if lst not in attached)
        if attached:
            parsed.append(route)
            attachments[route.key] = tuple(attached)
    return parsed, attachments


def _pools(pools: dict[PoolRef, _Loaded], pods: list[_Loaded], pool_objects: list[_Loaded], namespace: str,
           problems: list[str]) -> dict[PoolRef, Pool]:
    members: dict[PoolRef, list[_Loaded]] = {ref: [] for ref in pools}
    for item in pool_objects:
        ns, name = item.meta(namespace)
        ref_spec = (item.obj.get("spec") or {}).get("poolRef")
        if not isinstance(ref_spec, dict) or not ref_spec.get("name"):
            problems.append(f"{item.where}: {item.kind} {name!r} needs spec.poolRef.name")
            continue
        ref = PoolRef(ns, str(ref_spec["name"]))
        pool = pools.get(ref)
        if pool is None:
            known = ", ".join(sorted(map(str, pools))) or "none"
            problems.append(f"{item.where}: {item.kind} {name!r} names InferencePool {ref}, which is not in the "
                            f"manifests (InferencePools here: {known})")
            continue
        ref_group = str(ref_spec.get("group") or "")
        if ref_group not in ("", pool.group):
            problems.append(f"{item.where}: {item.kind} {name!r}: poolRef.group {ref_group!r} does not match "
                            f"InferencePool {ref}'s group {pool.group!r}")
            continue
        try:  # checked alone, so that an error names this object's own file
            pool_manifests.snapshot_from_objects([pool.obj, item.obj], ref.name, ref.namespace,
                                                 pool_group=pool.group, source=item.source)
        except pool_manifests.ManifestError as e:
            problems.append(str(e))
            continue
        members[ref].append(item)
    out: dict[PoolRef, Pool] = {}
    for ref, item in pools.items():
        if not ref.name:
            problems.append(f"{item.where}: InferencePool needs metadata.name")
            continue
        fail_open = _failure_mode(item, problems)
        try:
            selector, _ = pool_manifests.pool_spec(item.obj, _failer(item.source))
            own_pods = [p for p in pods if p.meta(namespace)[0] == ref.namespace
                        and selector.matches({str(k): str(v) for k, v in
                                              ((p.obj.get("metadata") or {}).get("labels") or {}).items()})]
            objects = [item, *own_pods, *members[ref]]
            snap = pool_manifests.snapshot_from_objects([o.obj for o in objects], ref.name, ref.namespace,
                                                        pool_group=item.group, source=item.source)
        except pool_manifests.ManifestError as e:
            problems.append(str(e))
            continue
        if fail_open is None:
            continue
        document = yaml.safe_dump_all([_plain(o.obj, ref.namespace) for o in objects], sort_keys=False)
        out[ref] = Pool(ref, item.where, snap, fail_open, document)
    return out


def _failer(source: str) -> Any:
    def fail(node: Any, msg: str) -> pool_manifests.ManifestError:
        return pool_manifests.ManifestError(f"{where(node, source)}: {msg}")
    return fail


def _failure_mode(item: _Loaded, problems: list[str]) -> bool | None:
    """True for FailOpen: v1's endpointPickerRef.failureMode, v1alpha2's extensionRef.failureMode."""
    spec = item.obj.get("spec") or {}
    ref = spec.get("endpointPickerRef") or spec.get("extensionRef") or {}
    mode = ref.get("failureMode", FAIL_CLOSE) if isinstance(ref, dict) else FAIL_CLOSE
    if mode not in (FAIL_OPEN, FAIL_CLOSE):
        problems.append(f"{where(ref, item.source)}: InferencePool {item.meta('')[1]}: failureMode must be FailOpen "
                        f"or FailClose, got {mode!r}")
        return None
    return mode == FAIL_OPEN


def _plain(node: Any, namespace: str | None = None) -> Any:
    if isinstance(node, dict):
        out = {str(k): _plain(v) for k, v in node.items()}
        if namespace is not None:  # the pool file is read for one namespace: say it on every object
            meta = dict(out.get("metadata") or {})
            meta.setdefault("namespace", namespace)
            out["metadata"] = meta
        return out
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node
