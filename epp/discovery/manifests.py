"""Pool state from Kubernetes objects, one path for every source.

`snapshot_from_objects` turns the objects the Kubernetes discovery watches (the
InferencePool: its selector and target ports; the Pods it selects: IP, labels,
readiness; the InferenceObjectives that reference it: priority per objective; its
InferenceModelRewrites) into a `PoolSnapshot`. The API watcher
(`epp.discovery.kubernetes`) and the pool file (`--pool-file pool.yaml`, no cluster
needed) both call it, so a pool means the same thing wherever it comes from.

A pool file holds the same objects as YAML documents (or a `kind: List`, as
`kubectl get -o yaml` writes). Other kinds (Deployments, Services, ...) are skipped, so
a whole manifest can be given. A file that holds only objectives and rewrites is fine:
the endpoints then come from `--endpoints`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from epp.datastore import Endpoint
from epp.discovery.selectors import LabelSelector
from epp.rewrites import RewriteRule
from epp.yaml_lines import YamlError, load_documents, where

log = logging.getLogger(__name__)

V1_GROUP = "inference.networking.k8s.io"  # the GA InferencePool (v1)
X_GROUP = "inference.networking.x-k8s.io"  # the alpha pool (v1alpha2); GIE's objectives and rewrites
LLMD_GROUP = "llm-d.ai"  # llm-d-router's objectives and rewrites (v1alpha2)
POOL_GROUPS = (V1_GROUP, X_GROUP)
# Where both are installed llm-d-router prefers its own group; a file with both lets llm-d.ai win a name.
OBJECTIVE_GROUPS = (LLMD_GROUP, X_GROUP)
# Upstream's pod annotation: the subset of the pool's target ports this pod serves now.
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"


class ManifestError(ValueError):
    """A problem in a pool object; from a file, the message names the file and line."""


@dataclass
class PoolSnapshot:
    """The pool as one consistent read of its objects says it is."""

    has_pool: bool = False
    endpoints: list[Endpoint] = field(default_factory=list)
    objectives: dict[str, int] = field(default_factory=dict)
    rewrites: list[RewriteRule] = field(default_factory=list)
    app_protocol: str = ""  # the pool's spec.appProtocol; "" when unset
    target_ports: list[int] = field(default_factory=list)  # one: --model-server-metrics-port applies
    # Objects left out because they are invalid (only where the caller did not ask for strictness).
    errors: list[str] = field(default_factory=list)


Fail = Callable[[Any, str], ManifestError]


def _group(obj: dict[str, Any]) -> str:
    return str(obj.get("apiVersion", "")).partition("/")[0]


def _objects(docs: list[Any], source: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, dict):
            raise ManifestError(f"{where(doc, source)}: each document must be a Kubernetes object (a mapping)")
        if str(doc.get("kind", "")).endswith("List") and "items" in doc:
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{where(doc, source)}: 'items' must be a list")
            out.extend(_objects(items, source))
        else:
            out.append(doc)
    return out


def _meta(obj: dict[str, Any], default_namespace: str) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("name") or ""), str(meta.get("namespace") or default_namespace)


def _failer(source: str) -> Fail:
    def fail(obj: Any, msg: str) -> ManifestError:
        return ManifestError(f"{where(obj, source)}: {msg}" if source else msg)
    return fail


def parse(text: str, source: str, pool_name: str, namespace: str) -> PoolSnapshot:
    """Read the objects for pool `namespace/pool_name` from the text of a pool file."""
    try:
        objects = _objects(load_documents(text, source), source)
    except YamlError as e:
        raise ManifestError(str(e)) from None
    fail = _failer(source)
    pools = [o for o in objects if o.get("kind") == "InferencePool" and _group(o) in POOL_GROUPS]
    pool = None
    for o in pools:
        if _meta(o, namespace) == (pool_name, namespace):
            pool = o
    if pool is None and len(pools) == 1 and pool_name == "default":
        pool = pools[0]  # --pool-name not given and the file has one pool: that one
    if pool is None and pools:
        names = ", ".join("/".join(reversed(_meta(o, namespace))) for o in pools)
        raise fail(pools[0], f"no InferencePool {namespace}/{pool_name} here (found {names}); set --pool-name")
    if pool is not None:
        pool_name, namespace = _meta(pool, namespace)
    return snapshot_from_objects(objects, pool_name, namespace, pool_group=_group(pool) if pool else None,
                                 source=source)


def snapshot_from_objects(
    objects: Iterable[dict[str, Any]],
    pool_name: str,
    namespace: str,
    *,
    pool_group: str | None = None,
    endpoint_selector: tuple[LabelSelector, list[int]] | None = None,
    source: str = "",
    strict: bool = True,
) -> PoolSnapshot:
    """The pool `namespace/pool_name` as `objects` describe it.

    `pool_group` names the InferencePool's API group (None: either). `endpoint_selector`
    is upstream's pool-less mode (`--endpoint-selector`, `--endpoint-target-ports`): the
    pods it selects are the pool and no InferencePool is looked for. Objects in other
    namespaces and objectives or rewrites of other pools are skipped. With `strict`, an
    invalid objective or rewrite raises `ManifestError`; without, it is left out and named
    in `errors` (the API source: one bad object must not hide the others). An invalid
    pool always raises: without its selector there is nothing to build.
    """
    objects = list(objects)
    fail = _failer(source)
    snap = PoolSnapshot()
    selector_ports: tuple[LabelSelector, list[int]] | None = endpoint_selector
    if endpoint_selector is None:
        for o in objects:
            if (o.get("kind") == "InferencePool" and _group(o) in POOL_GROUPS
                    and (pool_group is None or _group(o) == pool_group)
                    and _meta(o, namespace) == (pool_name, namespace)):
                selector_ports = pool_spec(o, fail)
                snap.app_protocol = str((o.get("spec") or {}).get("appProtocol") or "")
                pool_group = _group(o)
    if selector_ports is not None:
        snap.has_pool = True
        selector, ports = selector_ports
        snap.target_ports = list(ports)
        for o in objects:
            if o.get("kind") == "Pod" and _meta(o, namespace)[1] == namespace:
                snap.endpoints.extend(pod_endpoints(o, selector, ports))

    ref_groups = ("", pool_group or V1_GROUP)  # poolRef.group defaults to the GA group in the CRD

    def for_this_pool(o: dict[str, Any]) -> bool:
        ref = (o.get("spec") or {}).get("poolRef") or {}
        if not isinstance(ref, dict) or not ref.get("name"):
            raise fail(o, f"{o.get('kind')} {_meta(o, namespace)[0]!r} needs spec.poolRef.name")
        return (ref["name"] == pool_name and str(ref.get("group") or "") in ref_groups
                and _meta(o, namespace)[1] == namespace)

    objective_group: dict[str, str] = {}
    rewrites: list[tuple[str, int, list[RewriteRule]]] = []
    for i, o in enumerate(objects):
        kind, group = o.get("kind"), _group(o)
        if kind not in ("InferenceObjective", "InferenceModelRewrite") or group not in OBJECTIVE_GROUPS:
            continue
        try:
            if not for_this_pool(o):
                continue
            if kind == "InferenceObjective":
                name, priority = _objective(o, fail)
                if objective_group.get(name) == LLMD_GROUP and group != LLMD_GROUP:
                    continue  # the same objective in both groups: llm-d.ai's, as upstream prefers it
                snap.objectives[name] = priority
                objective_group[name] = group
            else:
                created = str((o.get("metadata") or {}).get("creationTimestamp") or "")
                rewrites.append((created, i, _rewrite_rules(o, fail)))
        except ManifestError as e:
            if strict:
                raise
            snap.errors.append(str(e))
    # Precedence among equals: the oldest resource (no timestamp: file order), then list order.
    for _, _, rules in sorted(rewrites, key=lambda r: (r[0] == "", r[0], r[1])):
        snap.rewrites.extend(rules)
    return snap


def _objective(o: dict[str, Any], fail: Fail) -> tuple[str, int]:
    name = _meta(o, "")[0]
    priority = (o.get("spec") or {}).get("priority", 0)
    if not name:
        raise fail(o, "InferenceObjective needs metadata.name")
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise fail(o["spec"], f"InferenceObjective {name!r}: priority must be an integer, got {priority!r}")
    return name, priority


def pool_spec(pool: dict[str, Any], fail: Fail | None = None) -> tuple[LabelSelector, list[int]]:
    """The pool's pod selector and target ports, v1 (`selector.matchLabels`, `targetPorts`) or v1alpha2."""
    fail = fail or _failer("")
    name = _meta(pool, "")[0]
    spec = pool.get("spec") or {}
    selector = spec.get("selector") or {}
    if not isinstance(selector, dict):
        raise fail(spec, f"InferencePool {name!r}: spec.selector must be a mapping")
    # v1: selector.matchLabels; v1alpha2: the labels directly.
    labels = selector.get("matchLabels") if "matchLabels" in selector else selector
    if not labels or not isinstance(labels, dict):
        raise fail(spec, f"InferencePool {name!r}: spec.selector must name at least one label")
    if "targetPorts" in spec:
        entries = spec["targetPorts"]
        if not isinstance(entries, list) or not entries:
            raise fail(spec, f"InferencePool {name!r}: spec.targetPorts must be a non-empty list")
        ports = [e.get("number") if isinstance(e, dict) else None for e in entries]
    else:
        ports = [spec.get("targetPortNumber")]
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise fail(spec.get("targetPorts", spec),
                       f"InferencePool {name!r}: target port must be a number 1-65535, got {p!r}")
    return LabelSelector.from_labels({str(k): str(v) for k, v in labels.items()}), ports  # type: ignore[return-value]


