"""The ext_proc protocol adapter: Envoy's ExternalProcessor stream in, routing decisions out."""
