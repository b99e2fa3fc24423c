"""ext_proc messages as Envoy sends them, and streams to send them on, for tests over real gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

MODEL = "m"
FULL = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingMode.BUFFERED


def _header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def headers_msg(path: str = "/v1/completions", *, eos: bool = False, mode: int = BUFFERED,
                subset: list[str] | None = None, extra: dict[str, str] | None = None) -> pb.ProcessingRequest:
    hs = {":path": path, ":method": "GET" if eos else "POST", "content-type": "application/json", **(extra or {})}
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(hs), end_of_stream=eos))
    msg.protocol_config.request_body_mode = mode
    msg.protocol_config.response_body_mode = mode
    if subset is not None:
        ns = msg.metadata_context.filter_metadata["envoy.lb.subset_hint"]
        lv = ns.fields["x-gateway-destination-endpoint-subset"].list_value
        for s in subset:
            lv.values.add().string_value = s
    return msg


def body_msg(data: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_headers_msg(status: int = 200, content_type: str | None = None) -> pb.ProcessingRequest:
    hs = {":status": str(status)} if content_type is None else {":status": str(status), "content-type": content_type}
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=_header_map(hs)))


def response_body_msg(data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


def completion(prompt: str = "hello " * 50, model: str = MODEL) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 4})


def set_headers(common: pb.CommonResponse) -> dict[str, str]:
    """The request headers a response sets, by name."""
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def dest_header(common: pb.CommonResponse) -> str:
    return set_headers(common).get("x-gateway-destination-endpoint", "")


def pick_key(common: pb.CommonResponse) -> str:
    """The exchange a pick opened, as the observer filter is told it."""
    return set_headers(common).get("x-epp-request-id", "")


class Stream:
    """One ext_proc stream to epp: messages go out as queued; answers are read when asked for."""

    def __init__(self, server: Any) -> None:
        self._queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

        async def gen():
            while (m := await self._queue.get()) is not None:
                yield m

        self.call = server.stub.Process(gen())

    def send(self, *msgs: pb.ProcessingRequest) -> None:
        for m in msgs:
            self._queue.put_nowait(m)

    async def read(self, n: int = 1, timeout: float = 5.0) -> list[pb.ProcessingResponse]:
        out = []
        for _ in range(n):
            r = await asyncio.wait_for(self.call.read(), timeout)
            assert r is not grpc.aio.EOF, f"epp ended the stream after {len(out)} of {n} answers"
            out.append(r)
        return out

    def close(self) -> None:
        """Half-close, as Envoy does once the request is done."""
        self._queue.put_nowait(None)

    async def rest(self, timeout: float = 5.0) -> list[pb.ProcessingResponse]:
        """Every answer left, until epp ends the stream."""
        out = []
        while (r := await asyncio.wait_for(self.call.read(), timeout)) is not grpc.aio.EOF:
            out.append(r)
        return out


async def exchange(server: Any, msgs: list[pb.ProcessingRequest], n: int) -> list[pb.ProcessingResponse]:
    """Send messages on one stream; collect n responses, then half-close."""
    stream = Stream(server)
    stream.send(*msgs)
    out = await stream.read(n)
    stream.close()
    return out


# --- the observed layout: a second ext_proc filter in observability_mode watches the response ---

def observer_headers(key: str) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(observability_mode=True,
                                request_headers=pb.HttpHeaders(headers=_header_map({"x-epp-request-id": key})))


def observed(msg: pb.ProcessingRequest) -> pb.ProcessingRequest:
    """A copy of `msg` as the observer filter sends it."""
    out = pb.ProcessingRequest()
    out.CopyFrom(msg)
    out.observability_mode = True
    return out


SSE_HEADERS = response_headers_msg(200, "text/event-stream")


class Observer(Stream):
    """An observer stream as Envoy drives it: messages go out, nothing is read back until the end."""

    def send(self, *msgs: pb.ProcessingRequest) -> None:
        super().send(*(observed(m) for m in msgs))

    async def responses(self) -> list[pb.ProcessingResponse]:
        """Everything epp answered, once it ended the stream."""
        return await self.rest()
