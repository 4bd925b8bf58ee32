"""Benchmarks (pytest-benchmark suites) and the regression gate; see bench/README.md."""
