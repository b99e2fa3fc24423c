"""Run a scheduling profile over the candidates: filters, weighted scorers, picker.

The scheduler owns the plugin instances built from the EndpointPickerConfig and
fans the request-lifecycle hooks out to the plugins that implement them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from epp import errors
from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import (
    CycleState,
    EndpointsChanged,
    Filter,
    Picker,
    Plugin,
    PreRequest,
    ResponseComplete,
    ResponseHeaders,
    ResponseStarted,
    SchedulingResult,
    WeightedScorer,
)


@dataclass(slots=True)
class SchedulingProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None

    def run(self, state: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> SchedulingResult:
        endpoints = candidates
        for f in self.filters:
            endpoints = f.filter(state, request, endpoints)
            if not endpoints:
                raise errors.EppError(
                    errors.SERVICE_UNAVAILABLE,
                    f"no endpoint passed filter {f.name!r}",
                    reason="no_endpoint",
                )
        totals = [0.0] * len(endpoints)
        scores: dict[str, list[float]] = {}
        for ws in self.scorers:
            values = ws.scorer.score(state, request, endpoints)
            scores[ws.scorer.name] = values
            w = ws.weight
            for i, v in enumerate(values):
                totals[i] += v * w
        assert self.picker is not None
        targets = self.picker.pick(state, request, endpoints, totals)
        return SchedulingResult(targets, endpoints, scores, totals, self.name)


class Scheduler:
    """Schedules one request at a time; holds no per-request state between calls."""

    def __init__(self, profiles: list[SchedulingProfile], plugins: list[Plugin]) -> None:
        if not profiles:
            raise ValueError("at least one scheduling profile is required")
        self.profiles = profiles
        self.plugins = plugins
        self._pre_request = [p for p in plugins if isinstance(p, PreRequest)]
        self._response_started = [p for p in plugins if isinstance(p, ResponseStarted)]
        self._response_complete = [p for p in plugins if isinstance(p, ResponseComplete)]
        self._endpoints_changed = [p for p in plugins if isinstance(p, EndpointsChanged)]
        self._response_headers = [p for p in plugins if isinstance(p, ResponseHeaders)]

    def schedule(
        self, request: InferenceRequest, candidates: list[Endpoint], now: float, staleness: float
    ) -> tuple[SchedulingResult, CycleState]:
        state = CycleState(now, staleness)
        # single-profile-handler: the first (only) profile decides.
        return self.profiles[0].run(state, request, candidates), state

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        for p in self._pre_request:
            p.pre_request(state, request, result)

    def response_started(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for p in self._response_started:
            p.response_started(request, endpoint)

    def response_headers(self, request: InferenceRequest, endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
        """Headers the plugins add to the response sent to the client (session tokens, ...)."""
        hooks = self._response_headers
        if not hooks:
            return ()
        if len(hooks) == 1:
            return hooks[0].response_headers(request, endpoint)
        return tuple(h for p in hooks for h in p.response_headers(request, endpoint))

    def response_complete(self, request: InferenceRequest, endpoint: Endpoint) -> None:
        for p in self._response_complete:
            p.response_complete(request, endpoint)

    def endpoints_changed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for p in self._endpoints_changed:
            p.endpoints_changed(added, removed)