def pod_endpoints(pod: dict[str, Any], selector: LabelSelector, ports: list[int]) -> list[Endpoint]:
    """The endpoints of one pod: one per target port it serves, none if unselected or without an IP.

    Ready means: not terminating, phase Running and the Ready condition True (a hand-written
    pod without conditions counts as ready). With several target ports each endpoint is
    named `<pod>-rank-<index>` as upstream names them; the pod's
    `inference.networking.k8s.io/active-ports` annotation narrows the ports it serves.
    """
    meta = pod.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    if not selector.matches(labels):
        return []
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return []  # not scheduled yet: no address to route to
    ready = not meta.get("deletionTimestamp") and status.get("phase", "Running") == "Running"
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            ready = ready and str(cond.get("status")) == "True"
    name = str(meta.get("name") or ip)
    active = _active_ports((meta.get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION), ports)
    return [
        Endpoint(str(ip), port, name=name if len(ports) == 1 else f"{name}-rank-{rank}", labels=labels, ready=ready)
        for rank, port in enumerate(ports) if port in active
    ]


def _active_ports(annotation: Any, ports: list[int]) -> set[int]:
    if annotation is None:
        return set(ports)
    active = set()
    for part in str(annotation).split(","):
        try:
            port = int(part.strip())
        except ValueError:
            continue  # upstream skips what is not a number
        if port in ports:
            active.add(port)
    return active


