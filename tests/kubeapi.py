"""A stand-in Kubernetes API server for tests. It is NOT kube-apiserver.

No kube-apiserver (nor envtest, kind or k3s) can run on these machines, so the
Kubernetes side of epp is tested with the real client library (lightkube) against
this server, which speaks the API server's REST protocol for the resources epp uses:

- HTTPS with a self-signed certificate made at start (the client trusts it through
  `certificate-authority-data` in a kubeconfig, or `ca.crt` in a service-account dir);
- bearer-token authentication (401 Status otherwise) and an RBAC table per user and
  group: verb x apiGroup x resource x namespace, and nonResourceURLs (403 Status with
  the API server's wording otherwise); authorization runs before routing, as there;
- list (`labelSelector` with the full selector syntax, `fieldSelector` on
  `metadata.name` / `metadata.namespace`, `resourceVersion`), returning `<Kind>List`
  with `metadata.resourceVersion`; items of built-in kinds carry no apiVersion/kind,
  custom resources do, as the real server sends them;
- watch (`watch=true`, `resourceVersion`, `allowWatchBookmarks`, `timeoutSeconds`): a
  chunked stream of ADDED / MODIFIED / DELETED / BOOKMARK / ERROR events, one JSON per
  line; an object that stops (starts) matching a watch's label selector arrives as
  DELETED (ADDED); a resourceVersion older than the retained history gets a 200 stream
  with one ERROR event holding a 410 Expired Status, as the watch cache answers;
- one global, monotonically increasing resourceVersion (etcd's revision); uid,
  creationTimestamp, generation (custom resources, bumped on spec change);
- get / create (409 AlreadyExists) / update (409 Conflict on a stale resourceVersion,
  404 NotFound) / merge-patch / delete; Lease times must be MicroTime (six fractional
  digits), as the real server's decoder demands;
- TokenReview and SubjectAccessReview, answered from the token and RBAC tables;
- custom resource groups that can be "not installed" (404 NotFound, as for a missing CRD);
- faults under the test's control: close or drop watches, compact the history (410 on
  resume), and an outage (connections refused, or 503 Status to every request).

What it does not model: admission, OpenAPI validation, server-side apply, strategic
merge (patches are JSON merge patches), pagination (`limit` is ignored), discovery
endpoints, protobuf, finalizers and graceful deletion (tests set deletionTimestamp
themselves, as the kubelet's grace period would leave it).

It runs its own asyncio loop (aiohttp) in a background thread, so sync and async tests
use it alike; the helper methods are synchronous and thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import json
import re
import secrets
import ssl
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

JSON = "application/json"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    builtin: bool = False  # built-in kinds: list items carry no apiVersion/kind
    review: bool = False  # TokenReview / SubjectAccessReview: create only, nothing stored

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`leases.coordination.k8s.io`, as RBAC error messages name resources."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


X_GROUP, LLMD_GROUP, V1_GROUP = "inference.networking.x-k8s.io", "llm-d.ai", "inference.networking.k8s.io"
KINDS = [
    Kind("", "v1", "pods", "Pod", builtin=True),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", builtin=True),
    Kind(V1_GROUP, "v1", "inferencepools", "InferencePool"),
    Kind(X_GROUP, "v1alpha2", "inferencepools", "InferencePool"),
    Kind(X_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective"),
    Kind(X_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite"),
    Kind(LLMD_GROUP, "v1alpha2", "inferenceobjectives", "InferenceObjective"),
    Kind(LLMD_GROUP, "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite"),
    Kind("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", namespaced=False, builtin=True, review=True),
    Kind("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", namespaced=False,
         builtin=True, review=True),
]
_BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
_BY_TYPE = {(k.api_version, k.kind): k for k in KINDS}
_MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `Status` object as the API server writes it."""
    out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code}
    if details is not None:
        out["details"] = details
    return out


class ApiStatus(Exception):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["message"])
        self.body = body


