"""Body-based routing: the request's model, from its JSON body, as headers routes can match.

An ext_proc service that runs before Envoy picks a route, as upstream's BBR (GIE's
body-based-routing chart): it reads the body, sets `X-Gateway-Model-Name` to its
`model` and `X-Gateway-Base-Model-Name` to that model's base (the bbr-managed
ConfigMaps map each LoRA adapter to its base model; epp.gateway.base_models), and
asks Envoy to clear its route cache, so the route is chosen again with the headers
set. The body goes on unchanged.

Body modes: FULL_DUPLEX_STREAMED (upstream's `--streaming`, what `epp gateway` uses:
the body comes in chunks, the headers wait, and the answer carries headers and then
the body back) and BUFFERED (one body message; the headers ride on its answer).
Errors as upstream: a body that is not JSON gets 400, with an OpenAI-style error.

`epp bbr` runs it alone, for any Envoy (upstream's flags: --grpc-port 9004,
--grpc-health-port 9005, --streaming, --secure-serving).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from epp import errors
from epp.extproc import responses as R
from epp.extproc.processor import SERVICE
from epp.gateway.base_models import BaseModels

log = logging.getLogger(__name__)

MODEL_HEADER = "X-Gateway-Model-Name"
BASE_MODEL_HEADER = "X-Gateway-Base-Model-Name"
FULL_DUPLEX = pm.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = pm.ProcessingMode.BUFFERED
BUFFERED_PARTIAL = pm.ProcessingMode.BUFFERED_PARTIAL
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key.lower(), raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def routing_headers(body: bytes, base_models: BaseModels) -> dict[str, str]:
    """The headers the body asks for; EppError (400) when it is not a JSON object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise errors.bad_request(f"failed to parse request body: {e}") from None
    if not isinstance(doc, dict) or "model" not in doc:
        return {}
    model = doc["model"]
    text = model if isinstance(model, str) else orjson.dumps(model).decode()
    out = {BASE_MODEL_HEADER: base_models.base_of(text)}
    if text:
        out[MODEL_HEADER] = text
    return out


