"""The assembled server (epp.server): health over grpc.health.v1."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.server import EppServer


async def test_health_serving_once_pool_known(epp: EppServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.opts.grpc_health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor", "readiness"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
