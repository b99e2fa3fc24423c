"""The ExternalProcessor service (epp.extproc.processor) over real gRPC: observer streams.

An observer stream is a second ext_proc filter in observability_mode (the shipped
layout): it watches a pick's response, named by `x-epp-request-id`, and is answered nothing.
"""

from __future__ import annotations

import asyncio

from epp.server import EppServer
from tests.extproc_messages import (
    FULL,
    MODEL,
    SSE_HEADERS,
    Observer,
    body_msg,
    completion,
    dest_header,
    exchange,
    headers_msg,
    observer_headers,
    pick_key,
    response_body_msg,
)
from tests.helpers import until


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