class BodyBasedRouter:
    """Serves envoy.service.ext_proc.v3.ExternalProcessor/Process for body-based routing."""

    def __init__(self, base_models: BaseModels | None = None, *, streaming: bool = True,
                 max_body_bytes: int = 16 << 20) -> None:
        self.base_models = base_models or BaseModels()  # replaced whole when the mapping changes
        self.streaming = streaming  # the mode assumed when Envoy does not say (protocol_config)
        self.max_body_bytes = max_body_bytes
        self._warned_streamed = False

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.process, request_deserializer=pb.ProcessingRequest.FromString,
            response_serializer=lambda m: m if type(m) is bytes else m.SerializeToString())
        return grpc.method_handlers_generic_handler(SERVICE, {"Process": method})

    async def process(self, requests: AsyncIterator[pb.ProcessingRequest], context: Any) -> AsyncIterator[Any]:
        mode = FULL_DUPLEX if self.streaming else BUFFERED
        body = bytearray()
        answered = False
        async for msg in requests:
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                if msg.HasField("protocol_config"):
                    mode = msg.protocol_config.request_body_mode
                if msg.request_headers.end_of_stream:
                    answered = True
                    yield R.CONTINUE_REQUEST_HEADERS  # no body, nothing to route on
                elif mode != FULL_DUPLEX:
                    yield R.CONTINUE_REQUEST_HEADERS
            elif kind == "request_body":
                chunk, eos = msg.request_body.body, msg.request_body.end_of_stream
                if answered:  # more body after the answer: pass it on
                    if mode == FULL_DUPLEX:
                        for r in R.streamed_body(chunk, request=True, end_of_stream=eos):
                            yield r
                    else:
                        yield R.CONTINUE_REQUEST_BODY
                    continue
                if mode not in (FULL_DUPLEX, BUFFERED, BUFFERED_PARTIAL):
                    # STREAMED: the headers went on before the body came; nothing can be set on them now.
                    if not self._warned_streamed:
                        self._warned_streamed = True
                        log.warning("body-based routing needs request_body_mode FULL_DUPLEX_STREAMED or BUFFERED; "
                                    "requests in STREAMED mode pass without routing headers")
                    yield R.CONTINUE_REQUEST_BODY
                    continue
                body += chunk
                if len(body) > self.max_body_bytes:
                    yield R.immediate(errors.EppError(errors.BAD_REQUEST, f"request body exceeds the limit of "
                                                      f"{self.max_body_bytes} bytes", reason="request_too_large"))
                    return
                if mode == FULL_DUPLEX and not eos:
                    continue
                answered = True
                for r in self._answer(bytes(body), mode, end_of_stream=eos):
                    yield r
            elif kind == "request_trailers":
                if not answered and mode == FULL_DUPLEX:  # the body ended with trailers
                    answered = True
                    for r in self._answer(bytes(body), mode, end_of_stream=False):
                        yield r
                yield R.CONTINUE_REQUEST_TRAILERS
            elif kind == "response_headers":
                yield R.CONTINUE_RESPONSE_HEADERS
            elif kind == "response_body":
                yield R.CONTINUE_RESPONSE_BODY
            elif kind == "response_trailers":
                yield R.CONTINUE_RESPONSE_TRAILERS

    def _answer(self, body: bytes, mode: int, *, end_of_stream: bool) -> list[Any]:
        try:
            headers = routing_headers(body, self.base_models)
        except errors.EppError as e:
            return [R.immediate(e)]
        set_headers = [_header(k, v) for k, v in headers.items()]
        if mode == FULL_DUPLEX:
            # The body goes back in chunks after the headers: say how long it is.
            set_headers.append(_header("content-length", str(len(body))))
            common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=set_headers),
                                       clear_route_cache=True)
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common)),
                    *R.streamed_body(body, request=True, end_of_stream=end_of_stream)]
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=set_headers), clear_route_cache=True)
        return [pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))]


class BbrServer:
    """`epp bbr`: the router alone, with gRPC health, for an Envoy configured by hand."""

    def __init__(self, router: BodyBasedRouter, *, grpc_port: int = 9004, health_port: int = 9005,
                 bind_address: str = "0.0.0.0", secure_serving: bool = True, cert_path: str | None = None) -> None:
        self.router = router
        self.grpc_port, self.health_port, self.bind_address = grpc_port, health_port, bind_address
        self.secure_serving, self.cert_path = secure_serving, cert_path
        self.health = health_aio.HealthServicer()
        self._servers: list[grpc.aio.Server] = []

    async def start(self) -> None:
        from epp import tls

        main = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000)])
        main.add_generic_rpc_handlers((self.router.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, main)
        addr = f"{self.bind_address}:{self.grpc_port}"
        if self.secure_serving:
            bound = main.add_secure_port(addr, tls.serving_tls(self.cert_path).credentials)
        else:
            bound = main.add_insecure_port(addr)
        if not bound:
            raise OSError(f"cannot listen on {addr}")
        self._servers.append(main)
        if self.health_port and self.health_port != self.grpc_port:
            hs = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, hs)
            if not hs.add_insecure_port(f"{self.bind_address}:{self.health_port}"):
                raise OSError(f"cannot listen on {self.bind_address}:{self.health_port}")
            self._servers.append(hs)
        for name in ("", SERVICE, "liveness", "readiness"):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for s in self._servers:
            await s.start()
        log.info("bbr serving ext_proc on :%d (%s), health on :%d; %d models mapped to base models",
                 self.grpc_port, "TLS" if self.secure_serving else "plaintext", self.health_port,
                 len(self.router.base_models))

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", SERVICE, "readiness"):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.gather(*(s.stop(grace) for s in self._servers))

    async def wait(self) -> None:
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))

