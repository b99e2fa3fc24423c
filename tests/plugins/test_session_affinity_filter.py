"""session-affinity-filter: only the session's server when it is a candidate, else all (llm-d-router)."""

import base64

import pytest

from epp.datastore import Endpoint
from epp.errors import ConfigError
from epp.requests import new_request, parse_body
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.session_affinity_filter import SessionAffinityFilter
from tests.helpers import cycle_state


def eps() -> list[Endpoint]:
    return [Endpoint("10.0.0.1", 8000, name="vllm-0"), Endpoint("10.0.0.2", 8000, name="vllm-1")]


def req(headers: dict[str, str]):
    return parse_body(new_request("/v1/completions", headers), b'{"model": "m", "prompt": "hi"}')


def test_pins_to_the_token_server_and_never_empties_the_pool() -> None:
    f, e = SessionAffinityFilter(), eps()
    pinned = {"x-session-token": base64.b64encode(b"vllm-1").decode()}
    assert f.filter(cycle_state(), req(pinned), e) == [e[1]]
    assert f.filter(cycle_state(), req(pinned), e[:1]) == e[:1]  # its server is gone: all candidates
    assert f.filter(cycle_state(), req({}), e) == e


def test_session_id_from_the_first_configured_header() -> None:
    f = SessionAffinityFilter.from_parameters("f", Params("session-affinity-filter", {
        "strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "x-user"}, {"header": "x-chat"}]}}))
    e = eps()
    st, r = cycle_state(), req({"x-chat": "c1"})
    f.pre_request(st, r, SchedulingResult([e[0]], e))  # type: ignore[attr-defined]
    assert f.filter(cycle_state(), req({"x-chat": "c1"}), e) == [e[0]]  # type: ignore[attr-defined]
    assert f.filter(cycle_state(), req({"x-user": "u9", "x-chat": "c1"}), e) == e  # type: ignore[attr-defined]


@pytest.mark.parametrize(("params", "needle"), [
    ({"strategy": "sticky"}, "must be one of"),
    ({"strategy": "session_id", "sessionIdConfig": {"sources": [{"attribute": "SessionID"}]}}, "attributes"),
    ({"strategy": "session_id", "sessionIdConfig": {"sources": [{}]}}, "exactly one of header"),
    ({"profileName": "prefill"}, "disaggregation"),
    ({"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": -1}}, "evictionTtlSeconds"),
])
def test_bad_parameters(params, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        SessionAffinityFilter.from_parameters("f", Params("session-affinity-filter", params))
