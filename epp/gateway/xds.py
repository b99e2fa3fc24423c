"""An xDS server for Envoy: the Aggregated Discovery Service, state of the world.

One gRPC stream per Envoy carries every resource type. The server holds the current
resources of each type with a version; `apply` installs a new set type by type, in
the order given, and returns only when every connected Envoy has acknowledged each
type (or refused it), so that a cluster is in place before a route names it and a
route no longer names a cluster before it goes. A refusal (NACK) raises
`XdsRejected` with Envoy's reason; Envoy keeps what it had, and so does the caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, message

from epp.gateway.envoy_config import APPLY_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE, Resources

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
WILDCARD_TYPES = (LISTENER, CLUSTER)  # Envoy subscribes to all of these; routes and endpoints by name


class XdsRejected(RuntimeError):
    """Envoy refused a configuration; the message is Envoy's reason."""


@dataclass
class _Sent:
    nonce: str
    version: int


@dataclass(eq=False)
class _Stream:
    node: str = "?"
    subscribed: dict[str, set[str] | None] = field(default_factory=dict)  # None: every resource
    pending: dict[str, _Sent] = field(default_factory=dict)  # sent, neither acknowledged nor refused yet
    last_nonce: dict[str, str] = field(default_factory=dict)  # of the latest response of each type
    sent_version: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)  # type -> (version, Envoy's reason)
    out: asyncio.Queue[discovery_pb2.DiscoveryResponse] = field(default_factory=asyncio.Queue)


def _same(a: dict[str, message.Message], b: dict[str, message.Message]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].SerializeToString(deterministic=True) == b[k].SerializeToString(deterministic=True) for k in a)


class XdsServer:
    """Serves `envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`."""

    def __init__(self, ack_timeout: float = 10.0) -> None:
        self.ack_timeout = ack_timeout  # how long `apply` waits for Envoy to answer one type
        self.resources: Resources = {t: {} for t in APPLY_ORDER}
        self.versions: dict[str, int] = dict.fromkeys(APPLY_ORDER, 0)
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)
        self._changed = asyncio.Condition()
        self.connected = asyncio.Event()  # set once an Envoy has asked for its listeners

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {"StreamAggregatedResources": method})

    @property
    def streams(self) -> int:
        return len(self._streams)

    # --- one Envoy --------------------------------------------------------------------------
    async def _stream(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
                      context: Any) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        st = _Stream()
        self._streams.add(st)
        reader = asyncio.ensure_future(self._read(st, requests))
        try:
            while True:
                get = asyncio.ensure_future(st.out.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                yield get.result()
        finally:
            reader.cancel()
            self._streams.discard(st)
            log.info("Envoy %s disconnected from xDS", st.node)
            async with self._changed:
                self._changed.notify_all()

    async def _read(self, st: _Stream, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        async for req in requests:
            if req.node.id and st.node == "?":
                st.node = req.node.id
                log.info("Envoy %s connected to xDS", st.node)
            await self._on_request(st, req)

    async def _on_request(self, st: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        t = req.type_url
        if t not in self.resources:
            return  # a type the gateway does not serve (Envoy asks for none other here)
        if req.response_nonce:
            if req.response_nonce != st.last_nonce.get(t):
                return  # answers an older response: superseded by one Envoy has not seen yet
            sent = st.pending.pop(t, None)
        else:
            sent = None
        if sent is not None:  # the answer to our latest response: an ACK, or a NACK with the reason
            if req.HasField("error_detail"):
                st.refused[t] = (sent.version, req.error_detail.message)
                log.error("Envoy %s refused %s version %d: %s", st.node, _short(t), sent.version,
                          req.error_detail.message)
            else:
                st.acked[t] = sent.version
                st.refused.pop(t, None)
        names: set[str] | None = set(req.resource_names)
        if (t in WILDCARD_TYPES and not names) or "*" in (names or ()):
            names = None
        first = t not in st.subscribed
        if first or names != st.subscribed[t]:
            st.subscribed[t] = names
            self._send(st, t)
        if t == LISTENER:
            self.connected.set()
        async with self._changed:
            self._changed.notify_all()

    def _send(self, st: _Stream, t: str) -> None:
        names = st.subscribed.get(t)
        have = self.resources[t]
        chosen = have.values() if names is None else (have[n] for n in sorted(names) if n in have)
        packed = []
        for res in chosen:
            a = any_pb2.Any()
            a.Pack(res)
            packed.append(a)
        nonce = str(next(self._nonces))
        version = self.versions[t]
        st.pending[t] = _Sent(nonce, version)
        st.last_nonce[t] = nonce
        st.sent_version[t] = version
        st.out.put_nowait(discovery_pb2.DiscoveryResponse(version_info=str(version), resources=packed, type_url=t,
                                                          nonce=nonce))

    # --- the configuration ------------------------------------------------------------------
    async def apply(self, resources: Resources, order: Iterable[str] = APPLY_ORDER) -> bool:
        """Install `resources`, pushing type by type in `order`, each acknowledged before the next.

        Every type is stored at once, so that Envoy's own requests between the pushes (the
        endpoints of a cluster just added, the routes of a new listener) get the new state.
        Returns False if an Envoy did not answer within `ack_timeout` (the rest is sent anyway);
        raises XdsRejected if one refused a type (the types after it are not sent, and the
        server keeps what Envoy still runs for them).
        """
        changed = [t for t in order if not _same(self.resources[t], resources.get(t, {}))]
        previous = {t: self.resources[t] for t in changed}
        for t in changed:
            self.resources[t] = dict(resources.get(t, {}))
            self.versions[t] += 1
        ok = True
        for i, t in enumerate(changed):
            for st in list(self._streams):
                # A stream that asked in the meantime (new names) already has this version.
                if t in st.subscribed and st.sent_version.get(t) != self.versions[t]:
                    self._send(st, t)
            try:
                ok = await self._acknowledged(t) and ok
            except XdsRejected:
                for later in changed[i:]:
                    self.resources[later] = previous[later]
                raise
        return ok

    def _settled(self, st: _Stream, t: str) -> bool:
        if t not in st.subscribed:
            # Envoy asks for routes and endpoints only once a listener or cluster names them.
            return not (t in (ROUTE, ENDPOINT) and self.resources[t] and st.subscribed)
        if t in st.pending:
            return False
        names = st.subscribed[t]
        if names is not None and t in (ROUTE, ENDPOINT) and not set(self.resources[t]) <= names:
            return False  # Envoy has not asked for a new listener's routes or a new cluster's endpoints yet
        return st.acked.get(t, -1) >= self.versions[t] or st.refused.get(t, (-1, ""))[0] >= self.versions[t]

    async def _acknowledged(self, t: str) -> bool:
        def done() -> bool:
            return all(self._settled(st, t) for st in self._streams)
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(done), self.ack_timeout)
        except TimeoutError:
            log.warning("Envoy did not acknowledge %s version %d within %.0f s", _short(t), self.versions[t],
                        self.ack_timeout)
            return False
        for st in self._streams:
            refused = st.refused.get(t)
            if refused and refused[0] >= self.versions[t]:
                raise XdsRejected(f"Envoy {st.node} refused the {_short(t)} configuration: {refused[1]}")
        return True


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
