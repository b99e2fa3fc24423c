"""A vLLM-compatible model-server simulator: OpenAI API, streaming, and vLLM's /metrics names."""
