"""destination-endpoint-served-verifier (GIE, llm-d-router; for conformance tests): answer, in the
`x-conformance-test-served-endpoint` response header, the endpoint the proxy reports having sent
the request to (its `x-gateway-destination-endpoint-served` metadata), or why it cannot."""

from __future__ import annotations

from epp.datastore import Endpoint
from epp.requests import InferenceRequest
from epp.scheduling.framework import Plugin, ResponseHeaders

HEADER = "x-conformance-test-served-endpoint"


class DestinationEndpointServedVerifier(Plugin, ResponseHeaders):
    type_name = "destination-endpoint-served-verifier"
    ignores_parameters = True

    def response_headers(self, request: InferenceRequest, endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
        served = request.served_endpoint
        return ((HEADER, served or "fail: missing destination endpoint served metadata"),)
