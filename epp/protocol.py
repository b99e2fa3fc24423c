"""The names of the EPP-proxy contract: headers and metadata keys, in one place.

GIE's and llm-d-router's names (both are read where they differ), then epp's own
headers between its pick and the proxy's other filters.
"""

from __future__ import annotations

# The pick: a request header and dynamic metadata (namespace, key) that the proxy routes on.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"
# The HTTP pick's pick and fallbacks, comma-separated (ext_authz cannot set metadata): the header the
# HTTP pick layout's pool cluster retries along. epp's own name; the primary stays in DESTINATION_HEADER.
DESTINATION_LIST_HEADER = "x-epp-destination-endpoints"
# With --emit-endpoint-scores, in the same namespace: each target's score (llm-d-router's key).
DESTINATION_SCORES_KEY = "x-gateway-destination-endpoint-scores"
# The endpoint that served the request, as the model-server side reports it on the response.
DESTINATION_SERVED_HEADER = "x-gateway-destination-endpoint-served"
# The proxy's restriction of the candidates: filter metadata namespace and key (a list of ip:port).
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"

# Request headers a client (or the gateway) sets.
OBJECTIVE_HEADER = "x-gateway-inference-objective"
# The flow to be fair across: llm-d-router's name first, GIE's older one second.
FAIRNESS_ID_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_FAIRNESS_ID = "default-flow"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
REQUEST_ID_HEADER = "x-request-id"

# epp's own headers. The exchange a pick opened, named to the observer filter that watches its response.
EXCHANGE_HEADER = "x-epp-request-id"
# Set with a pick made over HTTP whose body must change (or whose answer is a 5xx): the layout's
# ext_proc filter then runs and epp sends the new body, or the error, there.
HANDOFF_HEADER = "x-epp-rewrite-body"
# With --explain-headers: the pick and each candidate's scores, for debugging.
EXPLAIN_ENDPOINT_HEADER = "x-epp-endpoint"
EXPLAIN_HEADER = "x-epp-explain"
