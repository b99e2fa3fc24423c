"""destination-endpoint-served-verifier: the conformance header names the endpoint the proxy served."""

from epp.scheduling.plugins.destination_endpoint_served_verifier import DestinationEndpointServedVerifier
from tests.helpers import endpoint, request


def test_reports_the_served_endpoint_or_why_not() -> None:
    v, r = DestinationEndpointServedVerifier(), request()
    assert v.response_headers(r, endpoint(1)) == (
        ("x-conformance-test-served-endpoint", "fail: missing destination endpoint served metadata"),)
    r.served_endpoint = "10.0.0.1:1"
    assert v.response_headers(r, endpoint(1)) == (("x-conformance-test-served-endpoint", "10.0.0.1:1"),)
