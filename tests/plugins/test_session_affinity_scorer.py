"""session-affinity-scorer: 1 for the session's server; the response names it for the client (llm-d-router)."""

import base64

from epp.datastore import Endpoint
from epp.requests import new_request, parse_body
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.session_affinity_scorer import SessionAffinityScorer
from tests.helpers import NOW, cycle_state


def eps() -> list[Endpoint]:
    return [Endpoint("10.0.0.1", 8000, name="vllm-0"), Endpoint("10.0.0.2", 8000, name="vllm-1")]


def req(headers: dict[str, str]):
    return parse_body(new_request("/v1/completions", headers), b'{"model": "m", "prompt": "hi"}')


def token(name: str) -> str:
    return base64.b64encode(name.encode()).decode()


def test_the_token_names_the_server_and_the_response_carries_it() -> None:
    s, e = SessionAffinityScorer(), eps()
    assert s.score(cycle_state(), req({}), e) == [0.0, 0.0]
    assert s.response_headers(req({}), e[1]) == (("x-session-token", token("vllm-1")),)
    assert s.score(cycle_state(), req({"x-session-token": token("vllm-1")}), e) == [0.0, 1.0]


def test_upstreams_namespaced_token_and_garbage() -> None:
    s, e = SessionAffinityScorer(), eps()
    assert s.score(cycle_state(), req({"x-session-token": token("default/vllm-0")}), e) == [1.0, 0.0]
    assert s.score(cycle_state(), req({"x-session-token": "%%%"}), e) == [0.0, 0.0]


def test_session_id_binds_to_the_first_pick_and_expires() -> None:
    p = Params("session-affinity-scorer", {"strategy": "session_id",
                                           "sessionIdConfig": {"evictionTtlSeconds": 60}})
    s, e = SessionAffinityScorer.from_parameters("s", p), eps()
    r = req({"x-session-id": "abc"})
    st = cycle_state()
    assert s.score(st, r, e) == [0.0, 0.0]  # type: ignore[attr-defined]  # unbound
    s.pre_request(st, r, SchedulingResult([e[1]], e))  # type: ignore[attr-defined]
    assert s.score(cycle_state(NOW + 30), req({"x-session-id": "abc"}), e) == [0.0, 1.0]  # type: ignore[attr-defined]
    assert s.response_headers(r, e[1]) == ()  # type: ignore[attr-defined]  # the client owns its id
    assert s.score(cycle_state(NOW + 61), req({"x-session-id": "abc"}), e) == [0.0, 0.0]  # type: ignore[attr-defined]


def test_a_session_moves_only_when_its_server_is_gone() -> None:
    s = SessionAffinityScorer.from_parameters("s", Params("session-affinity-scorer", {"strategy": "session_id"}))
    e = eps()
    st = cycle_state()
    s.pre_request(st, req({"x-session-id": "abc"}), SchedulingResult([e[0]], e))  # type: ignore[attr-defined]
    # The picker chose elsewhere although the bound server was there: the binding stays.
    st = cycle_state()
    r = req({"x-session-id": "abc"})
    s.score(st, r, e)  # type: ignore[attr-defined]
    s.pre_request(st, r, SchedulingResult([e[1]], e))  # type: ignore[attr-defined]
    assert s.score(cycle_state(), req({"x-session-id": "abc"}), e) == [1.0, 0.0]  # type: ignore[attr-defined]
    # Its server left the candidates: the next pick rebinds it.
    st = cycle_state()
    s.score(st, r, e[1:])  # type: ignore[attr-defined]
    s.pre_request(st, r, SchedulingResult([e[1]], e[1:]))  # type: ignore[attr-defined]
    assert s.score(cycle_state(), req({"x-session-id": "abc"}), e) == [0.0, 1.0]  # type: ignore[attr-defined]


def test_custom_headers() -> None:
    s = SessionAffinityScorer.from_parameters("s", Params("session-affinity-scorer", {
        "encodedEndpointHeaderConfig": {"header": "X-Pin"}}))
    assert s.response_headers(req({}), eps()[0]) == (("x-pin", token("vllm-0")),)  # type: ignore[attr-defined]