def _now(micro: bool = False) -> str:
    t = datetime.datetime.now(datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if micro else t.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- selectors: a parser of its own, so the client's parser is checked, not mirrored --------

def _label_matcher(text: str) -> Callable[[dict[str, str]], bool]:
    terms: list[Callable[[dict[str, str]], bool]] = []
    for raw in re.split(r",(?![^(]*\))", text.strip()) if text.strip() else []:
        t = raw.strip()
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", t) or re.fullmatch(r"(\S+)\s*(in|notin)\s*\(([^)]*)\)", t)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                terms.append(lambda lb, k=key, vs=vals: k in lb and lb[k] in vs)
            else:
                terms.append(lambda lb, k=key, vs=vals: lb.get(k) not in vs)
            continue
        m = re.fullmatch(r"([^!=<>\s]+)\s*(==|!=|=|<|>)\s*(\S*)", t)
        if m:
            key, op, val = m.groups()
            if op in ("=", "=="):
                terms.append(lambda lb, k=key, v=val: lb.get(k) == v)
            elif op == "!=":
                terms.append(lambda lb, k=key, v=val: lb.get(k) != v)
            else:
                n = int(val)
                terms.append(lambda lb, k=key, n=n, gt=op == ">": k in lb and lb[k].lstrip("-").isdigit()
                             and (int(lb[k]) > n if gt else int(lb[k]) < n))
            continue
        m = re.fullmatch(r"(!?)\s*([^!=<>\s()]+)", t)
        if not m:
            raise ApiStatus(status(400, "BadRequest", f"unable to parse requirement: {t!r}"))
        negate, key = m.group(1) == "!", m.group(2)
        terms.append(lambda lb, k=key, neg=negate: (k in lb) != neg)
    return lambda labels: all(t(labels) for t in terms)


def _field_matcher(text: str) -> Callable[[dict[str, Any]], bool]:
    terms = []
    for raw in [p for p in text.split(",") if p.strip()]:
        m = re.fullmatch(r"\s*([^!=\s]+)\s*(==|!=|=)\s*(\S*)\s*", raw)
        if not m:
            raise ApiStatus(status(400, "BadRequest", f"invalid field selector: {raw!r}"))
        path, op, val = m.groups()
        if path not in ("metadata.name", "metadata.namespace"):
            raise ApiStatus(status(400, "BadRequest", f'"{path}" is not a known field selector: only '
                                   '"metadata.name", "metadata.namespace"'))
        attr = path.split(".")[1]
        terms.append(lambda o, a=attr, v=val, eq=op != "!=": ((o.get("metadata") or {}).get(a) == v) == eq)
    return lambda obj: all(t(obj) for t in terms)


def _merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


# -- users and RBAC ---------------------------------------------------------------------------

@dataclass
class User:
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    verbs: frozenset[str]
    api_groups: frozenset[str] = frozenset()
    resources: frozenset[str] = frozenset()
    namespace: str | None = None  # None: every namespace and the cluster scope (a ClusterRole)
    urls: frozenset[str] = frozenset()

    def allows_resource(self, verb: str, group: str, resource: str, namespace: str) -> bool:
        return ((verb in self.verbs or "*" in self.verbs)
                and (group in self.api_groups or "*" in self.api_groups)
                and (resource in self.resources or "*" in self.resources)
                and (self.namespace is None or self.namespace == namespace))

    def allows_url(self, verb: str, path: str) -> bool:
        if not (verb in self.verbs or "*" in self.verbs):
            return False
        return any(u == path or u == "*" or (u.endswith("*") and path.startswith(u[:-1])) for u in self.urls)


@dataclass
class Call:
    """One request the server answered: for tests that count calls."""

    method: str
    path: str
    query: dict[str, str]
    user: str
    status: int


@dataclass(eq=False)
class _Watcher:
    kind: Kind
    namespace: str | None
    labels: Callable[[dict[str, str]], bool]
    fields: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    request: web.Request
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    def selects(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)


@dataclass
class _Event:
    rv: int
    kind: Kind
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


