"""KV-cache events from model servers (vLLM's wire format) and the exact block index they feed."""
