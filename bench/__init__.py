"""Benchmarks of marginfused: `python -m bench` (the sweep), `python -m bench.report` (plots) and
the GPU session's stages (`python -m bench.session`, run by bench/gpu_session.sh)."""