class KubeApi:
    """The stand-in API server. `with KubeApi() as api:` starts it on `host` and stops it after.

    `host` (default 127.0.0.1) is where it listens and the address clients are given; its
    certificate names it. A container on the host network reaches it there.
    """

    def __init__(self, *, host: str = "127.0.0.1", history: int = 10000,
                 bookmark_interval: float | None = None) -> None:
        self.host = host
        self.history = history
        self.bookmark_interval = bookmark_interval
        self.calls: list[Call] = []
        self.reviews: list[dict[str, Any]] = []  # the spec of every TokenReview / SubjectAccessReview asked
        self._objects: dict[tuple[Kind, str, str], dict[str, Any]] = {}
        self._events: deque[_Event] = deque()
        self._rv = 100
        self._horizon = self._rv  # the oldest resourceVersion a watch may resume from
        self._tokens: dict[str, User] = {}
        self._rules: dict[str, list[Rule]] = {}
        self._uninstalled: set[tuple[str, str]] = set()
        self._watchers: set[_Watcher] = set()
        self._outage: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeapi", daemon=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="kubeapi-")
        self.ca_pem = self._make_cert()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> KubeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KubeApi:
        self._thread.start()
        self._call(self._start)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._stop)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._tmp.cleanup()

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion (what a bookmark sent now carries)."""
        return str(self._call(lambda: self._rv))

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    async def _start(self) -> None:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch whose client went away ends at once, as in the API server.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl, reuse_address=True)
        await self._site.start()
        if not self.port:
            server = self._site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        self._end_watches(lambda w: True, drop=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` (a function or coroutine function) on the server's loop and return its result."""
        async def run() -> Any:
            out = fn(*args)
            return await out if asyncio.iscoroutine(out) else out
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _alt_names(self) -> list[x509.GeneralName]:
        names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        try:
            if self.host != "127.0.0.1":
                names.append(x509.IPAddress(ipaddress.ip_address(self.host)))
        except ValueError:
            names.append(x509.DNSName(self.host))
        return names

    def _make_cert(self) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver stand-in")])
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(self._alt_names()), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        cert_file, key_file = Path(self._tmp.name, "tls.crt"), Path(self._tmp.name, "tls.key")
        cert_file.write_bytes(pem)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert_file, key_file)
        return pem.decode()

    # -- client configuration -------------------------------------------------------------

    def kubeconfig(self, path: str | Path, token: str, namespace: str | None = None) -> str:
        """Write a kubeconfig that reaches this server as the owner of `token`; returns its path."""
        ctx: dict[str, Any] = {"cluster": "stand-in", "user": "tester"}
        if namespace:
            ctx["namespace"] = namespace
        conf = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {
                "server": self.url, "certificate-authority-data": base64.b64encode(self.ca_pem.encode()).decode()}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "stand-in", "context": ctx}],
        }
        Path(path).write_text(json.dumps(conf))  # JSON is YAML
        return str(path)

    def service_account_dir(self, path: str | Path, token: str, namespace: str) -> dict[str, str]:
        """Fill `path` as the kubelet fills /var/run/secrets/kubernetes.io/serviceaccount; returns the env."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        (d / "token").write_text(token)
        (d / "ca.crt").write_text(self.ca_pem)
        (d / "namespace").write_text(namespace)
        return {"KUBERNETES_SERVICE_HOST": self.host, "KUBERNETES_SERVICE_PORT": str(self.port)}

    # -- users and permissions ------------------------------------------------------------

    def add_token(self, token: str, username: str, *, groups: Iterable[str] = (), uid: str | None = None,
                  extra: dict[str, list[str]] | None = None) -> None:
        groups = [*groups, "system:authenticated"]
        self._call(self._tokens.__setitem__, token, User(username, uid or str(uuid.uuid4()), groups, extra or {}))

    def service_account(self, namespace: str, name: str) -> tuple[str, str]:
        """A service-account identity with a fresh token; returns (token, username)."""
        token = "sa." + secrets.token_urlsafe(24)
        username = f"system:serviceaccount:{namespace}:{name}"
        self.add_token(token, username, groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"])
        return token, username

    def revoke_token(self, token: str) -> None:
        self._call(self._tokens.pop, token, None)

    def grant(self, subject: str, verbs: Iterable[str], resources: Iterable[str], namespace: str | None = None) -> None:
        """Allow `verbs` on `resources` ("pods", "leases.coordination.k8s.io", "*") to a user or "group:<name>"."""
        for res in resources:
            plural, _, group = res.partition(".")
            rule = Rule(frozenset(verbs), frozenset({group if res != "*" else "*"}), frozenset({plural}), namespace)
            self._call(lambda r=rule: self._rules.setdefault(subject, []).append(r))

    def grant_urls(self, subject: str, verbs: Iterable[str], paths: Iterable[str]) -> None:
        """Allow non-resource URLs (`/metrics`), as a ClusterRole's nonResourceURLs rule."""
        rule = Rule(frozenset(verbs), urls=frozenset(paths))
        self._call(lambda: self._rules.setdefault(subject, []).append(rule))

    def revoke(self, subject: str) -> None:
        self._call(self._rules.pop, subject, None)

    # -- objects --------------------------------------------------------------------------

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create the object or replace it (no resourceVersion check); returns it as stored."""
        return self._call(self._apply, copy.deepcopy(obj))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self._call(self._objects.get, (_BY_TYPE[api_version, kind], namespace, name))
        return copy.deepcopy(found)

    def modify(self, api_version: str, kind: str, namespace: str, name: str,
               change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a stored object in place (`change(obj)`) and commit it as one update."""
        def run() -> dict[str, Any]:
            k = _BY_TYPE[api_version, kind]
            obj = copy.deepcopy(self._objects[k, namespace, name])
            change(obj)
            return self._store(k, namespace, name, obj, "MODIFIED")
        return self._call(run)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._call(self._remove, _BY_TYPE[api_version, kind], namespace, name)

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        k = _BY_TYPE[api_version, kind]
        return self._call(lambda: [copy.deepcopy(o) for (kk, ns, _), o in sorted(self._objects.items(),
                                   key=lambda i: i[0][1:]) if kk == k and namespace in (None, ns)])

    def _apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        k = _BY_TYPE[obj["apiVersion"], obj["kind"]]
        ns, name = obj["metadata"].get("namespace", "default"), obj["metadata"]["name"]
        return self._store(k, ns, name, obj, "MODIFIED" if (k, ns, name) in self._objects else "ADDED")

    def _store(self, k: Kind, ns: str, name: str, obj: dict[str, Any], type_: str) -> dict[str, Any]:
        old = self._objects.get((k, ns, name))
        meta = obj.setdefault("metadata", {})
        obj["apiVersion"], obj["kind"] = k.api_version, k.kind
        meta["name"], meta["namespace"] = name, ns
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta.setdefault("creationTimestamp", _now())
            if not k.builtin:
                meta["generation"] = 1
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            if not k.builtin:
                gen = old["metadata"].get("generation", 1)
                meta["generation"] = gen + 1 if obj.get("spec") != old.get("spec") else gen
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._objects[k, ns, name] = obj
        self._record(_Event(self._rv, k, type_, obj, old))
        return copy.deepcopy(obj)

    def _remove(self, k: Kind, ns: str, name: str) -> dict[str, Any]:
        old = self._objects.pop((k, ns, name))
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._record(_Event(self._rv, k, "DELETED", gone, old))
        return gone

    def _record(self, ev: _Event) -> None:
        self._events.append(ev)
        while len(self._events) > self.history:
            self._horizon = self._events.popleft().rv
        for w in list(self._watchers):
            if w.kind == ev.kind:
                out = self._event_for(w, ev)
                if out is not None:
                    w.queue.put_nowait(out)

    @staticmethod
    def _event_for(w: _Watcher, ev: _Event) -> dict[str, Any] | None:
        before = w.selects(ev.old) if ev.type != "ADDED" else False
        after = w.selects(ev.obj) if ev.type != "DELETED" else False
        if ev.type == "DELETED":
            return {"type": "DELETED", "object": ev.obj} if before else None
        if before and after:
            return {"type": "MODIFIED", "object": ev.obj}
        if after:
            return {"type": "ADDED", "object": ev.obj}
        if before:  # no longer selected: the watch sees it go
            return {"type": "DELETED", "object": ev.obj}
        return None

    # -- faults ---------------------------------------------------------------------------

    def uninstall(self, group: str, plural: str | None = None) -> None:
        """Delete a CRD (all of a group's if no plural): its objects go, its watches end, its URLs 404."""
        def run() -> None:
            for k in KINDS:
                if k.group == group and plural in (None, k.plural):
                    for key in [key for key in self._objects if key[0] == k]:
                        self._remove(*key)
                    self._uninstalled.add((k.group, k.plural))
                    self._end_watches(lambda w, k=k: w.kind == k, drop=False)
        self._call(run)

    def install(self, group: str, plural: str | None = None) -> None:
        self._call(lambda: self._uninstalled.difference_update(
            {(k.group, k.plural) for k in KINDS if k.group == group and plural in (None, k.plural)}))

    def close_watches(self, plural: str | None = None) -> int:
        """End watches cleanly (as `timeoutSeconds` does); returns how many."""
        return self._call(self._end_watches, lambda w: plural in (None, w.kind.plural), False)

    def drop_watches(self, plural: str | None = None) -> int:
        """Cut watch connections mid-stream (a network fault or an API server restart)."""
        return self._call(self._end_watches, lambda w: plural in (None, w.kind.plural), True)

    def watch_count(self, plural: str | None = None) -> int:
        return self._call(lambda: sum(1 for w in self._watchers if plural in (None, w.kind.plural)))

    def watch_selectors(self, plural: str) -> list[str]:
        """The labelSelector query of each open watch of `plural`."""
        return self._call(lambda: [w.request.query.get("labelSelector", "") for w in self._watchers
                                   if w.kind.plural == plural])

    def compact(self) -> None:
        """Forget the event history: a watch resuming from any earlier resourceVersion gets 410 Gone."""
        def run() -> None:
            self._events.clear()
            self._horizon = self._rv
        self._call(run)

    def send_bookmarks(self) -> None:
        def run() -> None:
            for w in self._watchers:
                if w.bookmarks:
                    w.queue.put_nowait(self._bookmark(w.kind))
        self._call(run)

    def outage(self, mode: str | None) -> None:
        """"refuse": stop listening and cut every connection; "unavailable": 503 to all; None: back."""
        async def run() -> None:
            was, self._outage = self._outage, mode
            if mode is not None:
                self._end_watches(lambda w: True, drop=True)
            if mode == "refuse":
                if self._site is not None:
                    await self._site.stop()
                    self._site = None
                assert self._runner is not None
                assert self._runner.server is not None
                for conn in self._runner.server.connections:
                    conn.force_close()
            elif was == "refuse" and self._site is None:
                await self._listen()
        self._call(run)

    def _end_watches(self, which: Callable[[_Watcher], bool], drop: bool) -> int:
        ended = [w for w in self._watchers if which(w)]
        for w in ended:
            self._watchers.discard(w)
            if drop and w.request.transport is not None:
                w.request.transport.abort()
            w.queue.put_nowait(None)
        return len(ended)

    def calls_to(self, path_part: str, method: str | None = None) -> int:
        """How many answered requests had `path_part` in their path (and `method`, if given)."""
        return sum(1 for c in list(self.calls) if path_part in c.path and method in (None, c.method))

    # -- HTTP -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(request.method, request.path, dict(request.query), "", 0)
        self.calls.append(call)
        try:
            if self._outage == "unavailable":
                raise ApiStatus(status(503, "ServiceUnavailable",
                                       "the server is currently unable to handle the request"))
            who = self._authenticate(request)
            call.user = who.username
            resp = await self._route(request, who, call)
        except ApiStatus as e:
            resp = web.Response(status=e.body["code"], body=json.dumps(e.body).encode(), content_type=JSON)
        call.status = resp.status
        return resp

    def _authenticate(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "")
        who = self._tokens.get(header[7:]) if header.startswith("Bearer ") else None
        if who is None:
            raise ApiStatus(status(401, "Unauthorized", "Unauthorized"))
        return who

    def _rules_of(self, who: User | dict[str, Any]) -> list[Rule]:
        name, groups = (who.username, who.groups) if isinstance(who, User) else (who.get("user", ""),
                                                                                   who.get("groups") or [])
        out = list(self._rules.get(name, []))
        for g in groups:
            out.extend(self._rules.get(f"group:{g}", []))
        return out

    async def _route(self, request: web.Request, who: User, call: Call) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return self._non_resource(request, who)
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            raise ApiStatus(status(404, "NotFound", "the server could not find the requested resource", {}))
        plural, name = rest[0], (rest[1] if len(rest) == 2 else "")
        q = request.query
        watching = q.get("watch") in ("true", "1")
        verb = {"GET": "watch" if watching else ("get" if name else "list"), "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}.get(request.method, "")
        # Authorization comes before routing, as in the API server's filter chain.
        if not any(r.allows_resource(verb, group, plural, namespace) for r in self._rules_of(who)):
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            what = f'{plural}.{group}' if group else plural
            named = f' "{name}"' if name else ""
            raise ApiStatus(status(403, "Forbidden", f'{what}{named} is forbidden: User "{who.username}" cannot '
                                   f'{verb} resource "{plural}" in API group "{group}" {scope}',
                                   {"name": name, "group": group, "kind": plural} if name
                                   else {"group": group, "kind": plural}))
        k = _BY_PATH.get((group, version, plural))
        wrong_scope = k is not None and k.namespaced != bool(namespace) and verb not in ("list", "watch")
        if k is None or (group, plural) in self._uninstalled or wrong_scope:
            raise ApiStatus(status(404, "NotFound", "the server could not find the requested resource", {}))
        if k.review:
            if verb != "create":
                raise ApiStatus(status(405, "MethodNotAllowed", "the server does not allow this method on the "
                                       'requested resource'))
            return self._json(201, self._review(k, await self._body(request)))
        if verb == "watch":
            call.status = 200  # the stream is answered now; it ends later
            return await self._watch(request, k, namespace or None)
        if verb == "list":
            return self._json(200, self._list(k, namespace or None, q))
        if verb == "get":
            return self._json(200, self._get(k, namespace, name))
        if verb == "create":
            return self._json(201, self._create(k, namespace, await self._body(request)))
        if verb == "update":
            return self._json(200, self._update(k, namespace, name, await self._body(request)))
        if verb == "patch":
            if "merge-patch" not in request.content_type and "strategic" not in request.content_type:
                raise ApiStatus(status(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                                       "format - accepted media types include: application/merge-patch+json"))
            obj = self._get(k, namespace, name)
            return self._json(200, self._store(k, namespace, name, _merge_patch(obj, await self._body(request)),
                                               "MODIFIED"))
        if verb == "delete":
            self._get(k, namespace, name)
            return self._json(200, self._remove(k, namespace, name))
        raise ApiStatus(status(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                               "resource"))

    def _non_resource(self, request: web.Request, who: User) -> web.Response:
        verb = request.method.lower()
        if not any(r.allows_url(verb, request.path) for r in self._rules_of(who)):
            raise ApiStatus(status(403, "Forbidden", f'forbidden: User "{who.username}" cannot {verb} path '
                                   f'"{request.path}"', {}))
        raise ApiStatus(status(404, "NotFound", "the server could not find the requested resource", {}))

    @staticmethod
    def _json(code: int, body: dict[str, Any]) -> web.Response:
        return web.Response(status=code, body=json.dumps(body).encode(), content_type=JSON)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            raise ApiStatus(status(400, "BadRequest", f"the object provided is unrecognized: {e}")) from None
        if not isinstance(body, dict):
            raise ApiStatus(status(400, "BadRequest", "the object provided is unrecognized"))
        return body

    def _not_found(self, k: Kind, name: str) -> ApiStatus:
        return ApiStatus(status(404, "NotFound", f'{k.qualified} "{name}" not found',
                                {"name": name, "group": k.group, "kind": k.plural}))

    def _get(self, k: Kind, ns: str, name: str) -> dict[str, Any]:
        obj = self._objects.get((k, ns, name))
        if obj is None:
            raise self._not_found(k, name)
        return obj

    def _validate(self, k: Kind, obj: dict[str, Any], ns: str) -> str:
        meta = obj.get("metadata") or {}
        if obj.get("kind") not in (None, "", k.kind) or obj.get("apiVersion") not in (None, "", k.api_version):
            raise ApiStatus(status(400, "BadRequest", f"the API version in the data ({obj.get('apiVersion')}) does "
                                   f"not match the expected API version ({k.api_version})"))
        if meta.get("namespace") not in (None, "", ns):
            raise ApiStatus(status(400, "BadRequest", "the namespace of the provided object does not match the "
                                   "namespace sent on the request"))
        name = str(meta.get("name") or "")
        if not name:
            raise ApiStatus(status(422, "Invalid", f"{k.kind}.{k.group or 'core'} \"\" is invalid: metadata.name: "
                                   "Required value: name or generateName is required",
                                   {"group": k.group, "kind": k.kind}))
        if k.plural == "leases":
            spec = obj.get("spec") or {}
            for f in ("acquireTime", "renewTime"):
                if f in spec and spec[f] is not None and not _MICROTIME.match(str(spec[f])):
                    raise ApiStatus(status(400, "BadRequest", f'Lease in version "v1" cannot be handled as a Lease: '
                                           f'parsing time "{spec[f]}" as "2006-01-02T15:04:05.000000Z07:00": '
                                           f'cannot parse as ".000000"'))
            d = spec.get("leaseDurationSeconds")
            if d is not None and (not isinstance(d, int) or d <= 0):
                raise ApiStatus(status(422, "Invalid", f'Lease.coordination.k8s.io "{name}" is invalid: '
                                       "spec.leaseDurationSeconds: Invalid value: must be greater than 0",
                                       {"name": name, "group": k.group, "kind": "Lease"}))
        return name

    def _create(self, k: Kind, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        name = self._validate(k, obj, ns)
        if (k, ns, name) in self._objects:
            raise ApiStatus(status(409, "AlreadyExists", f'{k.qualified} "{name}" already exists',
                                   {"name": name, "group": k.group, "kind": k.plural}))
        meta = obj["metadata"]
        for f in ("uid", "resourceVersion", "creationTimestamp", "generation"):
            meta.pop(f, None)
        return self._store(k, ns, name, obj, "ADDED")

    def _update(self, k: Kind, ns: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        if self._validate(k, obj, ns) != name:
            raise ApiStatus(status(400, "BadRequest", "the name of the object does not match the name on the URL"))
        old = self._get(k, ns, name)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiStatus(status(409, "Conflict", f'Operation cannot be fulfilled on {k.qualified} "{name}": the '
                                   "object has been modified; please apply your changes to the latest version and "
                                   "try again", {"name": name, "group": k.group, "kind": k.plural}))
        return self._store(k, ns, name, obj, "MODIFIED")

    def _list(self, k: Kind, ns: str | None, q: Any) -> dict[str, Any]:
        labels = _label_matcher(q.get("labelSelector", ""))
        fields = _field_matcher(q.get("fieldSelector", ""))
        items = []
        for (kk, ons, _), obj in sorted(self._objects.items(), key=lambda i: i[0][1:]):
            if kk == k and ns in (None, ons) and labels(obj["metadata"].get("labels") or {}) and fields(obj):
                items.append(self._as_item(k, obj))
        return {"kind": f"{k.kind}List", "apiVersion": k.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    @staticmethod
    def _as_item(k: Kind, obj: dict[str, Any]) -> dict[str, Any]:
        if not k.builtin:
            return obj
        return {key: v for key, v in obj.items() if key not in ("apiVersion", "kind")}

    def _bookmark(self, k: Kind) -> dict[str, Any]:
        return {"type": "BOOKMARK", "object": {"kind": k.kind, "apiVersion": k.api_version,
                                               "metadata": {"resourceVersion": str(self._rv)}}}

    async def _watch(self, request: web.Request, k: Kind, ns: str | None) -> web.StreamResponse:
        q = request.query
        w = _Watcher(k, ns, _label_matcher(q.get("labelSelector", "")), _field_matcher(q.get("fieldSelector", "")),
                     q.get("allowWatchBookmarks") in ("true", "1"), request)
        rv_text = q.get("resourceVersion", "")
        try:
            since = int(rv_text) if rv_text not in ("", "0") else None
        except ValueError:
            raise ApiStatus(status(400, "BadRequest", f'invalid resource version "{rv_text}"')) from None
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else None
        # Snapshot and registration with no await between: no event is missed or doubled.
        initial: list[dict[str, Any]] = []
        if since is None:
            initial = [{"type": "ADDED", "object": o} for (kk, _, _), o in sorted(self._objects.items(),
                       key=lambda i: i[0][1:]) if kk == k and w.selects(o)]
        elif since < self._horizon:
            initial = [{"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since} "
                                                          f"({self._horizon + 1})")}]
            w.queue.put_nowait(None)
        else:
            initial = [e for e in (self._event_for(w, ev) for ev in self._events if ev.kind == k and ev.rv > since)
                       if e is not None]
        if since is None or since >= self._horizon:
            self._watchers.add(w)
        resp = web.StreamResponse(status=200, headers={"Content-Type": JSON, "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for ev in initial:
                await resp.write(json.dumps(ev).encode() + b"\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout else None
            while True:
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                if w.bookmarks and self.bookmark_interval:
                    wait = self.bookmark_interval if wait is None else min(wait, self.bookmark_interval)
                try:
                    ev = await asyncio.wait_for(w.queue.get(), wait)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        if w.bookmarks:
                            await resp.write(json.dumps(self._bookmark(k)).encode() + b"\n")
                        break
                    ev = self._bookmark(k)
                if ev is None:
                    break
                await resp.write(json.dumps(ev).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went, or the test cut the connection
        finally:
            self._watchers.discard(w)
        return resp

    def _review(self, k: Kind, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        self.reviews.append({"kind": k.kind, **spec})
        out = {"kind": k.kind, "apiVersion": k.api_version, "metadata": {"creationTimestamp": None}, "spec": spec}
        if k.plural == "tokenreviews":
            who = self._tokens.get(str(spec.get("token") or ""))
            if who is None:  # `authenticated: false` is omitted, as Go's omitempty drops it
                out["status"] = {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
            else:
                user: dict[str, Any] = {"username": who.username, "uid": who.uid, "groups": who.groups}
                if who.extra:
                    user["extra"] = who.extra
                out["status"] = {"authenticated": True, "user": user, "audiences": spec.get("audiences") or
                                 ["https://kubernetes.default.svc.cluster.local"]}
            return out
        rules = self._rules_of(spec)
        nra, ra = spec.get("nonResourceAttributes"), spec.get("resourceAttributes")
        if nra:
            allowed = any(r.allows_url(str(nra.get("verb", "")), str(nra.get("path", ""))) for r in rules)
        elif ra:
            allowed = any(r.allows_resource(str(ra.get("verb", "")), str(ra.get("group", "")),
                                            str(ra.get("resource", "")), str(ra.get("namespace", ""))) for r in rules)
        else:
            raise ApiStatus(status(422, "Invalid", 'SubjectAccessReview.authorization.k8s.io "" is invalid: '
                                   "spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes or "
                                   "resourceAttributes must be specified", {"group": k.group,
                                                                            "kind": "SubjectAccessReview"}))
        out["status"] = {"allowed": allowed, "reason": "RBAC: allowed by the stand-in's rules" if allowed else ""}
        return out


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.kubeapi [--host H] [--port P] --kubeconfig OUT [manifest.yaml ...]`: run the stand-in
    alone (a demo, or a container test): every object in the manifests is stored, one all-powerful
    token is written into the kubeconfig, and it serves until interrupted."""
    import argparse
    import signal

    import yaml

    ap = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--kubeconfig", required=True, help="where to write a kubeconfig for it")
    ap.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    ap.add_argument("manifests", nargs="*")
    args = ap.parse_args(argv)
    api = KubeApi(host=args.host)
    api.port = args.port
    api.start()
    token = "admin." + secrets.token_urlsafe(16)
    api.add_token(token, "kubernetes-admin", groups=["system:masters"])
    api.grant("group:system:masters", ["*"], ["*"])
    api.grant_urls("group:system:masters", ["*"], ["*"])
    for path in args.manifests:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            for obj in (doc.get("items") or []) if doc and str(doc.get("kind", "")).endswith("List") else [doc]:
                if obj and (obj.get("apiVersion"), obj.get("kind")) in _BY_TYPE:
                    api.apply(obj)
    api.kubeconfig(args.kubeconfig, token, args.namespace)
    print(f"stand-in API server on {api.url}; kubeconfig {args.kubeconfig}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    api.stop()


if __name__ == "__main__":
    main()
