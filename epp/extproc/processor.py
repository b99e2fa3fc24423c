"""The ext_proc ExternalProcessor service: one bidirectional stream per HTTP request.

A pick stream is a `PickStream` (epp.extproc.stream) fed message by message. An
observer stream (a second ext_proc filter in `observability_mode`, the shipped
layout) watches a response without being waited on: Envoy sends and expects no
answer; it names the exchange by the `x-epp-request-id` header the pick set.
Either way the request counts as finished exactly once: when the response ends,
when its stream ends early (client gone, upstream reset), or, for a pick no
stream watches, `observer_grace` seconds after the pick stream closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.exchanges import Exchanges
from epp.extproc.stream import HANDLERS, Answer, PickStream, headers_of, served_endpoint
from epp.handoff import Handoffs
from epp.protocol import EXCHANGE_HEADER

log = logging.getLogger(__name__)

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def _serialize(msg: Answer) -> bytes:
    return msg if type(msg) is bytes else msg.SerializeToString()  # type: ignore[union-attr]


class ExternalProcessor:
    """Serves envoy.service.ext_proc.v3.ExternalProcessor/Process."""

    def __init__(self, exchanges: Exchanges, handoffs: Handoffs | None = None, *,
                 max_body_bytes: int = 16 << 20) -> None:
        self.exchanges = exchanges
        self.handoffs = handoffs if handoffs is not None else Handoffs()
        self.max_body_bytes = max_body_bytes

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.process,
            request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=_serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})

    async def process(self, requests: AsyncIterator[pb.ProcessingRequest], context: Any) -> AsyncIterator[Answer]:
        stream = PickStream(self.exchanges, self.handoffs, self.max_body_bytes)
        try:
            async for msg in requests:
                if msg.observability_mode:
                    await self._observe(msg, requests)
                    return
                handler = HANDLERS.get(msg.WhichOneof("request") or "")
                if handler is None:
                    continue
                answers = handler(stream, msg)
                pending = stream.take_pending()
                if pending is not None:  # the pick waits in flow control; cancelled if the stream is
                    for answer in await pending:
                        yield answer
                    if stream.ended:
                        return
                for answer in answers:
                    yield answer
                if stream.ended:
                    return
        finally:
            stream.close()

    async def _observe(self, first: pb.ProcessingRequest, requests: AsyncIterator[pb.ProcessingRequest]) -> None:
        """An observer stream: Envoy sends without waiting, so nothing is answered."""
        xs = self.exchanges
        key = headers_of(first.request_headers).get(EXCHANGE_HEADER) if first.HasField("request_headers") else None
        ex = xs.claim(key)
        if ex is None:
            # Another replica's pick, one already released, or no pick at all: ending the stream
            # tells Envoy to send nothing more.
            log.debug("observer stream for unknown exchange %r", key)
            return
        try:
            async for msg in requests:
                kind = msg.WhichOneof("request")
                if kind == "response_headers":
                    h = headers_of(msg.response_headers)
                    # An observer cannot change the response: plugins' headers are not sent from here.
                    xs.response_headers(ex, h.get(":status", ""), h.get("content-type", ""),
                                        msg.response_headers.end_of_stream, served_endpoint(msg, h))
                elif kind == "response_body":
                    xs.response_body(ex, msg.response_body.body, msg.response_body.end_of_stream)
                elif kind == "response_trailers":
                    xs.finish(ex)
                if ex.done:
                    return
        finally:
            xs.finish(ex)  # a no-op if done; else the stream ended before the response did
