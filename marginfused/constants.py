"""Numerical constants every backend shares, each defined once here.

The Triton kernels import them; the C++/CUDA sources cannot, so csrc/common.h repeats NORM_EPS
and tests/test_constants.py fails when the copy drifts.
"""

NORM_EPS = 1e-12
"""x̂ = x / max(‖x‖, NORM_EPS): F.normalize's default eps, the floor of every row norm."""

DERIVATIVE_EPS = 2.0**-23
"""How far inside ±1 the cosine is clamped before f′ divides by sin θ (the margins' closed forms,
and the autograd slope of a callable margin): one float32 step below 1, exactly representable in
float32 and float64 (θ ≥ 4.9e-4)."""
