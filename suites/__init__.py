"""Benchmark definitions: detection models, synthetic data and the suites built on them."""
