"""The ExternalProcessor service (epp.extproc.processor) over real gRPC: observer streams.

An observer stream is a second ext_proc filter in observability_mode (the shipped
layout): it watches a pick's response, named by `x-epp-request-id`, and is answered nothing.
"""

from __future__ import annotations

import asyncio

from epp.extproc import responses as R
from epp.server import EppServer
from tests.extproc_messages import (
    FULL,
    MODEL,
    SSE_HEADERS,
    Observer,
    Stream,
    body_msg,
    completion,
    dest_header,
    exchange,
    headers_msg,
    observer_headers,
    pick_key,
    response_body_msg,
    response_headers_msg,
    set_headers,
)
from tests.helpers import StartEpp, until


def sample(epp: EppServer, name: str) -> float:
    return epp.metrics.registry.get_sample_value(name, {"model_name": MODEL, "target_model_name": MODEL}) or 0.0


async def test_observer_stream_holds_the_request_until_its_response_ends(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(mode=FULL), body_msg(completion())], 2)
    common = out[0].request_headers.response
    dest, key = dest_header(common), pick_key(common)
    assert key, "the pick names its exchange for the observer"
    ep = epp.datastore.get(dest)
    obs = Observer(epp)  # the pick stream has closed; the observer stream opens as Envoy sends on
    obs.send(observer_headers(key), SSE_HEADERS, response_body_msg(b'data: {"choices":[]}\n\n'))
    exchange_ = epp.exchanges.open_exchanges[key]
    await until(lambda: exchange_.usage.first_byte_at > 0, what="the observer's first response chunk")
    # A fixed wait, on purpose: it shows the release does NOT happen, long past the grace a pick
    # without an observer gets.
    await asyncio.sleep(3 * epp.opts.observer_grace)
    assert ep.inflight == 1, "a watched request stays in flight while it streams"
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":51,"completion_tokens":4}}\n\ndata: [DONE]\n\n'
    obs.send(response_body_msg(usage, eos=True))
    assert await obs.responses() == [], "observability_mode: epp answers nothing and ends the stream"
    assert ep.inflight == 0
    assert key not in epp.exchanges.open_exchanges
    assert sample(epp, "inference_objective_input_tokens_sum") == 51
    assert sample(epp, "inference_objective_request_ttft_seconds_count") == 1


async def test_observer_stream_that_ends_early_releases_the_request(epp: EppServer) -> None:
    out = await exchange(epp, [headers_msg(), body_msg(completion())], 2)
    common = out[1].request_body.response
    ep, key = epp.datastore.get(dest_header(common)), pick_key(common)
    obs = Observer(epp)
    obs.send(observer_headers(key), SSE_HEADERS)
    await until(lambda: epp.exchanges.open_exchanges[key].usage.status == 200, what="the observed status")
    obs.close()  # the client went away: Envoy closes the observer stream
    await obs.responses()
    assert ep.inflight == 0


async def test_observer_for_an_unknown_exchange_is_closed_at_once(epp: EppServer) -> None:
    """Another replica's pick, or one long released: epp ends the stream, so Envoy sends no more."""
    obs = Observer(epp)
    obs.send(observer_headers("not-ours-1"))
    assert await obs.responses() == []
    assert all(ep.inflight == 0 for ep in epp.datastore.all_endpoints())


VERIFIER_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""


async def test_plugins_response_headers_reach_the_client_with_the_endpoint_the_proxy_served(
        start_epp: StartEpp) -> None:
    server = await start_epp(config_text=VERIFIER_CONFIG)
    for served_by in ("metadata", "header", None):
        s = Stream(server)
        s.send(headers_msg(), body_msg(completion()))
        picked = dest_header((await s.read(2))[1].request_body.response)
        rh = response_headers_msg(200, "application/json")
        if served_by == "metadata":  # as Envoy reports it: the request's envoy.lb metadata
            rh.metadata_context.filter_metadata["envoy.lb"].fields[
                "x-gateway-destination-endpoint-served"].string_value = picked
        elif served_by == "header":
            rh.response_headers.headers.headers.add(key="x-gateway-destination-endpoint-served",
                                                    raw_value=picked.encode())
        s.send(rh)
        added = set_headers((await s.read(1))[0].response_headers.response)
        expected = picked if served_by else "fail: missing destination endpoint served metadata"
        assert added["x-conformance-test-served-endpoint"] == expected
        s.send(response_body_msg(b"{}", eos=True))
        await s.read(1)
        s.close()
        await s.rest()
    await until(lambda: len(server.exchanges) == 0, what="every exchange to finish")


async def test_without_response_header_plugins_the_response_headers_pass_unchanged(epp: EppServer) -> None:
    s = Stream(epp)
    s.send(headers_msg(), body_msg(completion()))
    await s.read(2)
    s.send(response_headers_msg(200, "application/json"))
    assert (await s.read(1))[0].SerializeToString() == R.CONTINUE_RESPONSE_HEADERS
    s.send(response_body_msg(b"{}", eos=True))
    await s.read(1)
    s.close()
    await s.rest()
