"""Benchmarks for bgproxy; run from the repo root with `python -m bench.run`."""
