"""Fuzz epp's ExternalProcessor over real gRPC: any message sequence, any stream ending, observer streams.

Each example is one to three pick streams sent at once, each perhaps watched by an observer stream
(the shipped layout's second ext_proc filter) that names its pick, another key or none. Messages
go out as raw bytes, some with a protobuf field this version does not define (a newer Envoy's);
streams end with a half-close (Envoy done) or a cancellation (a reset), after any message.

A shadow PickStream on the server's own director is fed each stream's messages first: it says how
many answers of which kinds each message gets, so the client reads exactly those, message by
message. Properties:
- no stream ends in a gRPC error: no exception escapes the handler;
- every answer decodes as a ProcessingResponse of a kind that fits its message (the checks of
  fuzz_checks), in the number and kinds the state machine gives, and nothing follows the end;
- an observer stream is answered nothing;
- once every stream is over and the observer grace has passed, no exchange is open and every
  endpoint's in-flight count is back to 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import event, given
from hypothesis import strategies as st

from epp.exchanges import Exchanges
from epp.extproc.processor import SERVICE
from epp.extproc.stream import HANDLERS, PickStream
from epp.handoff import Handoffs
from epp.protocol import EXCHANGE_HEADER, SUBSET_KEY, SUBSET_NAMESPACE
from epp.server import EppServer
from tests.fuzz.fuzz_checks import as_response, check_answers, pick_of
from tests.fuzz.fuzz_strategies import (
    fuzz_settings,
    header_map,
    message_sequence,
    response_msg,
    unknown_field,
)
from tests.helpers import StartEpp, until

# An observer opened after its pick stream closed usually claims the pick within this grace; when a
# slow machine lets the grace pass first, epp refuses the observer and releases the pick itself, and
# the properties hold all the same (the observer client accepts either).
GRACE = 0.1
READ_TIMEOUT = 10.0


@dataclasses.dataclass
class Observer:
    names: str  # "pick": the key its pick set; "unknown": a key nobody set; "none": no key header
    opens: str  # "before-close": while its pick stream is still open; "after-close": once it ended
    msgs: list[pb.ProcessingRequest]
    ending: str  # "half-close" or "cancel"


@dataclasses.dataclass
class PickScenario:
    msgs: list[pb.ProcessingRequest]  # subset hints name PLACEHOLDERS, for the server's real endpoints
    tails: list[bytes]  # appended to each message on the wire: b"" or a field this version does not define
    ending: str
    observer: Observer | None

    def wire(self, pool: list[str]) -> list[bytes]:
        """Each message as sent, its subset hint naming the server's endpoints."""
        return [with_endpoints(m, pool).SerializeToString() + tail for m, tail in zip(self.msgs, self.tails,
                                                                                      strict=True)]


# The fuzzed messages' subset hints name these; each stands for one of the running server's endpoints.
PLACEHOLDERS = ["@0", "@1", "@2"]


def with_endpoints(msg: pb.ProcessingRequest, pool: list[str]) -> pb.ProcessingRequest:
    fm = msg.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm or SUBSET_KEY not in fm[SUBSET_NAMESPACE].fields:
        return msg
    out = pb.ProcessingRequest()
    out.CopyFrom(msg)
    value = out.metadata_context.filter_metadata[SUBSET_NAMESPACE].fields[SUBSET_KEY]

    def real(text: str) -> str:
        for i, placeholder in enumerate(PLACEHOLDERS):
            text = text.replace(placeholder, pool[i])
        return text

    if value.HasField("string_value"):
        value.string_value = real(value.string_value)
    elif value.HasField("list_value"):
        for v in value.list_value.values:
            if v.HasField("string_value"):
                v.string_value = real(v.string_value)
    return out


@st.composite
def observers(draw: st.DrawFn) -> Observer | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    msgs = draw(st.lists(response_msg(), max_size=4))
    for m in msgs:
        m.observability_mode = True
    return Observer(draw(st.sampled_from(["pick", "pick", "pick", "unknown", "none"])),
                    draw(st.sampled_from(["before-close", "after-close"])), msgs,
                    draw(st.sampled_from(["half-close", "cancel"])))


@st.composite
def scenarios(draw: st.DrawFn) -> list[PickScenario]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        msgs = draw(message_sequence(PLACEHOLDERS))
        tails = [unknown_field(draw(st.integers(20, 2000)), b"new") if draw(st.integers(0, 5)) == 0 else b""
                 for _ in msgs]
        out.append(PickScenario(msgs, tails, draw(st.sampled_from(["half-close", "cancel"])), draw(observers())))
    return out


