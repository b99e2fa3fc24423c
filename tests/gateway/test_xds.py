"""The xDS server over real gRPC, with a client that speaks ADS as Envoy does (state of the world)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from epp.gateway.envoy_config import CLUSTER, ENDPOINT, LISTENER, ROUTE
from epp.gateway.xds import ADS_SERVICE, XdsRejected, XdsServer


class FakeEnvoy:
    """Sends DiscoveryRequests and keeps what it received, as Envoy's ADS client."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(f"/{ADS_SERVICE}/StreamAggregatedResources",
                                     request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                                     response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        self.requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self.nonce: dict[str, str] = {}
        self.version: dict[str, str] = {}
        self._call = call(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self.requests.get()

    async def _read(self) -> None:
        async for resp in self._call:
            await self.responses.put(resp)

    def ask(self, type_url: str, names: list[str] | None = None, *, error: str = "") -> None:
        """A request: the first one, an ACK of the latest response (or a NACK with `error`), or new names."""
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [],
                                             response_nonce=self.nonce.get(type_url, ""),
                                             version_info=self.version.get(type_url, ""))
        req.node.id = "fake-envoy"
        if error:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put_nowait(req)

    async def receive(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        resp = await asyncio.wait_for(self.responses.get(), timeout)
        self.nonce[resp.type_url] = resp.nonce
        return resp

    def accept(self, resp: discovery_pb2.DiscoveryResponse, names: list[str] | None = None) -> None:
        self.version[resp.type_url] = resp.version_info
        self.ask(resp.type_url, names)

    def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()


@pytest.fixture
async def xds() -> AsyncIterator[tuple[XdsServer, FakeEnvoy]]:
    server = XdsServer(ack_timeout=2.0)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((server.handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    envoy = FakeEnvoy(channel)
    try:
        yield server, envoy
    finally:
        envoy.close()
        await channel.close()
        await grpc_server.stop(0)


def names(resp: discovery_pb2.DiscoveryResponse, kind: type) -> list[str]:
    out = []
    for a in resp.resources:
        msg = kind()
        a.Unpack(msg)
        out.append(getattr(msg, "name", "") or getattr(msg, "cluster_name", ""))
    return out


def resources(clusters: list[str], endpoints: list[str] | None = None) -> dict[str, dict]:
    return {CLUSTER: {c: cluster_pb2.Cluster(name=c) for c in clusters},
            ENDPOINT: {e: endpoint_pb2.ClusterLoadAssignment(cluster_name=e) for e in (endpoints or [])},
            LISTENER: {}, ROUTE: {}}


async def test_apply_waits_for_envoy_to_acknowledge_each_type_in_order(xds: tuple[XdsServer, FakeEnvoy]) -> None:
    server, envoy = xds
    await server.apply(resources(["a"]))  # no Envoy yet: stored, returns at once
    envoy.ask(CLUSTER)
    first = await envoy.receive()
    assert (first.type_url, names(first, cluster_pb2.Cluster)) == (CLUSTER, ["a"])
    envoy.accept(first)

    applying = asyncio.ensure_future(server.apply(resources(["a", "b"], ["b"])))
    pushed = await envoy.receive()
    assert names(pushed, cluster_pb2.Cluster) == ["a", "b"]
    await asyncio.sleep(0.05)
    assert not applying.done()  # clusters not acknowledged yet
    envoy.accept(pushed)
    # The new cluster's endpoints: Envoy asks for them by name and gets the new state at once.
    envoy.ask(ENDPOINT, ["b"])
    eds = await envoy.receive()
    assert (eds.type_url, names(eds, endpoint_pb2.ClusterLoadAssignment)) == (ENDPOINT, ["b"])
    await asyncio.sleep(0.05)
    assert not applying.done()  # endpoints not acknowledged yet
    envoy.accept(eds, ["b"])
    assert await asyncio.wait_for(applying, 2) is True


async def test_a_refusal_raises_with_envoys_reason_and_the_server_keeps_what_envoy_runs(
        xds: tuple[XdsServer, FakeEnvoy]) -> None:
    server, envoy = xds
    await server.apply(resources(["a"]))
    envoy.ask(CLUSTER)
    envoy.accept(await envoy.receive())
    applying = asyncio.ensure_future(server.apply(resources(["bad"])))
    await envoy.receive()
    envoy.ask(CLUSTER, error="cluster bad: invalid")
    with pytest.raises(XdsRejected, match="cluster bad: invalid"):
        await asyncio.wait_for(applying, 2)
    assert list(server.resources[CLUSTER]) == ["a"]
    # The same good configuration again is nothing to send; a new one goes out.
    assert await server.apply(resources(["a"])) is True
    assert envoy.responses.empty()


async def test_new_names_after_an_ack_are_answered(xds: tuple[XdsServer, FakeEnvoy]) -> None:
    server, envoy = xds
    await server.apply({**resources(["a", "b"], ["a", "b"]),
                        ROUTE: {"r": route_pb2.RouteConfiguration(name="r")}})
    envoy.ask(ENDPOINT, ["a"])
    resp = await envoy.receive()
    assert names(resp, endpoint_pb2.ClusterLoadAssignment) == ["a"]
    envoy.accept(resp, ["a"])
    envoy.ask(ENDPOINT, ["a", "b"])  # a cluster added: the same nonce, more names
    resp = await envoy.receive()
    assert names(resp, endpoint_pb2.ClusterLoadAssignment) == ["a", "b"]


async def test_a_stale_answer_is_ignored(xds: tuple[XdsServer, FakeEnvoy]) -> None:
    server, envoy = xds
    await server.apply(resources(["a"]))
    envoy.ask(CLUSTER)
    stale = await envoy.receive()
    envoy.accept(stale)
    applying = asyncio.ensure_future(server.apply(resources(["a", "b"])))
    await envoy.receive()
    envoy.nonce[CLUSTER] = stale.nonce  # an ACK of the older response does not count for the new one
    envoy.ask(CLUSTER)
    await asyncio.sleep(0.1)
    assert not applying.done()
    assert server.streams == 1
    applying.cancel()
