"""Benchmarks for forecaster: see benchmarks/README.md."""