class RawStream:
    """One ext_proc stream whose messages go out as bytes, written one at a time as Envoy writes them."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        process = channel.stream_stream(f"/{SERVICE}/Process", request_serializer=lambda b: b,
                                        response_deserializer=pb.ProcessingResponse.FromString)
        self.call = process()

    async def send(self, data: bytes) -> None:
        await self.call.write(data)

    async def read(self, n: int) -> list[pb.ProcessingResponse]:
        out = []
        for _ in range(n):
            r = await asyncio.wait_for(self.call.read(), READ_TIMEOUT)
            assert r is not grpc.aio.EOF, f"epp ended the stream after {len(out)} of {n} answers"
            out.append(r)
        return out

    async def rest(self) -> list[pb.ProcessingResponse]:
        """Every answer left until epp ends the stream, which must end without a gRPC error."""
        rest = []
        while (r := await asyncio.wait_for(self.call.read(), READ_TIMEOUT)) is not grpc.aio.EOF:
            rest.append(r)
        code = await self.call.code()
        assert code == grpc.StatusCode.OK, f"the stream ended with {code}: {await self.call.details()}"
        return rest

    async def end(self, how: str) -> list[pb.ProcessingResponse]:
        """Half-close and read what is left, or cancel (a reset: nothing is left to read)."""
        if how == "cancel":
            self.call.cancel()
            return []
        await self.call.done_writing()
        return await self.rest()


async def predict(server: EppServer, wire: list[bytes]) -> list[list[str]]:
    """The kinds of answer each message gets, from a PickStream on the server's director; [] for the
    messages after the stream ends. The shadow's exchange is released before the real stream runs."""
    shadow = Exchanges(server.director, None, observer_grace=0.0)
    stream = PickStream(shadow, Handoffs(), server.opts.max_body_bytes)
    out: list[list[str]] = []
    try:
        for data in wire:
            msg = pb.ProcessingRequest.FromString(data)
            kind = msg.WhichOneof("request")
            if stream.ended or msg.observability_mode:
                break  # the processor ends the stream, or hands the rest to an observer and answers no more
            answers = [as_response(a) for a in HANDLERS[kind](stream, msg)] if kind else []
            out.append([a.WhichOneof("response") or "" for a in answers])
    finally:
        stream.close()
    await until(lambda: not shadow.open_exchanges, what="the shadow's exchange to be released")
    return out + [[]] * (len(wire) - len(out))


async def run_pick(server: EppServer, channel: grpc.aio.Channel, sc: PickScenario, wire: list[bytes],
                   expected: list[list[str]]) -> None:
    stream = RawStream(channel)
    key = ""
    pool = server.opts.endpoints
    for i, (data, kinds) in enumerate(zip(wire, expected, strict=True)):
        msg = pb.ProcessingRequest.FromString(data)
        await stream.send(data)
        answers = await stream.read(len(kinds))
        assert [a.WhichOneof("response") for a in answers] == kinds, f"answers to message {i}: {msg}"
        if kind := msg.WhichOneof("request"):
            check_answers(kind, answers, pool)
        key = next((p[1] for a in answers if (p := pick_of(a)) is not None), key)
        if "immediate_response" in kinds:
            assert await stream.rest() == [], "answers after an immediate response"
            break  # epp ended the stream: Envoy sends nothing more
    else:
        if sc.observer and sc.observer.opens == "before-close":
            await run_observer(server, channel, sc.observer, key)  # while the pick stream is open, and idle
        assert await stream.end(sc.ending) == [], "answers after the last message"
    if sc.observer and (sc.observer.opens == "after-close" or not stream.call.done()):
        await run_observer(server, channel, sc.observer, key)
    event(f"picked: {bool(key)}; observer: {sc.observer.names + ', ' + sc.observer.opens if sc.observer else None}")


def finishes(msg: pb.ProcessingRequest) -> bool:
    """Whether this response message ends the response it is about (epp then ends an observer stream)."""
    kind = msg.WhichOneof("request")
    return (kind == "response_trailers" or (kind == "response_headers" and msg.response_headers.end_of_stream)
            or (kind == "response_body" and msg.response_body.end_of_stream))


async def run_observer(server: EppServer, channel: grpc.aio.Channel, ob: Observer, key: str) -> None:
    """An observer stream as Envoy's observability_mode filter drives it; it must be answered nothing.

    epp ends an observer stream at once when it names no exchange it can claim, and once the response
    ends; the client sends only while epp reads (a write after epp ended would fail on the client).
    """
    stream = RawStream(channel)
    names = {"pick": key, "unknown": "feedbeef-1", "none": ""}[ob.names]
    headers = {EXCHANGE_HEADER: names} if names else {":path": "/v1/completions"}
    ex = server.exchanges.open_exchanges.get(names)
    await stream.send(pb.ProcessingRequest(observability_mode=True, request_headers=pb.HttpHeaders(
        headers=header_map(headers, raw=True))).SerializeToString())
    await until(lambda: (ex is not None and ex.observed) or stream.call.done(), what="epp to claim or refuse")
    if stream.call.done():
        assert await stream.rest() == [], "epp answered an observer stream"
        return
    for m in ob.msgs:
        await stream.send(m.SerializeToString())
        if finishes(m):
            assert await stream.rest() == [], "epp answered an observer stream"
            return
    assert await stream.end(ob.ending) == [], "epp answered an observer stream"


@pytest.fixture
async def fuzzed(start_epp: StartEpp) -> AsyncIterator[tuple[EppServer, grpc.aio.Channel]]:
    """One epp for every example of a test (its state carries over, as a long-running server's does)."""
    server = await start_epp(observer_grace=GRACE)  # the default pool: nothing listens, scrapes fail
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.opts.grpc_port}")
    yield server, channel
    await channel.close()


@fuzz_settings(120)
@given(scs=scenarios())
async def test_any_streams_over_grpc_are_answered_validly_and_release_every_exchange(
        fuzzed: tuple[EppServer, grpc.aio.Channel], scs: list[PickScenario]) -> None:
    server, channel = fuzzed
    wires = [sc.wire(server.opts.endpoints) for sc in scs]
    expected = [await predict(server, wire) for wire in wires]
    await asyncio.gather(*(run_pick(server, channel, sc, wire, exp)
                           for sc, wire, exp in zip(scs, wires, expected, strict=True)))
    await until(lambda: not server.exchanges.open_exchanges, timeout=GRACE + 3, what="every exchange to be released")
    inflight = {ep.hostport: ep.inflight for ep in server.datastore.all_endpoints()}
    assert all(n == 0 for n in inflight.values()), f"in-flight counts after every stream ended: {inflight}"
