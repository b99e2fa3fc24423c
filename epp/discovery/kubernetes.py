"""The pool from the Kubernetes API: list, then watch, as upstream's controllers do.

Watches the InferencePool (by name, in its namespace), the Pods its selector matches
(server-side `labelSelector`, re-derived when the pool's selector changes), and the
InferenceObjectives and InferenceModelRewrites of the namespace, whose `poolRef` the
snapshot function then matches. Upstream's pool-less mode (`--endpoint-selector`,
`--endpoint-target-ports`) watches only the Pods. Every change ends in one place:
`manifests.snapshot_from_objects`, the same function the pool file uses.

Objectives and rewrites exist in two API groups: `llm-d.ai` (llm-d-router) and
`inference.networking.x-k8s.io` (GIE). As llm-d-router does, the first one installed
in that order is watched and, when both are, the legacy group is ignored (logged once).
A group whose CRD is absent (404) or not granted (403) is not watched and is probed
again rarely.

The API being down never empties the pool: the stores keep what was last seen, each
watch retries with bounded, jittered exponential backoff, and an outage is logged once
when it starts and once when it ends. A watch that expires (410 Gone) relists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx2
import msgspec
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from epp.discovery.manifests import (
    ACTIVE_PORTS_ANNOTATION,
    LLMD_GROUP,
    OBJECTIVE_GROUPS,
    V1_GROUP,
    X_GROUP,
    ManifestError,
    PoolSnapshot,
    pool_spec,
    snapshot_from_objects,
)
from epp.discovery.selectors import LabelSelector

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_NAMESPACE = "default"
POOL_VERSIONS = {V1_GROUP: "v1", X_GROUP: "v1alpha2"}


class KubeConfigError(ValueError):
    """No usable Kubernetes client configuration; the message says what was tried."""


def load_kube_config(kubeconfig: str | None, *, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """The client configuration, looked for in controller-runtime's order (upstream's `ctrl.GetConfig`).

    `--kubeconfig` if given, else `$KUBECONFIG`, else in-cluster (the service account's
    token and CA, `KUBERNETES_SERVICE_HOST`/`_PORT`), else `~/.kube/config`. The
    service-account token is re-read when the API server answers 401, so the kubelet's
    rotation of bound tokens is followed.
    """
    env = os.environ
    if kubeconfig:
        return _from_file(kubeconfig, "--kubeconfig")
    if env.get("KUBECONFIG"):
        paths = [p for p in env["KUBECONFIG"].split(os.pathsep) if p]
        existing = [p for p in paths if Path(p).expanduser().is_file()]
        if not existing:
            raise KubeConfigError(f"KUBECONFIG names no existing file: {env['KUBECONFIG']}")
        if len(paths) > 1:
            log.info("KUBECONFIG lists %d files; using the first that exists, %s (files are not merged)",
                     len(paths), existing[0])
        return _from_file(existing[0], "KUBECONFIG")
    if env.get("KUBERNETES_SERVICE_HOST"):
        sa = Path(service_account_dir)
        if not env.get("KUBERNETES_SERVICE_PORT"):
            raise KubeConfigError("KUBERNETES_SERVICE_HOST is set but KUBERNETES_SERVICE_PORT is not")
        missing = [f for f in ("token", "ca.crt", "namespace") if not (sa / f).is_file()]
        if missing:
            raise KubeConfigError(f"in a cluster (KUBERNETES_SERVICE_HOST is set) but {sa} lacks "
                                  f"{', '.join(missing)}: is automountServiceAccountToken off?")
        try:
            return KubeConfig.from_service_account(service_account=str(sa))
        except ConfigError as e:
            raise KubeConfigError(f"in-cluster configuration from {sa}: {e}") from None
    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return _from_file(str(default), "the default kubeconfig")
    raise KubeConfigError("no Kubernetes configuration: not in a cluster (KUBERNETES_SERVICE_HOST unset), "
                          "no --kubeconfig, KUBECONFIG unset and ~/.kube/config missing")


def _from_file(path: str, what: str) -> KubeConfig:
    try:
        conf = KubeConfig.from_file(path)
        conf.get()  # fail here, with the file's name, if its current context is unusable
        return conf
    except ConfigError as e:
        raise KubeConfigError(f"{what} {path}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, msgspec.ValidationError) as e:
        raise KubeConfigError(f"{what} {path} is not a valid kubeconfig: {e}") from None


def pool_namespace(flag: str | None, *, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> str:
    """`--pool-namespace`, else `$NAMESPACE` (upstream's charts set it from the pod), else the pod's own
    namespace from its service account, else "default" (upstream stops at `$NAMESPACE`, then "default")."""
    if flag:
        return flag
    if os.environ.get("NAMESPACE"):
        return os.environ["NAMESPACE"]
    with contextlib.suppress(OSError):
        ns = (Path(service_account_dir) / "namespace").read_text().strip()
        if ns:
            return ns
    return DEFAULT_NAMESPACE


def deployment_name(pod_name: str | None) -> str:
    """The EPP Deployment's name from `$POD_NAME` (`<deployment>-<hash>-<id>`): upstream's pool name in
    pool-less mode, which names the leader-election Lease."""
    if not pod_name:
        raise ValueError("--endpoint-selector needs the POD_NAME environment variable (the downward API's "
                         "metadata.name), as upstream does, to name this EPP")
    m = re.match(r"^(.+)-[a-z0-9]+-[a-z0-9]+$", pod_name)
    if not m:
        raise ValueError(f"cannot tell the Deployment from POD_NAME {pod_name!r} (expected <deployment>-<hash>-<id>)")
    return m.group(1)


class Backoff:
    """Bounded exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling up to the cap."""

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial, self.maximum, self.rng = initial, maximum, rng
        self.attempts = 0

    def next(self) -> float:
        d = min(self.maximum, self.initial * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return d * (0.5 + self.rng.random() / 2)

    def reset(self) -> None:
        self.attempts = 0


class _NotInstalled(Exception):
    """The resource's URL is 404: its CRD is not installed (or was removed)."""


class _Outage:
    """One warning when the API server stops answering, one line when it is back; nothing per retry."""

    def __init__(self, describe: Callable[[], str], max_backoff: float) -> None:
        self.describe, self.max_backoff = describe, max_backoff
        self.since: float | None = None

    def failed(self, what: str, err: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("Kubernetes API unreachable (%s while watching %s); keeping %s, retrying with backoff "
                        "up to %.0fs", _describe_error(err), what, self.describe(), self.max_backoff)

    def recovered(self) -> None:
        if self.since is not None:
            log.info("Kubernetes API reachable again after %.1fs; resynced", time.monotonic() - self.since)
            self.since = None


def _describe_error(err: BaseException) -> str:
    if isinstance(err, ApiError):
        return f"HTTP {err.status.code} {err.status.reason or ''}: {err.status.message or ''}".strip()
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if text != type(err).__name__ else text


def _api_code(err: BaseException) -> int | None:
    if isinstance(err, ApiError):
        return err.status.code
    if isinstance(err, httpx2.HTTPStatusError):
        return err.response.status_code
    return None


def _slim_pod(pod: Any) -> dict[str, Any]:
    """What the snapshot reads of a pod; the rest (spec, most of status) is not kept in memory."""
    meta, st = pod.metadata, pod.status
    annotations = meta.annotations or {}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": meta.name, "namespace": meta.namespace, "labels": dict(meta.labels or {}),
            "annotations": {k: v for k, v in annotations.items() if k == ACTIVE_PORTS_ANNOTATION},
            "deletionTimestamp": msgspec.to_builtins(meta.deletionTimestamp) if meta.deletionTimestamp else None,
        },
        "status": {
            "podIP": st.podIP if st else None,
            "phase": (st.phase if st else None) or "Pending",
            "conditions": [{"type": c.type, "status": c.status} for c in (st.conditions or []) if c.type == "Ready"]
            if st else [],
        },
    }


