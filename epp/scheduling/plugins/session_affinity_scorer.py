"""session-affinity-scorer (llm-d-router): 1 for the server the request's session is pinned to, else 0.

How a session is recognised, and what the response tells the client: `epp.scheduling.sessions`.
"""

from __future__ import annotations

from typing import Any

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import CycleState, Plugin, PreRequest, ResponseHeaders, SchedulingResult, Scorer
from epp.scheduling.params import Params
from epp.scheduling.sessions import SessionAffinity


class SessionAffinityScorer(Scorer, PreRequest, ResponseHeaders):
    type_name = "session-affinity-scorer"

    def __init__(self, name: str = "", *, sessions: SessionAffinity | None = None) -> None:
        super().__init__(name)
        self.sessions = sessions or SessionAffinity()

    @classmethod
    def from_parameters(cls, name: str, params: Params) -> Plugin:
        return cls(name, sessions=SessionAffinity.from_parameters(params))

    def describe(self) -> dict[str, Any]:
        return self.sessions.describe()

    def score(self, state: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        target = self.sessions.choose(state, request, endpoints)
        return [1.0 if ep is target else 0.0 for ep in endpoints]

    def pre_request(self, state: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        self.sessions.commit(state, request, result.endpoint)

    def response_headers(self, request: InferenceRequest, endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
        return self.sessions.response_headers(endpoint)
