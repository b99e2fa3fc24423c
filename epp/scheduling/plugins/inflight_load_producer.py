"""inflight-load-producer: the requests and prompt tokens epp has in flight to each server.

Requests are the director's exact in-flight count (+1 when a pick is sent, -1 when its response
ends). Tokens, as upstream counts them: the prompt tokens each request must compute on its
server (its estimated tokens minus the prefix the server holds, from an
`approx-prefix-cache-producer` when the config has one), released at the response's first byte,
since prefill is then done. With `addEstimatedOutputTokens`, an output estimate
(`outputRatio` x input, capped by the request's max tokens and `maxEstimatedOutputTokens`) is
added and everything is held until the response ends.

`active-request-scorer`, `token-load-scorer`, `concurrency-detector`, `utilization-filter` and
`prefix-cache-affinity-filter` read it; one is created with these defaults when a config names
none.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    Binder,
    CycleState,
    EndpointsChanged,
    Lookup,
    Plugin,
    PreRequest,
    ResponseComplete,
    ResponseStarted,
    SchedulingResult,
)
from epp.scheduling.params import Params
from epp.scheduling.plugins.approx_prefix_cache_producer import (
    AVERAGE_CHARS_PER_TOKEN,
    ApproxPrefixCacheProducer,
)

DEFAULT_OUTPUT_RATIO = 1.5


def input_tokens(request: InferenceRequest) -> int:
    """The prompt's tokens, estimated at 4 characters each (upstream's tokenizer-free estimate)."""
    return len(request.prompt) // AVERAGE_CHARS_PER_TOKEN


class InFlightLoadProducer(Plugin, PreRequest, ResponseStarted, ResponseComplete, EndpointsChanged):
    type_name = "inflight-load-producer"

    def __init__(self, name: str = "", *, add_output_tokens: bool = False,
                 output_ratio: float = DEFAULT_OUTPUT_RATIO, max_output_tokens: int | None = None,
                 prefix_producer: str = "") -> None:
        super().__init__(name)
        self.add_output_tokens = add_output_tokens
        self.output_ratio = output_ratio
        self.max_output_tokens = max_output_tokens
        self._prefix_name = prefix_producer
        self.prefix: ApproxPrefixCacheProducer | None = None
        self._tokens: dict[str, int] = {}  # hostport -> tokens in flight
        # id(request) -> [hostport, tokens still counted]
        self._pending: dict[int, list[Any]] = {}
        self._uncached_key = object()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        add = params.bool("addEstimatedOutputTokens", False)
        ratio = params.float("outputRatio", DEFAULT_OUTPUT_RATIO, minimum=0.0)
        cap = params.optional_int("maxEstimatedOutputTokens", minimum=0)
        prefix = params.str("prefixMatchInfoProducerName", "", empty=True)
        # Upstream shares the load across replicas only through a cross-replica syncer, which epp
        # does not have (a config naming one is refused); without one upstream keeps it local too.
        params.bool("syncCrossReplicaState", True)
        params.done()
        return cls(name, add_output_tokens=add, output_ratio=ratio, max_output_tokens=cap, prefix_producer=prefix)

    def bind(self, lookup: Lookup) -> None:
        if self._prefix_name:
            found = lookup(self._prefix_name)
            if not isinstance(found, ApproxPrefixCacheProducer):
                raise ConfigError(f"{self.name}: prefixMatchInfoProducerName {self._prefix_name!r} names no "
                                  "approx-prefix-cache-producer")
            self.prefix = found
        elif isinstance(lookup, Binder):
            # Optional upstream: the config's prefix producer if it has one, none created for this.
            self.prefix = lookup.find(ApproxPrefixCacheProducer)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"addEstimatedOutputTokens": self.add_output_tokens}
        if self.add_output_tokens:
            out["outputRatio"] = self.output_ratio
            if self.max_output_tokens is not None:
                out["maxEstimatedOutputTokens"] = self.max_output_tokens
        if self.prefix is not None:
            out["prefixMatchInfoProducerName"] = self.prefix.name
        return out

    # --- what consumers read -------------------------------------------------------------
    @staticmethod
    def requests(ep: Endpoint) -> int:
        return ep.inflight

    def tokens(self, ep: Endpoint) -> int:
        return self._tokens.get(ep.hostport, 0)

    def uncached(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[int]:
        """The tokens this request would add on each endpoint (its uncached prompt, plus the output
        estimate when counted); computed once per cycle."""
        cached = state.data.get(self._uncached_key)
        if cached is not None and cached[0] is endpoints:
            return cached[1]
        tokens = input_tokens(request)
        out = [self._cost(state, request, ep, tokens, endpoints) for ep in endpoints]
        state.data[self._uncached_key] = (endpoints, out)
        return out

    def _cost(self, state: CycleState, request: InferenceRequest, ep: Endpoint, tokens: int,
              endpoints: list[Endpoint]) -> int:
        cost = tokens
        prefix = self.prefix
        if prefix is not None and tokens:
            total = len(prefix.hashes(state, request))
            matched = prefix.matched_blocks(state, request, endpoints).get(ep.hostport, 0)
            indexed = min(tokens, total * prefix.block_tokens)  # the last block may be partial
            cost = max(0, indexed - matched * prefix.block_tokens) + tokens - indexed
        if self.add_output_tokens and tokens:
            out = round(tokens * self.output_ratio)
            if request.max_tokens is not None:
                out = min(out, request.max_tokens)
            if self.max_output_tokens is not None:
                out = min(out, self.max_output_tokens)
            cost += out
        return cost

    # --- request lifecycle ---------------------------------------------------------------
    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        ep = result.endpoint
        candidates = result.candidates or [ep]
        tokens = (self.uncached(state, request, candidates)[candidates.index(ep)] if ep in candidates
                  else self._cost(state, request, ep, input_tokens(request), candidates))
        if tokens <= 0:
            return
        self._pending[id(request)] = [ep.hostport, tokens]
        self._tokens[ep.hostport] = self._tokens.get(ep.hostport, 0) + tokens

    def _release(self, request: InferenceRequest) -> None:
        entry = self._pending.pop(id(request), None)
        if entry is None:
            return
        hostport, tokens = entry
        left = self._tokens.get(hostport, 0) - tokens
        if left > 0:
            self._tokens[hostport] = left
        else:
            self._tokens.pop(hostport, None)

    def response_started(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        if not self.add_output_tokens:
            self._release(request)  # prefill is done: its prompt tokens no longer wait

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        self._release(request)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for ep in removed:
            self._tokens.pop(ep.hostport, None)
