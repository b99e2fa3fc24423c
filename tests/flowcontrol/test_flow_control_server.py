"""Flow control in a running epp, over real gRPC and the HTTP pick: who waits, who goes first, who is told no.

The pool is one endpoint and a concurrency detector allowing one request in flight, so the
second request finds the pool saturated; a request's response ending frees the slot.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson

from epp.server import EppServer
from tests.extproc_messages import (
    SSE_HEADERS,
    Stream,
    body_msg,
    completion,
    dest_header,
    headers_msg,
    response_body_msg,
)
from tests.helpers import StartEpp, until

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: round-robin-fairness-policy
  name: fair
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
flowControl:
  defaultRequestTTL: {ttl}
  defaultPriorityBand: {fairnessPolicyRef: fair}
  priorityBands:
  - {priority: -1, maxRequests: 2}
  saturationDetector: {pluginRef: concurrency-detector}
"""
OBJECTIVES = {"critical": 10, "batch": -1}



async def flow_epp(start_epp: StartEpp, ttl: str = "5s", **kw: object) -> EppServer:
    server = await start_epp(endpoints=1, config_text=CONFIG.replace("{ttl}", ttl), **kw)
    server.datastore.objectives = dict(OBJECTIVES)
    assert server.director.flow is not None
    return server


class Request:
    """One request on its own ext_proc stream (BUFFERED, inline response)."""

    def __init__(self, server: EppServer, objective: str | None = None, flow: str | None = None) -> None:
        headers = {}
        if objective:
            headers["x-gateway-inference-objective"] = objective
        if flow:
            headers["x-llm-d-inference-fairness-id"] = flow
        self.stream = Stream(server)
        self.stream.send(headers_msg(extra=headers), body_msg(completion()))
        self.picked: asyncio.Task = asyncio.create_task(self.stream.read(2, timeout=30))

    async def pick(self) -> str:
        answers = await self.picked
        return dest_header(answers[1].request_body.response)

    async def finish(self) -> None:
        self.stream.send(SSE_HEADERS)
        await self.stream.read(1)
        self.stream.send(response_body_msg(b"data: [DONE]\n\n", eos=True))
        await self.stream.read(1)
        self.stream.close()
        await self.stream.rest()


async def test_waiting_requests_go_highest_priority_first_as_the_slot_frees(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp)
    fc = server.director.flow
    assert fc is not None
    first = Request(server)
    assert await first.pick()
    waiting = {}
    for n, (name, objective) in enumerate((("batch", "batch"), ("normal", None), ("critical", "critical")), 1):
        waiting[name] = Request(server, objective)
        await until(lambda n=n: fc.count == n, 5, f"{name} to queue")
    order: list[str] = []
    current = first
    for _ in range(3):
        await current.finish()  # the response ends: the slot frees, exactly one waiter takes it
        left = {n: w for n, w in waiting.items() if n not in order}
        await until(lambda left=left: any(w.picked.done() for w in left.values()), 5, "the next pick")
        await asyncio.sleep(0.1)  # a second pick, if the freed slot let two through, shows now
        picked = [n for n, w in left.items() if w.picked.done()]
        assert len(picked) == 1, picked
        order.append(picked[0])
        current = waiting[picked[0]]
        assert await current.pick()
    await current.finish()
    assert order == ["critical", "normal", "batch"]
    assert fc.count == 0


async def test_a_request_past_its_ttl_gets_429_with_the_reason_header_and_a_json_body(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp, ttl="300ms")
    first = Request(server)
    await first.pick()
    late = Stream(server)
    late.send(headers_msg(), body_msg(completion()))
    answers = await late.rest(timeout=5)
    imm = answers[-1].immediate_response
    assert imm.status.code == 429
    headers = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
    assert headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert orjson.loads(imm.body)["error"]["code"] == "rejected-ttl-expired"
    await first.finish()