class _Reflector:
    """List then watch one resource, keeping `store` (name -> object) equal to what the server holds."""

    def __init__(self, owner: KubernetesDiscovery, res: Any, kind: str, *, what: str,
                 label_selector: str = "", field_selector: str = "") -> None:
        self.owner, self.res, self.kind, self.what = owner, res, kind, what
        self.label_selector, self.field_selector = label_selector, field_selector
        self.store: dict[str, dict[str, Any]] = {}
        self.listed = False

    def _params(self) -> dict[str, str]:
        p = {"labelSelector": self.label_selector, "fieldSelector": self.field_selector}
        return {k: v for k, v in p.items() if v}

    def _convert(self, obj: Any) -> dict[str, Any]:
        if self.kind == "Pod":
            return _slim_pod(obj)
        out = dict(obj)
        out.setdefault("kind", self.kind)
        out.setdefault("apiVersion", self.res._api_info.resource.api_version)
        return out

    async def list(self, limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
        # lightkube's public list() takes selectors only as dicts; the raw query keeps set-based ones intact.
        gc = self.owner.client._client
        params: dict[str, Any] = self._params()
        if limit:
            params["limit"] = limit
        br = gc.prepare_request("list", res=self.res, namespace=self.owner.namespace, params=params)
        items = gc.list(br)
        out = [self._convert(o) async for o in items]
        return items.resourceVersion, out

    async def run(self) -> None:
        """Until cancelled. Raises `_NotInstalled` if the resource's CRD is (or becomes) absent."""
        owner = self.owner
        backoff = Backoff(owner.backoff_initial, owner.backoff_max, owner.rng)
        while True:
            try:
                rv, items = await self.list()
                self.store = {o["metadata"]["name"]: o for o in items}
                self.listed = True
                owner._forbidden_ok(self.what)
                owner._outage.recovered()
                backoff.reset()
                owner._changed(self)
                await self._watch(rv)
                await asyncio.sleep(backoff.next())  # the stream ended without an error: unusual, not a spin
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code = _api_code(e)
                if code == 410:  # the resourceVersion is too old: relist now
                    log.debug("watch of %s expired (410 Gone); relisting", self.what)
                    continue
                if code == 404:
                    raise _NotInstalled(self.what) from None
                if code == 403:
                    owner._forbidden(self.what, e)
                    await asyncio.sleep(owner.backoff_max)
                    continue
                if code == 401:
                    owner._log_once(f"401:{self.what}", logging.ERROR, "Kubernetes API refuses epp's credentials "
                                    "(401 Unauthorized) while watching %s: %s", self.what, _describe_error(e))
                elif not isinstance(e, (httpx2.HTTPError, OSError, TimeoutError, ApiError, msgspec.DecodeError)):
                    log.exception("unexpected error watching %s; retrying", self.what)
                else:
                    owner._outage.failed(self.what, e)
                await asyncio.sleep(backoff.next())

    async def _watch(self, rv: str) -> None:
        owner = self.owner
        timeout = max(1, int(owner.watch_timeout * (1 + owner.rng.random())))  # spread reconnects, as client-go
        params = {**self._params(), "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": timeout}
        gc = owner.client._client
        # lightkube's public watch() cannot ask for bookmarks; one level down it can. The driver resumes from
        # the last resourceVersion (bookmarks included) when the server ends a watch cleanly.
        br = gc.prepare_request("list", res=self.res, namespace=owner.namespace, watch=True, params=params)
        idle_limit = 2 * timeout + 60  # no event nor bookmark for this long: the connection is dead
        async with contextlib.aclosing(gc.watch(br)) as events:
            stream = events.__aiter__()
            while True:
                try:
                    async with asyncio.timeout(idle_limit):
                        kind, obj = await stream.__anext__()
                except StopAsyncIteration:
                    return
                if kind == "BOOKMARK":
                    continue
                name = obj.metadata.name
                if kind == "DELETED":
                    self.store.pop(name, None)
                else:
                    self.store[name] = self._convert(obj)
                owner._outage.recovered()
                owner._changed(self)


class _Kind:
    """Objectives or rewrites: which group is watched, and whether that question is settled."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self.reflector: _Reflector | None = None
        self.resolved = False  # listed once, or known to be absent / not granted

    @property
    def settled(self) -> bool:
        return self.resolved or (self.reflector is not None and self.reflector.listed)

    def objects(self) -> list[dict[str, Any]]:
        return list(self.reflector.store.values()) if self.reflector else []


class KubernetesDiscovery:
    """Keeps `apply(snapshot)` fed with the pool as the API server sees it.

    `apply` runs on the event loop and must be cheap; bursts of events are coalesced
    (`coalesce` seconds) into one snapshot, and a snapshot equal to the last is not
    applied again. `synced` is set once the pool (or the pool-less selector) and its pods
    were listed and that state was applied. `run()` returns only when cancelled.
    """

    def __init__(
        self,
        client: AsyncClient,
        apply: Callable[[PoolSnapshot], None],
        *,
        pool_name: str,
        namespace: str,
        pool_group: str = V1_GROUP,
        endpoint_selector: LabelSelector | None = None,
        target_ports: Sequence[int] = (),
        coalesce: float = 0.05,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        crd_retry: float = 60.0,
        watch_timeout: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        if endpoint_selector is None and pool_group not in POOL_VERSIONS:
            raise ValueError(f"--pool-group {pool_group!r} is not an InferencePool group; use one of "
                             f"{', '.join(POOL_VERSIONS)}")
        if endpoint_selector is not None:
            if not endpoint_selector:
                raise ValueError("--endpoint-selector must select something (an empty selector matches every pod)")
            if not 1 <= len(target_ports) <= 8 or any(not 0 < p < 65536 for p in target_ports):
                raise ValueError("--endpoint-target-ports needs 1 to 8 port numbers (1-65535) with --endpoint-selector")
        self.client, self.apply = client, apply
        self.pool_name, self.namespace, self.pool_group = pool_name, namespace, pool_group
        self.endpoint_selector = endpoint_selector
        self.target_ports = list(dict.fromkeys(target_ports))
        self.coalesce, self.crd_retry, self.watch_timeout = coalesce, crd_retry, watch_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.rng = rng or random.Random()
        self.synced = asyncio.Event()
        self.snapshot: PoolSnapshot | None = None
        self.applied = 0  # snapshots handed to apply(): for tests and the debug log
        self._dirty = asyncio.Event()
        self._logged: set[str] = set()
        self._snapshot_key: Any = None
        self._outage = _Outage(self._describe, backoff_max)
        self._pool: _Reflector | None = None
        self._pods: _Reflector | None = None
        self._pods_task: asyncio.Task[None] | None = None
        self._pod_selector: LabelSelector | None = None
        self._kinds = [_Kind("InferenceObjective", "inferenceobjectives"),
                       _Kind("InferenceModelRewrite", "inferencemodelrewrites")]

    @property
    def api_reachable(self) -> bool:
        return self._outage.since is None

    def _describe(self) -> str:
        if self.snapshot is None:
            return "nothing yet (not synced)"
        ready = sum(1 for e in self.snapshot.endpoints if e.ready)
        return f"the {len(self.snapshot.endpoints)} endpoints known ({ready} ready)"

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publish_loop())
                if self.endpoint_selector is not None:
                    self._watch_pods(self.endpoint_selector)
                else:
                    version = POOL_VERSIONS[self.pool_group]
                    res = create_namespaced_resource(self.pool_group, version, "InferencePool", "inferencepools")
                    self._pool = _Reflector(self, res, "InferencePool", what=f"InferencePools ({self.pool_group})",
                                            field_selector=f"metadata.name={self.pool_name}")
                    tg.create_task(self._run_pool())
                    for k in self._kinds:
                        tg.create_task(self._run_kind(k))
        finally:
            if self._pods_task is not None:
                self._pods_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pods_task

    async def _run_pool(self) -> None:
        assert self._pool is not None
        while True:
            try:
                await self._pool.run()
            except _NotInstalled:
                self._log_once("crd:pool", logging.ERROR, "the InferencePool CRD (%s/%s) is not installed: no pool "
                               "to watch; checking again every %gs", self.pool_group, POOL_VERSIONS[self.pool_group],
                               self.crd_retry)
                await asyncio.sleep(self.crd_retry)

    def _watch_pods(self, selector: LabelSelector) -> None:
        """(Re)start the label-selected pod watch; the old pods stay until the new list replaces them."""
        if self._pods_task is not None:
            self._pods_task.cancel()
        self._pod_selector = selector
        self._pods = _Reflector(self, Pod, "Pod", what="Pods", label_selector=str(selector))
        self._pods_task = asyncio.create_task(self._run_pods(self._pods))

    async def _run_pods(self, reflector: _Reflector) -> None:
        while True:
            try:
                await reflector.run()
            except _NotInstalled:  # pods are always there; a 404 here is a proxy or a broken server
                self._outage.failed("Pods", RuntimeError("404 on the Pods URL"))
                await asyncio.sleep(self.backoff_max)

    async def _run_kind(self, k: _Kind) -> None:
        while True:
            group = await self._probe(k)
            if group is None:
                k.resolved = True
                self._changed(None)
                await asyncio.sleep(self.crd_retry)
                continue
            res = create_namespaced_resource(group, "v1alpha2", k.kind, k.plural)
            k.reflector = _Reflector(self, res, k.kind, what=f"{k.kind}s ({group})")
            try:
                await k.reflector.run()
            except _NotInstalled:
                log.warning("%ss (%s) are no longer served (CRD removed?); dropping them", k.kind, group)
                k.reflector = None
                self._changed(None)

    async def _probe(self, k: _Kind) -> str | None:
        """The group to watch `k` in: llm-d.ai if usable, else the legacy group, else None (checked again later)."""
        backoff = Backoff(self.backoff_initial, self.backoff_max, self.rng)
        while True:
            usable, failed = [], None
            for group in OBJECTIVE_GROUPS:
                res = create_namespaced_resource(group, "v1alpha2", k.kind, k.plural)
                what = f"{k.kind}s ({group})"
                try:
                    await _Reflector(self, res, k.kind, what=what).list(limit=1)
                    usable.append(group)
                    self._forbidden_ok(what)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    code = _api_code(e)
                    if code == 404:
                        continue
                    if code == 403:
                        self._forbidden(what, e)
                        continue
                    failed = e
            if failed is not None and not usable:
                self._outage.failed(f"{k.kind}s", failed)
                await asyncio.sleep(backoff.next())
                continue
            if not usable:
                self._log_once(f"absent:{k.kind}", logging.INFO, "no %s CRD is installed (or granted) in %s; "
                               "not watching %ss, checking again every %gs", k.kind, " or ".join(OBJECTIVE_GROUPS),
                               k.kind, self.crd_retry)
                return None
            self._logged.discard(f"absent:{k.kind}")
            if usable[0] == LLMD_GROUP and X_GROUP in usable:
                self._log_once(f"both:{k.kind}", logging.WARNING, "both %s and %s %s CRDs are installed: watching "
                               "%s and ignoring the legacy %s resources, as upstream does", LLMD_GROUP, X_GROUP,
                               k.kind, LLMD_GROUP, X_GROUP)
            return usable[0]

    def _forbidden(self, what: str, err: BaseException) -> None:
        self._log_once(f"403:{what}", logging.ERROR, "epp may not list/watch %s in namespace %s (403 Forbidden: %s); "
                       "grant get, list and watch on it to epp's ServiceAccount", what, self.namespace,
                       _describe_error(err))

    def _forbidden_ok(self, what: str) -> None:
        if f"403:{what}" in self._logged:
            self._logged.discard(f"403:{what}")
            log.info("epp may now watch %s", what)

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    # -- from stores to a snapshot ------------------------------------------------------------

    def _changed(self, source: _Reflector | None) -> None:
        if source is not None and source is self._pool:
            self._pool_changed()
        self._dirty.set()

    def _pool_changed(self) -> None:
        assert self._pool is not None
        pool = self._pool.store.get(self.pool_name)
        if pool is None:
            return
        try:
            selector, _ = pool_spec(pool)
        except ManifestError as e:
            self._log_once(f"pool:{e}", logging.ERROR, "InferencePool %s/%s is invalid, keeping the last good "
                           "state: %s", self.namespace, self.pool_name, e)
            return
        if selector != self._pod_selector:
            if self._pod_selector is not None:
                log.info("InferencePool %s/%s now selects %s (was %s); re-listing its pods", self.namespace,
                         self.pool_name, selector, self._pod_selector)
            self._watch_pods(selector)

    def _can_publish(self) -> bool:
        if self.endpoint_selector is None:
            assert self._pool is not None
            if not self._pool.listed or not all(k.settled for k in self._kinds):
                return False
            if self.pool_name not in self._pool.store:
                return True  # no pool (yet, or any more): say so
        return self._pods is not None and self._pods.listed

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            if self.coalesce:
                await asyncio.sleep(self.coalesce)  # let a burst of events land in one snapshot
            self._dirty.clear()
            if self._can_publish():
                self._publish()

    def _publish(self) -> None:
        objects: list[dict[str, Any]] = []
        if self._pool is not None:
            objects.extend(self._pool.store.values())
        if self._pods is not None:
            objects.extend(self._pods.store.values())
        for k in self._kinds:
            objects.extend(k.objects())
        pool_less = (self.endpoint_selector, self.target_ports) if self.endpoint_selector is not None else None
        try:
            snap = snapshot_from_objects(objects, self.pool_name, self.namespace, pool_group=self.pool_group,
                                         endpoint_selector=pool_less, strict=False)
        except ManifestError as e:
            self._log_once(f"pool:{e}", logging.ERROR, "InferencePool %s/%s is invalid, keeping the last good "
                           "state: %s", self.namespace, self.pool_name, e)
            return
        for err in snap.errors:
            self._log_once(f"object:{err}", logging.ERROR, "left out of the pool: %s", err)
        key = (snap.has_pool, snap.app_protocol,
               tuple((e.hostport, e.name, e.ready, tuple(sorted(e.labels.items()))) for e in snap.endpoints),
               tuple(sorted(snap.objectives.items())), tuple(snap.rewrites))
        if key == self._snapshot_key:
            return
        changed_membership = self._snapshot_key is None or key[:3] != self._snapshot_key[:3]
        self._snapshot_key = key
        self.snapshot = snap
        self.applied += 1
        self.apply(snap)
        if snap.has_pool:
            self.synced.set()
        if changed_membership:
            ready = sum(1 for e in snap.endpoints if e.ready)
            if snap.has_pool:
                log.info("pool %s/%s: %d endpoints (%d ready), %d objectives, %d rewrite rules", self.namespace,
                         self.pool_name, len(snap.endpoints), ready, len(snap.objectives), len(snap.rewrites))
            else:
                log.warning("InferencePool %s/%s not found (%s); no endpoints until it exists", self.namespace,
                            self.pool_name, self.pool_group)
