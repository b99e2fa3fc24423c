"""Benchmarks and the model-server simulator they (and the demo and tests) run against."""