async def test_a_full_band_is_told_429_at_once(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp)
    first = Request(server)
    await first.pick()
    queued = [Request(server, "batch") for _ in range(2)]
    await until(lambda: server.director.flow.count == 2, 5, "the batch band to fill")  # type: ignore[union-attr]
    over = Stream(server)
    over.send(headers_msg(extra={"x-gateway-inference-objective": "batch"}), body_msg(completion()))
    imm = (await over.rest(timeout=2))[-1].immediate_response
    assert imm.status.code == 429
    assert {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}[
        "x-llm-d-request-dropped-reason"] == "rejected-saturated"
    server.director.flow.close()  # type: ignore[union-attr]
    for q in queued:  # each is told 503 (shutting down), not left hanging
        imm = (await q.picked)[1].immediate_response
        assert imm.status.code == 503
        assert {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}[
            "x-llm-d-request-dropped-reason"] == "rejected-shutting-down"
    await first.finish()


async def test_a_client_that_leaves_leaves_the_queue_at_once(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp)
    fc = server.director.flow
    assert fc is not None
    first = Request(server)
    await first.pick()
    gone = Request(server)
    await until(lambda: fc.count == 1, 5, "the request to queue")
    gone.picked.cancel()
    gone.stream.call.cancel()  # Envoy resets the ext_proc stream when its client disconnects
    await until(lambda: fc.count == 0, 2, "the cancelled request to leave the queue")
    nxt = Request(server)
    await until(lambda: fc.count == 1, 5, "the next request to queue")
    await first.finish()
    assert await nxt.pick()
    await nxt.finish()


async def test_the_http_pick_waits_and_answers_429_with_the_reason_header(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp, ttl="300ms", http_pick=True)
    first = Request(server)
    await first.pick()
    r = await server.http.post("/pick/v1/completions", content=completion(),  # type: ignore[attr-defined]
                               headers={"content-type": "application/json"})
    assert r.status_code == 429
    assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    await first.finish()


def fc_config(flow_section: str) -> str:
    """CONFIG with its flowControl section's settings replaced (the detector stays)."""
    head = CONFIG.split("flowControl:\n")[0]
    return head + "flowControl:\n" + flow_section + "  saturationDetector: {pluginRef: concurrency-detector}\n"


async def test_two_flows_take_turns_within_one_request_of_each_other(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp, ttl="60s")
    fc = server.director.flow
    assert fc is not None
    first = Request(server)
    await first.pick()
    waiting: list[tuple[str, Request]] = []
    # Flow "a" queues all its requests before flow "b" queues any: FCFS alone would serve a's first.
    for n, flow in enumerate(["a"] * 6 + ["b"] * 6, 1):
        waiting.append((flow, Request(server, flow=flow)))
        await until(lambda n=n: fc.count == n, 5, f"request {n} to queue")
    served: list[str] = []
    current = first
    while len(served) < len(waiting):
        left = [(f, r) for f, r in waiting if not r.picked.done()]
        await current.finish()
        await until(lambda left=left: any(r.picked.done() for _, r in left), 5, "the next pick")
        flow, current = next((f, r) for f, r in left if r.picked.done())
        assert await current.pick(), await current.picked
        served.append(flow)
        first_half = served[:6]
        assert abs(first_half.count("a") - first_half.count("b")) <= 1, served
    await current.finish()
    assert sorted(served) == ["a"] * 6 + ["b"] * 6
    assert fc.count == 0


async def test_overflow_by_count_across_bands_and_by_bytes_in_a_band(start_epp: StartEpp) -> None:
    body = len(completion())
    section = (f"  maxRequests: 2\n  defaultRequestTTL: 5s\n"
               f"  priorityBands:\n  - {{priority: -1, maxBytes: {body + body // 2}}}\n")
    server = await start_epp(endpoints=1, config_text=fc_config(section))
    server.datastore.objectives = dict(OBJECTIVES)
    fc = server.director.flow
    assert fc is not None
    first = Request(server)
    await first.pick()
    batch = Request(server, "batch")
    await until(lambda: fc.count == 1, 5, "a batch request to queue")

    async def dropped(objective: str | None) -> str:
        s = Stream(server)
        s.send(headers_msg(extra={"x-gateway-inference-objective": objective} if objective else {}),
               body_msg(completion()))
        imm = (await s.rest(timeout=2))[-1].immediate_response
        assert imm.status.code == 429
        assert orjson.loads(imm.body)["error"]["type"] == "rate_limit_exceeded"
        return {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}[
            "x-llm-d-request-dropped-reason"]

    # The batch band holds one body's bytes and a half: a second batch request does not fit.
    assert await dropped("batch") == "rejected-saturated"
    normal = Request(server)
    await until(lambda: fc.count == 2, 5, "a priority-0 request to queue")
    # Two wait, the global maxRequests: a third is refused whatever its band.
    assert await dropped("critical") == "rejected-saturated"
    assert fc.count == 2
    await first.finish()
    assert await normal.pick()  # the higher band first; the refused ones never queued
    await normal.finish()
    assert await batch.pick()
    await batch.finish()


