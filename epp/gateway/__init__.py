"""`epp gateway`: a local inference gateway from Gateway API manifests, Envoy configured over xDS.

manifests/httproute read and check the objects; envoy_config turns them into xDS
resources; xds serves them to Envoy; pickers runs one epp picker per InferencePool;
bbr is body-based routing; runner ties it together and applies edits live.
"""
