"""Flow control in a running epp, over real gRPC and the HTTP pick: who waits, who goes first, who is told no.

The pool is one endpoint and a concurrency detector allowing one request in flight, so the
second request finds the pool saturated; a request's response ending frees the slot.
"""

from __future__ import annotations

import asyncio

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