async def test_with_no_endpoints_a_waiting_request_gets_503_no_endpoints(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp, ttl="300ms")
    server.datastore.set_endpoints([])
    s = Stream(server)
    s.send(headers_msg(), body_msg(completion()))
    await until(lambda: server.director.flow.count == 1, 5, "the request to wait")  # type: ignore[union-attr]
    imm = (await s.rest(timeout=5))[-1].immediate_response
    assert imm.status.code == 503
    headers = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
    assert headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
    assert headers["content-type"] == "application/json"


async def test_a_waiting_request_is_dispatched_when_an_endpoint_joins(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp)
    fc = server.director.flow
    assert fc is not None
    eps = server.datastore.all_endpoints()
    server.datastore.set_endpoints([])
    waiting = Request(server)
    await until(lambda: fc.count == 1, 5, "the request to wait")
    server.datastore.set_endpoints(eps)  # an endpoint joins: a capacity signal
    assert await waiting.pick() == eps[0].hostport
    await waiting.finish()


async def test_an_http_pick_whose_connection_closes_leaves_the_queue(start_epp: StartEpp) -> None:
    server = await flow_epp(start_epp, http_pick=True)
    fc = server.director.flow
    assert fc is not None
    first = Request(server)
    await first.pick()
    body = completion()
    _, writer = await asyncio.open_connection("127.0.0.1", server.opts.http_pick_port)
    writer.write(b"POST /pick/v1/completions HTTP/1.1\r\nhost: epp\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    await until(lambda: fc.count == 1, 5, "the HTTP pick to wait")
    writer.close()  # Envoy resets the check when its client goes
    await until(lambda: fc.count == 0, 2, "the closed connection's request to leave the queue")
    await first.finish()
    assert server.datastore.all_endpoints()[0].inflight == 0  # nothing was picked for the one that left


async def test_flow_control_metrics_move_on_the_metrics_endpoint(start_epp: StartEpp) -> None:
    from epp.stack import free_ports

    (port,) = free_ports(1)
    server = await flow_epp(start_epp, ttl="300ms", metrics_port=port)
    fc = server.director.flow
    assert fc is not None

    async def scrape() -> dict[str, float]:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def one(values: dict[str, float], prefix: str, *labels: str) -> float:
        found = [v for k, v in values.items() if k.startswith(prefix) and all(label in k for label in labels)]
        return sum(found)

    first = Request(server)
    await first.pick()
    late = Request(server, "batch")
    await until(lambda: fc.count == 1, 5, "the request to queue")
    during = await scrape()
    assert one(during, "llm_d_epp_flow_control_queue_size{", 'priority="-1"') == 1
    assert one(during, "llm_d_epp_flow_control_queue_bytes{", 'priority="-1"') == len(completion())
    assert one(during, "llm_d_epp_flow_control_pool_saturation{") == 1.0
    assert (await late.picked)[1].immediate_response.status.code == 429  # its TTL ran out
    after = await scrape()
    assert one(after, "llm_d_epp_flow_control_queue_size{", 'priority="-1"') == 0
    assert one(after, "llm_d_epp_flow_control_requests_total{", 'outcome="EvictedTTL"', 'priority="-1"') == 1
    assert one(after, "llm_d_epp_flow_control_requests_total{", 'outcome="Dispatched"', 'priority="0"') == 1
    assert one(after, "llm_d_epp_flow_control_request_queue_duration_seconds_count{", 'outcome="EvictedTTL"') == 1
    assert one(after, "llm_d_epp_flow_control_request_enqueue_duration_seconds_count{", 'priority="-1"') >= 1
    assert one(after, "llm_d_epp_flow_control_dispatch_cycle_duration_seconds_count") >= 1
    # The request phase is answered twice (a pick, a 429), each counted once.
    assert one(after, "llm_d_epp_request_processing_duration_seconds_count") == 2
    await first.finish()
