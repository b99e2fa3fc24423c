"""context-length-aware (llm-d-router): route by prompt length to servers labelled for that range.

A server's label (`label`, default `llm-d.ai/context-length-range`) reads "min-max" in tokens.
Scores: a server whose range holds the request's length scores in (0.3, 1], higher for a
narrower range and for more headroom (0.3 + 0.7 * (0.7 / (1 + width / 10000) + 0.3 * (max -
length) / width); 1 for a zero-width range); out of range, 0.3 / (1 + distance / 1000) by the
distance to the nearest bound; unlabelled 0.5; an unparseable label 0. With `enableFiltering`
it also filters: servers whose range misses the length go (unlabelled ones stay). The length
is the prompt's estimated tokens (4 characters each), as upstream estimates without a tokenizer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Filter, Plugin, Scorer
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import input_tokens

DEFAULT_LABEL = "llm-d.ai/context-length-range"
_FALLBACK = 0.3


@lru_cache(maxsize=256)
def parse_range(text: str) -> tuple[int, int] | None:
    """'0-2048' -> (0, 2048); None for anything else (upstream's format: two integers, min <= max)."""
    low, sep, high = text.partition("-")
    if not sep or "-" in high:
        return None
    try:
        lo, hi = int(low.strip()), int(high.strip())
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None


def range_score(length: int, lo: int, hi: int) -> float:
    if lo <= length <= hi:
        width = hi - lo
        if width == 0:
            return 1.0
        raw = 0.7 * (1.0 / (1.0 + width / 10000.0)) + 0.3 * (hi - length) / width
        return _FALLBACK + raw * (1.0 - _FALLBACK)
    distance = length - hi if length > hi else lo - length
    return _FALLBACK / (1.0 + distance / 1000.0)


class ContextLengthAware(Filter, Scorer):
    type_name = "context-length-aware"

    def __init__(self, name: str = "", *, label: str = DEFAULT_LABEL, enable_filtering: bool = False) -> None:
        super().__init__(name)
        self.label = label
        self.enable_filtering = enable_filtering

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        label = params.str("label", DEFAULT_LABEL)
        filtering = params.bool("enableFiltering", False)
        params.done()
        return cls(name, label=label, enable_filtering=filtering)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "enableFiltering": self.enable_filtering}

    def filter(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if not self.enable_filtering:
            return endpoints
        length = input_tokens(request)
        label = self.label
        out = []
        for ep in endpoints:
            text = ep.labels.get(label)
            if text is None:
                out.append(ep)  # unlabelled servers take any length
                continue
            bounds = parse_range(text)
            if bounds is not None and bounds[0] <= length <= bounds[1]:
                out.append(ep)
        return out

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        length = input_tokens(request)
        label = self.label
        out = []
        for ep in endpoints:
            text = ep.labels.get(label)
            if text is None:
                out.append(0.5)
                continue
            bounds = parse_range(text)
            out.append(0.0 if bounds is None else range_score(length, *bounds))
        return out
