"""Session affinity, shared by session-affinity-scorer and session-affinity-filter (llm-d-router).

Two strategies, as upstream:
- `encoded_endpoint_header` (default): the response carries the picked server, base64-encoded,
  in `x-session-token` (or `encodedEndpointHeaderConfig.header`); the client sends it back and
  its next request prefers that server. Stateless.
- `session_id`: the client sends an opaque session id (`sessionIdConfig.sources`: headers, first
  non-empty wins; default `x-session-id`); epp binds it to the server the session's first request
  went to, and keeps it there while that server is a candidate. A binding unused for
  `evictionTtlSeconds` (300) is forgotten; a session whose server is gone rebinds to where its
  next request went.
Upstream's token names a pod as `namespace/name`; epp writes the endpoint's name and accepts both.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState
from epp.scheduling.params import Params

ENCODED_ENDPOINT_HEADER = "encoded_endpoint_header"
SESSION_ID = "session_id"
DEFAULT_TOKEN_HEADER = "x-session-token"
DEFAULT_SESSION_ID_HEADER = "x-session-id"
DEFAULT_TTL = 300.0
DEFAULT_SWEEP = 10.0
MAX_SESSIONS = 1_000_000  # client-chosen ids: memory stays bounded whatever they send


def encode_endpoint(ep: Endpoint) -> str:
    return base64.b64encode(ep.name.encode()).decode()


def decode_token(token: str) -> str:
    """The server a token names, or '' when it is empty or not base64."""
    if not token:
        return ""
    try:
        return base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""


def names(ep: Endpoint, pod: str) -> bool:
    return pod == ep.name or pod.endswith("/" + ep.name)


class SessionAffinity:
    """The strategy one scorer or filter instance runs."""

    def __init__(self, *, strategy: str = ENCODED_ENDPOINT_HEADER, header: str = DEFAULT_TOKEN_HEADER,
                 sources: tuple[str, ...] = (DEFAULT_SESSION_ID_HEADER,), ttl: float = DEFAULT_TTL,
                 sweep: float = DEFAULT_SWEEP) -> None:
        self.strategy = strategy
        self.header = header.strip().lower() or DEFAULT_TOKEN_HEADER
        self.sources = tuple(s.strip().lower() for s in sources)
        self.ttl = ttl
        self.sweep = sweep  # upstream's sweep period; epp expires a binding when next it is read or written
        # session id -> [hostport, last used], least recently used first
        self._bindings: OrderedDict[str, list[Any]] = OrderedDict()
        self._present_key = object()

    @classmethod
    def from_parameters(cls, params: Params) -> SessionAffinity:
        strategy = params.str("strategy", ENCODED_ENDPOINT_HEADER, choices=(ENCODED_ENDPOINT_HEADER, SESSION_ID))
        profile = params.str("profileName", "", empty=True)
        if profile:
            raise ConfigError(f"plugin {params.plugin_type!r}: profileName picks one profile's pod under prefill/"
                              "decode disaggregation, which epp does not run yet (one profile per request)")
        encoded = params.sub("encodedEndpointHeaderConfig", params.mapping("encodedEndpointHeaderConfig"))
        header = encoded.str("header", DEFAULT_TOKEN_HEADER, empty=True)
        encoded.done()
        sid = params.sub("sessionIdConfig", params.mapping("sessionIdConfig"))
        sources: list[str] = []
        for i, source in enumerate(sid.list("sources")):
            if not isinstance(source, dict):
                raise ConfigError(f"plugin {params.plugin_type!r}: sessionIdConfig.sources[{i}] must be a mapping")
            src = sid.sub(f"sources[{i}]", source)
            name = src.str("header", "", empty=True)
            if src.has("attribute") or src.has("producer"):
                raise ConfigError(f"plugin {params.plugin_type!r}: sessionIdConfig.sources[{i}]: request attributes "
                                  "(from session-id-producer, agent-identity) are not supported by epp; read the "
                                  "session id from a header")
            src.done()
            if not name:
                raise ConfigError(f"plugin {params.plugin_type!r}: sessionIdConfig.sources[{i}]: exactly one of "
                                  "header or attribute must be set")
            sources.append(name)
        ttl = sid.float("evictionTtlSeconds", 0.0, minimum=0.0) or DEFAULT_TTL
        sweep = sid.float("evictionSweepSeconds", 0.0, minimum=0.0) or DEFAULT_SWEEP
        sid.done()
        params.done()
        return cls(strategy=strategy, header=header, sources=tuple(sources) or (DEFAULT_SESSION_ID_HEADER,),
                   ttl=ttl, sweep=sweep)

    def describe(self) -> dict[str, Any]:
        if self.strategy == ENCODED_ENDPOINT_HEADER:
            return {"strategy": self.strategy, "encodedEndpointHeaderConfig": {"header": self.header}}
        return {"strategy": self.strategy, "sessionIdConfig": {
            "sources": [{"header": h} for h in self.sources], "evictionTtlSeconds": self.ttl,
            "evictionSweepSeconds": self.sweep}}

    def _session_id(self, request: InferenceRequest) -> str:
        headers = request.headers
        for header in self.sources:
            value = headers.get(header, "").strip()
            if value:
                return value
        return ""

    def choose(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> Endpoint | None:
        """The candidate the session is pinned to, or None (no session, unbound, or its server absent)."""
        if self.strategy == ENCODED_ENDPOINT_HEADER:
            pod = decode_token(request.headers.get(self.header, ""))
            if pod:
                for ep in endpoints:
                    if names(ep, pod):
                        return ep
            return None
        sid = self._session_id(request)
        if not sid:
            return None
        bound = self._bindings.get(sid)
        if bound is None or state.now - bound[1] > self.ttl:
            return None
        for ep in endpoints:
            if ep.hostport == bound[0]:
                state.data[self._present_key] = True
                return ep
        state.data[self._present_key] = False  # its server is gone: the session may move
        return None

    def commit(self, state: CycleState, request: InferenceRequest, ep: Endpoint) -> None:
        """Bind a session to where its request went: a first request, or one whose server was absent."""
        if self.strategy != SESSION_ID:
            return
        sid = self._session_id(request)
        if not sid:
            return
        now = state.now
        bindings = self._bindings
        self._expire(now)
        bound = bindings.get(sid)
        if bound is None:
            bindings[sid] = [ep.hostport, now]
            if len(bindings) > MAX_SESSIONS:
                bindings.popitem(last=False)
            return
        if bound[0] != ep.hostport and state.data.get(self._present_key) is not False:
            return  # only a confirmed absence moves a session; the picker choosing elsewhere does not
        bound[0], bound[1] = ep.hostport, now
        bindings.move_to_end(sid)

    def _expire(self, now: float) -> None:
        bindings, ttl = self._bindings, self.ttl
        while bindings:
            sid, (_, last) = next(iter(bindings.items()))
            if now - last <= ttl:
                return
            del bindings[sid]

    def response_headers(self, ep: Endpoint) -> tuple[tuple[str, str], ...]:
        if self.strategy != ENCODED_ENDPOINT_HEADER:
            return ()
        return ((self.header, encode_endpoint(ep)),)
