"""Benchmark harness and per-op benchmark suites (used by `benchmarks/` and `peftkern bench`)."""
