"""epp in a cluster, end to end inside the process: the real lightkube client against the stand-in
API server (tests/kubeapi.py), picks over real gRPC, health as upstream's probes ask, /metrics auth.
"""

from __future__ import annotations

import grpc
import httpx
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.server import EppServer
from tests.extproc_messages import body_msg, completion, dest_header, exchange, headers_msg
from tests.helpers import StartEpp, until
from tests.kube_cluster import NS, POOL, PORT, Cluster

pytestmark = pytest.mark.integration


async def in_cluster(start_epp: StartEpp, cluster: Cluster, **kw) -> EppServer:
    return await start_epp(endpoints=0, pool_name=POOL, pool_namespace=NS, kubeconfig=cluster.kubeconfig, **kw)


async def health(server: EppServer, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.opts.grpc_health_port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
        return resp.status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def pick(server: EppServer, headers: dict[str, str] | None = None):
    out = await exchange(server, [headers_msg(extra=headers), body_msg(completion())], 2)
    return out[1]


def picked(resp) -> str:
    return dest_header(resp.request_body.response)


async def test_the_pool_from_the_api_routes_and_readiness_follows_it(start_epp: StartEpp, cluster: Cluster) -> None:
    server = await in_cluster(start_epp, cluster)
    # No InferencePool yet: alive, not ready, under every name the upstream charts probe.
    assert await health(server, "liveness") == SERVING
    for service in ("inference-extension", "readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
        assert await health(server, service) == NOT_SERVING, service
    cluster.pool()
    cluster.pod("vllm-a", "127.0.77.1")
    cluster.pod("vllm-b", "127.0.77.2")
    cluster.pod("other", "127.0.77.9", app="not-this-pool")
    await until(lambda: len(server.datastore.ready_endpoints()) == 2, what="the pool's two pods")
    await until(lambda: server.ready, what="readiness")
    for service in ("inference-extension", "readiness", ""):
        assert await health(server, service) == SERVING, service
    seen = {picked(await pick(server)) for _ in range(6)}
    assert seen <= {f"127.0.77.1:{PORT}", f"127.0.77.2:{PORT}"}
    # A pod going unready, then a new one: picks follow.
    cluster.pod("vllm-a", "127.0.77.1", ready=False)
    cluster.pod("vllm-c", "127.0.77.3")
    await until(lambda: {e.address for e in server.datastore.ready_endpoints()} == {"127.0.77.2", "127.0.77.3"},
                what="vllm-a unready and vllm-c ready")
    assert {picked(await pick(server)) for _ in range(6)} <= {f"127.0.77.2:{PORT}", f"127.0.77.3:{PORT}"}
    # The pool deleted: nothing to route to, not ready (as upstream clears its datastore).
    cluster.api.delete("inference.networking.k8s.io/v1", "InferencePool", NS, POOL)
    await until(lambda: not server.ready, what="not ready without its pool")
    assert await health(server, "inference-extension") == NOT_SERVING


async def test_an_objectives_priority_change_reaches_admission(start_epp: StartEpp, cluster: Cluster) -> None:
    cluster.pool()
    cluster.pod("vllm-a", "127.0.77.1")
    cluster.objective("batch", 0)
    server = await in_cluster(start_epp, cluster)
    await until(lambda: server.ready and server.datastore.objectives.get("batch") == 0, what="the objective")
    # No metrics can be scraped from 127.0.77.1: the pool counts as saturated. Priority 0 is never shed.
    objective = {"x-gateway-inference-objective": "batch"}
    assert picked(await pick(server, objective)) == f"127.0.77.1:{PORT}"
    cluster.objective("batch", -1)
    await until(lambda: server.datastore.objectives.get("batch") == -1, what="the new priority")
    shed = await pick(server, objective)
    assert shed.immediate_response.status.code == 429
    assert orjson.loads(shed.immediate_response.body)["error"]["code"] == "pool_saturated"


async def test_an_api_outage_keeps_routing_to_the_pods_known(start_epp: StartEpp, cluster: Cluster) -> None:
    cluster.pool()
    cluster.pod("vllm-a", "127.0.77.1")
    server = await in_cluster(start_epp, cluster)
    await until(lambda: server.ready, what="readiness")
    cluster.api.outage("refuse")
    cluster.api.drop_watches()
    assert server.kubernetes is not None
    await until(lambda: not server.kubernetes.api_reachable, what="the outage to be noticed")
    assert server.ready
    assert picked(await pick(server)) == f"127.0.77.1:{PORT}"
    cluster.api.outage(None)
    cluster.pod("vllm-b", "127.0.77.2")
    await until(lambda: len(server.datastore.ready_endpoints()) == 2, what="the change made after the outage")


async def test_only_the_leader_is_ready_and_a_standby_takes_over(start_epp: StartEpp, cluster: Cluster) -> None:
    cluster.pool()
    cluster.pod("vllm-a", "127.0.77.1")
    first = await in_cluster(start_epp, cluster, ha_enable_leader_election=True)
    await until(lambda: first.ready, what="the first replica to lead")
    second = await in_cluster(start_epp, cluster, ha_enable_leader_election=True)
    await until(lambda: len(second.datastore.ready_endpoints()) == 1, what="the standby's warm datastore")
    assert not second.ready
    assert await health(second, "readiness") == NOT_SERVING
    assert await health(second, "liveness") == SERVING
    await first.stop(grace=0)  # a graceful stop releases the Lease
    await until(lambda: second.ready, timeout=15, what="the standby to take over")
    assert await health(second, "readiness") == SERVING


async def test_metrics_need_a_token_allowed_to_get_them(start_epp: StartEpp, cluster: Cluster) -> None:
    from epp.stack import free_ports

    cluster.pool()
    port = free_ports(1)[0]
    server = await in_cluster(start_epp, cluster, metrics_port=port)
    url = f"http://127.0.0.1:{port}/metrics"
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 401
        denied = cluster.metrics_reader(allowed=False)
        assert (await http.get(url, headers={"authorization": f"Bearer {denied}"})).status_code == 403
        reader = cluster.metrics_reader()
        ok = await http.get(url, headers={"authorization": f"Bearer {reader}"})
        assert ok.status_code == 200
        assert "inference_pool_ready_pods" in ok.text
    assert server.metrics_endpoint is not None
