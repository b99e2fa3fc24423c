"""The HTTP pick's hand-off (epp.handoff) to the layout's ext_proc filter, for what ext_authz cannot carry.

A pick over HTTP that rewrote the model answers ext_authz with `x-epp-rewrite-body` and a
key; the ext_proc stream that brings the key sends the new body, once. A key nobody holds
any more (expired, taken, another replica's) is an ordinary request: the stream picks itself.
"""

from __future__ import annotations

import orjson
import pytest

from epp.rewrites import ModelRewrites, RewriteRule
from epp.server import EppServer
from tests.extproc_messages import FULL, body_msg, completion, dest_header, exchange, headers_msg, pick_key
from tests.helpers import StartEpp, until


@pytest.fixture
async def epp(start_epp: StartEpp) -> EppServer:
    """This module's epp serves the HTTP pick, and rewrites model "alias" to "m-v2"."""
    server = await start_epp(http_pick=True)
    server.datastore.rewrites = ModelRewrites([RewriteRule("canary", frozenset({"alias"}), ("m-v2",), (1,))], seed=1)
    return server


async def http_pick_with_rewrite(epp: EppServer) -> tuple[str, str]:
    """An HTTP pick whose model is rewritten: (hand-off key, the pick's endpoint)."""
    r = await epp.http.post("/pick/v1/completions", content=completion(model="alias"))
    assert r.status_code == 200
    assert r.headers["x-epp-rewrite-body"] == "1"
    return r.headers["x-epp-request-id"], r.headers["x-gateway-destination-endpoint"]


def handoff_stream(key: str) -> list:
    """What Envoy's conditional ext_proc filter sends: both headers, then the (unchanged) client body."""
    extra = {"x-epp-request-id": key, "x-epp-rewrite-body": "1"}
    return [headers_msg(mode=FULL, extra=extra), body_msg(completion(model="alias"))]


async def test_a_rewritten_body_goes_out_through_the_ext_proc_stream(epp: EppServer) -> None:
    key, dest = await http_pick_with_rewrite(epp)
    out = await exchange(epp, handoff_stream(key), 2)
    common = out[0].request_headers.response
    assert dest_header(common) == dest  # the same pick, not a new one
    sent = out[1].request_body.response.body_mutation.streamed_response.body
    assert orjson.loads(sent)["model"] == "m-v2"
    assert epp.datastore.get(dest).inflight == 1  # counted once


async def test_an_expired_handoff_key_makes_the_ext_proc_filter_pick_itself(epp: EppServer) -> None:
    key, _ = await http_pick_with_rewrite(epp)
    await until(lambda: len(epp.handoffs) == 0, what="the hand-off to expire")
    out = await exchange(epp, handoff_stream(key), 2)
    common = out[0].request_headers.response
    assert dest_header(common) in epp.opts.endpoints  # routed, not failed
    own = pick_key(common)
    assert own != key
    assert own in epp.exchanges.open_exchanges  # a pick of this stream's own
    sent = out[1].request_body.response.body_mutation.streamed_response
    assert orjson.loads(sent.body)["model"] == "m-v2"  # and its own rewrite of the client's body
    assert sent.end_of_stream


async def test_a_handoff_is_taken_once(epp: EppServer) -> None:
    """A second stream bringing the same key (a retry) is picked on its own, not given the first one's pick."""
    key, _ = await http_pick_with_rewrite(epp)
    first = await exchange(epp, handoff_stream(key), 2)
    assert pick_key(first[0].request_headers.response) == ""  # the HTTP pick named the exchange already
    second = await exchange(epp, handoff_stream(key), 2)
    own = pick_key(second[0].request_headers.response)
    assert own
    assert own != key
    assert own in epp.exchanges.open_exchanges
