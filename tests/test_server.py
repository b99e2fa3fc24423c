"""The assembled server (epp.server): health over grpc.health.v1."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.errors import ConfigError
from epp.server import EppServer, ServeOptions


async def test_health_serving_once_pool_known(epp: EppServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.opts.grpc_health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor", "readiness"):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_subset_hint_is_ignored_when_the_subset_filter_is_disabled(start_epp) -> None:
    from tests.extproc_messages import body_msg, completion, dest_header, exchange, headers_msg

    server = await start_epp(disable_endpoint_subset_filter=True)
    out = await exchange(server, [headers_msg(subset=["10.9.9.9:80"]), body_msg(completion())], 2)
    assert dest_header(out[1].request_body.response) in server.opts.endpoints  # not a 503


async def test_endpoint_scores_ride_on_the_picks_metadata_when_asked(start_epp) -> None:
    from tests.extproc_messages import body_msg, completion, exchange, headers_msg

    plain = await start_epp()
    scored = await start_epp(emit_endpoint_scores=True)
    for server, emitted in ((plain, False), (scored, True)):
        out = await exchange(server, [headers_msg(), body_msg(completion())], 2)
        lb = out[1].dynamic_metadata.fields["envoy.lb"].struct_value.fields
        assert ("x-gateway-destination-endpoint-scores" in lb) is emitted
        if emitted:
            scores = lb["x-gateway-destination-endpoint-scores"].struct_value.fields
            assert set(scores) == {lb["x-gateway-destination-endpoint"].string_value}
            assert scores[lb["x-gateway-destination-endpoint"].string_value].number_value > 0


async def test_grpc_message_limits_are_the_flags(start_epp) -> None:
    import orjson

    from tests.extproc_messages import body_msg, exchange, headers_msg

    server = await start_epp(grpc_max_recv_msg_size=64 * 1024, max_body_bytes=1 << 20)
    small = orjson.dumps({"model": "m", "prompt": "x" * 1000})
    assert (await exchange(server, [headers_msg(), body_msg(small)], 2))[1].HasField("request_body")
    big = body_msg(orjson.dumps({"model": "m", "prompt": "x" * 100_000}))
    assert big.ByteSize() > 64 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await exchange(server, [headers_msg(), big], 2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_drain_keeps_serving_picks_while_not_ready(start_epp) -> None:
    import asyncio

    from tests.extproc_messages import body_msg, completion, dest_header, exchange, headers_msg
    from tests.helpers import until

    server = await start_epp()
    stopping = asyncio.create_task(server.stop(grace=0, drain=1.0))
    await until(lambda: not server.ready, what="not ready at the start of the drain")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.opts.grpc_health_port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    out = await exchange(server, [headers_msg(), body_msg(completion())], 2)  # a proxy that has not noticed
    assert dest_header(out[1].request_body.response) in server.opts.endpoints
    await stopping


async def test_metrics_over_tls_with_client_certificates(start_epp, tmp_path) -> None:
    import ssl

    import httpx

    from epp.stack import free_ports
    from tests.tls_helpers import Issuer, PlainFiles

    ca = Issuer("metrics CA")
    PlainFiles(tmp_path / "certs").write(ca.leaf())
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    port = free_ports(1)[0]
    await start_epp(metrics_port=port, metrics_cert_dir=str(tmp_path / "certs"),
                    metrics_client_ca_file=str(tmp_path / "ca.crt"))
    client_pair = ca.leaf(client=True)
    (tmp_path / "client.crt").write_bytes(client_pair.certificate_chain)
    (tmp_path / "client.key").write_bytes(client_pair.private_key)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    ctx.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    async with httpx.AsyncClient(verify=ctx) as http:
        assert (await http.get(f"https://localhost:{port}/metrics")).status_code == 200
    no_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    async with httpx.AsyncClient(verify=no_cert) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"https://localhost:{port}/metrics")


REWRITE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: rollout, namespace: default}
spec:
  poolRef: {name: default}
  rules:
  - matches: [{model: {value: food-review}}]
    targets: [{modelRewrite: food-review-v1, weight: 90}, {modelRewrite: food-review-v2, weight: 10}]
"""


async def test_models_the_rewrites_name_keep_their_metric_label_past_the_label_limit(start_epp, tmp_path) -> None:
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(REWRITE)
    server = await start_epp(pool_file=str(pool_file))
    models = server.metrics.models
    for i in range(models.limit):  # clients send many made-up model names
        models(f"made-up-{i}")
    assert models("yet-another") == "other"
    for name in ("food-review", "food-review-v1", "food-review-v2"):
        assert models(name) == name


async def test_tracing_without_the_opentelemetry_sdk_is_a_start_up_error_that_says_what_to_install() -> None:
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the OpenTelemetry SDK is installed here")
    with pytest.raises(ConfigError, match="pip install opentelemetry-sdk"):
        EppServer(ServeOptions(endpoints=["127.0.0.1:1"], tracing=True))
