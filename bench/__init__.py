"""Benchmarks of marginfused: `python -m bench` (the sweep) and `python -m bench.report` (plots)."""
