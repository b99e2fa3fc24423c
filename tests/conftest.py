"""Shared fixtures: in-process epp servers on free loopback ports, each stopped when its test ends.

Test files are plain modules, not packages: pytest imports each by its own name, so
two test files anywhere under tests/ must not share a file name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg

from epp.server import EppServer, ServeOptions
from epp.stack import free_ports

# As tests.helpers.StartEpp, which test files annotate with. This file imports nothing from tests/,
# so that a test file that needs no helper also runs under a bare `pytest` (without the repository
# root on sys.path).
StartEpp = Callable[..., Awaitable[EppServer]]


@pytest.fixture
async def start_epp() -> AsyncIterator[StartEpp]:
    """`await start_epp(endpoints=3, http_pick=False, **ServeOptions fields)` starts an EppServer.

    It listens on free loopback ports. Its pool is the `endpoints` given ("ip:port" strings), or
    that many loopback addresses where nothing listens, so scrapes fail and metrics stay unknown
    unless a test sets them.
    Small limits keep tests quick: a 4096-byte body limit and a 0.1 s observer grace;
    scheduling is seeded. The server comes with `stub`, an ext_proc client of its gRPC
    port, and with `http_pick=True` also `http`, an httpx client of its HTTP pick.
    """
    running: list[tuple[EppServer, list[Callable[[], Awaitable[Any]]]]] = []

    async def start(*, endpoints: int | list[str] = 3, http_pick: bool = False, **overrides: Any) -> EppServer:
        given = endpoints if isinstance(endpoints, list) else None
        grpc_port, health_port, pick_port, *pool = free_ports(3 + (0 if given is not None else int(endpoints)))
        opts = ServeOptions(
            grpc_port=grpc_port, grpc_health_port=health_port, metrics_port=0,
            http_pick_port=pick_port if http_pick else 0, bind_address="127.0.0.1",
            endpoints=given if given is not None else [f"127.0.0.1:{p}" for p in pool], max_body_bytes=4096,
            seed=1, observer_grace=0.1,
        )
        server = EppServer(dataclasses.replace(opts, **overrides))
        closers: list[Callable[[], Awaitable[Any]]] = []
        running.append((server, closers))  # stopped even if start fails half-way
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.opts.grpc_port}")
        closers.append(channel.close)
        server.stub = pbg.ExternalProcessorStub(channel)  # type: ignore[attr-defined]
        if server.opts.http_pick_port:
            http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.opts.http_pick_port}")
            closers.append(http.aclose)
            server.http = http  # type: ignore[attr-defined]
        return server

    try:
        yield start
    finally:
        for server, closers in reversed(running):
            for close in closers:
                await close()
            await server.stop(grace=1)


@pytest.fixture
async def epp(start_epp: StartEpp) -> EppServer:
    """epp with a pool of three endpoints (see `start_epp`)."""
    return await start_epp()


@pytest.fixture
def cluster(tmp_path: Any) -> Any:
    """A stand-in Kubernetes API server (tests/kubeapi.py) with epp's service account and RBAC."""
    from tests.kube_cluster import Cluster
    from tests.kubeapi import KubeApi

    with KubeApi() as api:
        yield Cluster(api, tmp_path)
