"""header-based-testing-filter: the conformance tests name the servers in a header."""

from epp.datastore import Endpoint
from epp.requests import new_request, parse_body
from epp.scheduling.plugins.header_based_testing_filter import HeaderBasedTestingFilter
from tests.helpers import cycle_state


def req(value: str | None):
    headers = {} if value is None else {"test-epp-endpoint-selection": value}
    return parse_body(new_request("/v1/completions", headers), b'{"model": "m", "prompt": "hi"}')


def test_keeps_the_listed_servers_in_order_once_each() -> None:
    eps = [Endpoint("10.0.0.1", 8000), Endpoint("10.0.0.2", 8000), Endpoint("::1", 9000)]
    f = HeaderBasedTestingFilter()
    assert f.filter(cycle_state(), req("10.0.0.2, 10.0.0.1:8000,10.0.0.2"), eps) == [eps[1], eps[0]]
    assert f.filter(cycle_state(), req("[::1]:9000"), eps) == [eps[2]]
    assert f.filter(cycle_state(), req("10.0.0.1:1"), eps) == []  # wrong port


def test_without_the_header_nothing_is_kept() -> None:
    assert HeaderBasedTestingFilter().filter(cycle_state(), req(None), [Endpoint("10.0.0.1", 8000)]) == []
