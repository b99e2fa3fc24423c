"""--tracing end to end: a running epp sends one span per request to an OTLP/gRPC collector.

The collector is a real gRPC server speaking OpenTelemetry's TraceService (the stand-in for an
OpenTelemetry Collector); epp is configured only through upstream's OTEL_* environment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from epp.stack import free_ports
from tests.extproc_messages import completion
from tests.helpers import StartEpp, until

pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with its attributes as plain values."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                for a in rs.resource.attributes:
                    if a.key == "service.name":
                        self.services.add(a.value.string_value)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {}
                        for a in span.attributes:
                            kind = a.value.WhichOneof("value")
                            attrs[a.key] = ([v.string_value for v in a.value.array_value.values]
                                            if kind == "array_value" else getattr(a.value, kind))
                        self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                           "parent": span.parent_span_id.hex(), "attributes": attrs})
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    (port,) = free_ports(1)
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms: the batch leaves at once
    try:
        yield servicer
    finally:
        server.stop(0)


async def test_each_request_is_one_span_at_the_collector_with_the_pick(
        start_epp: StartEpp, collector: Collector) -> None:
    epp = await start_epp(http_pick=True, tracing=True)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    picked = []
    for i in range(3):
        headers = {"content-type": "application/json"}
        if i == 0:
            headers["traceparent"] = f"00-{trace_id}-00f067aa0ba902b7-01"
        r = await epp.http.post("/pick/v1/completions", content=completion(), headers=headers)
        assert r.status_code == 200
        picked.append(r.headers["x-gateway-destination-endpoint"])
    await until(lambda: len(collector.spans) >= 3, timeout=10, what="three spans at the collector")
    spans = collector.spans
    assert len(spans) == 3
    assert {s["name"] for s in spans} == {"gateway.request"}
    assert collector.services == {"llm-d-epp"}
    assert sorted(s["attributes"]["llm_d.epp.endpoint"] for s in spans) == sorted(picked)
    first = next(s for s in spans if s["trace_id"] == trace_id)
    assert first["parent"] == "00f067aa0ba902b7"  # a child of the caller's span
    attrs = first["attributes"]
    assert attrs["gen_ai.request.model"] == "m"
    assert attrs["llm_d.epp.candidates"] == 3
    assert "llm_d.epp.score.total" in attrs
    assert len({s["trace_id"] for s in spans}) == 3


async def test_a_refused_request_is_an_error_span(start_epp: StartEpp, collector: Collector) -> None:
    epp = await start_epp(http_pick=True, tracing=True)
    r = await epp.http.post("/pick/v1/completions", content=completion(),
                            headers={"x-gateway-destination-endpoint-subset": "10.9.9.9:1"})
    assert r.status_code == 200  # the 503 leaves through the ext_proc filter; the span records it
    await until(lambda: collector.spans, timeout=10, what="the span at the collector")
    (span,) = collector.spans
    assert span["attributes"]["http.response.status_code"] == 503
    assert "llm_d.epp.endpoint" not in span["attributes"]