def _rewrite_rules(obj: dict[str, Any], fail: Fail) -> list[RewriteRule]:
    name = str((obj.get("metadata") or {}).get("name") or "")
    rules = (obj.get("spec") or {}).get("rules")
    if not isinstance(rules, list) or not rules:
        raise fail(obj, f"InferenceModelRewrite {name!r} needs spec.rules")
    out = []
    for rule in rules:
        if not isinstance(rule, dict):
            raise fail(rules, f"InferenceModelRewrite {name!r}: each rule must be a mapping")
        models = set()
        for m in rule.get("matches") or []:
            model = (m or {}).get("model") or {}
            if model.get("type", "Exact") != "Exact" or not isinstance(model.get("value"), str) or not model["value"]:
                raise fail(rule, f"InferenceModelRewrite {name!r}: a match needs model.value (type Exact)")
            models.add(model["value"])
        targets = rule.get("targets")
        if not isinstance(targets, list) or not targets:
            raise fail(rule, f"InferenceModelRewrite {name!r}: a rule needs at least one target")
        names, weights = [], []
        for t in targets:
            if not isinstance(t, dict) or not isinstance(t.get("modelRewrite"), str) or not t["modelRewrite"]:
                raise fail(rule, f"InferenceModelRewrite {name!r}: each target needs modelRewrite")
            w = t.get("weight", 0)
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 1_000_000:
                raise fail(rule, f"InferenceModelRewrite {name!r}: weight must be an integer 1-1000000, got {w!r}")
            names.append(t["modelRewrite"])
            weights.append(w)
        if any(weights) and not all(weights):
            raise fail(rule, f"InferenceModelRewrite {name!r}: give a weight for every target or for none")
        out.append(RewriteRule(name, frozenset(models), tuple(names), tuple(weights)))
    return out


def read(path: str, pool_name: str, namespace: str) -> PoolSnapshot:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read pool file {path}: {e.strerror}") from None
    return parse(text, path, pool_name, namespace)


class PoolFileWatcher:
    """Re-reads the pool file when it changes; a bad edit is logged and the last good state kept."""

    def __init__(
        self, path: str, pool_name: str, namespace: str, apply: Callable[[PoolSnapshot], None], interval: float = 1.0
    ) -> None:
        self.path, self.pool_name, self.namespace = path, pool_name, namespace
        self.apply = apply
        self.interval = interval
        self._stamp = self._stat()
        self.reloads = 0
        self.last_error: str | None = None

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = await asyncio.to_thread(self._stat)
            if stamp is None or stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                snap = await asyncio.to_thread(read, self.path, self.pool_name, self.namespace)
            except ManifestError as e:
                self.last_error = str(e)
                log.error("pool file not reloaded, keeping the last good state: %s", e)
                continue
            self.apply(snap)
            self.reloads += 1
            self.last_error = None
            log.info("pool file %s reloaded: %d endpoints, %d objectives, %d rewrite rules",
                     self.path, len(snap.endpoints), len(snap.objectives), len(snap.rewrites))
