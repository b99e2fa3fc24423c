"""Fuzz the ext_proc state machine (epp.extproc.stream.PickStream) directly, message by message.

Fed any sequence of messages (kinds in any order, any body modes, bodies of any size and content,
end_of_stream anywhere, hand-offs that hold a body or an error), as the processor feeds it:
- no exception escapes a handler or close();
- each answer is a ProcessingResponse of a kind that fits the message it answers, a pick names a
  pool endpoint, an ImmediateResponse is an HTTP error with an OpenAI-style JSON body and ends it;
- a stream picks at most once, and every exchange it opened is released exactly once: once the
  stream is closed and the observer grace has passed, no exchange is open, every endpoint's
  in-flight count is 0, and so is epp's running-requests gauge (inference_objective_running_requests).
"""

from __future__ import annotations

import asyncio

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from epp import errors
from epp.datastore import Datastore, Endpoint, parse_hostport
from epp.director import Director
from epp.exchanges import Exchanges
from epp.extproc.stream import HANDLERS, PickStream
from epp.handoff import Handoff, Handoffs
from epp.metrics import EppMetrics
from epp.protocol import EXCHANGE_HEADER, HANDOFF_HEADER
from epp.scheduling import picker_config
from tests.fuzz.fuzz_checks import as_response, check_answers, pick_of, running_requests
from tests.fuzz.fuzz_strategies import fuzz_settings, good_request, header_map, message_sequence
from tests.helpers import until

# Never connected to: nothing here scrapes or forwards; the addresses only name the pool.
POOL = ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"]
MAX_BODY = 4096

HANDOFFS = st.sampled_from([
    None,
    Handoff(body=good_request("completions", "rewritten"), primary=POOL[1], targets=f"{POOL[1]},{POOL[2]}"),
    Handoff(error=errors.EppError(errors.SERVICE_UNAVAILABLE, "no ready endpoint in the pool", reason="no_endpoint")),
])


def with_handoff(msgs: list[pb.ProcessingRequest], key: str) -> None:
    """Name the hand-off in the first request headers, as the HTTP pick layout's ext_proc filter does."""
    for msg in msgs:
        if msg.HasField("request_headers"):
            extra = header_map({HANDOFF_HEADER: "1", EXCHANGE_HEADER: key}, raw=True)
            msg.request_headers.headers.headers.extend(extra.headers)
            return


async def drive(msgs: list[pb.ProcessingRequest], handoff: Handoff | None) -> EppMetrics:
    """Feed the messages as the processor does, check every answer and the release; the metrics it kept."""
    ds = Datastore()
    ds.set_endpoints([Endpoint(*parse_hostport(p)) for p in POOL])
    metrics = EppMetrics("fuzz")
    exchanges = Exchanges(Director(ds, picker_config.default_config(seed=1), metrics), metrics, observer_grace=0.0)
    handoffs = Handoffs(grace=60)
    if handoff is not None:
        with_handoff(msgs, handoffs.hold(handoff))
    stream = PickStream(exchanges, handoffs, MAX_BODY)
    picks = []
    try:
        for msg in msgs:
            kind = msg.WhichOneof("request")
            if kind is None:
                continue  # the processor skips a message of no known kind
            answers = [as_response(a) for a in HANDLERS[kind](stream, msg)]
            check_answers(kind, answers, POOL)
            picks += [p for a in answers if (p := pick_of(a)) is not None]
            immediate = bool(answers) and answers[-1].WhichOneof("response") == "immediate_response"
            assert immediate == stream.ended, "the stream ends exactly when it answers an immediate response"
            if stream.ended:
                break  # the processor ends the stream here
    finally:
        stream.close()
    if currently_in_test_context():  # the statistics of a hypothesis run; a plain test records none
        event(f"ended in phase: {stream.phase.name}")
        event(f"picks: {len(picks)}")
    assert len(picks) <= 1, f"one stream picked {len(picks)} times"
    await until(lambda: not exchanges.open_exchanges, timeout=2, what="every exchange to be released")
    inflight = {ep.hostport: ep.inflight for ep in ds.all_endpoints()}
    assert all(n == 0 for n in inflight.values()), f"in-flight counts after the stream ended: {inflight}"
    return metrics


@fuzz_settings(400)
@given(msgs=message_sequence(POOL), handoff=HANDOFFS)
def test_any_message_sequence_is_answered_validly_and_releases_its_exchange(
        msgs: list[pb.ProcessingRequest], handoff: Handoff | None) -> None:
    asyncio.run(drive(msgs, handoff))




async def test_a_headers_only_inference_request_leaves_the_running_gauge_at_zero() -> None:
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=header_map({":path": "/v1/completions", ":method": "POST"}, raw=True), end_of_stream=True))
    metrics = await drive([msg], None)
    assert running_requests(metrics) == 0


@fuzz_settings(200)
@given(msgs=message_sequence(POOL), handoff=HANDOFFS)
def test_the_running_gauge_returns_to_zero_after_any_sequence(
        msgs: list[pb.ProcessingRequest], handoff: Handoff | None) -> None:
    assert running_requests(asyncio.run(drive(msgs, handoff))) == 0
