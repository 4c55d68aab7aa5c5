"""Benchmark engine (installed as olmo2_fast.benchmarks)."""
