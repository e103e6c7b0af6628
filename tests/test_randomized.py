"""Property-based: every fused backend usable here equals the torch backend (docs/design.md §4's rule) on
drawn shapes, margins, gradient modes, reductions, smoothing and ignore masks."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import marginfused as mf

from helpers import assert_matches_truth

EXAMPLES = {"triton": 25}  # the interpreter runs the kernels in Python: fewer draws
DEFAULT_EXAMPLES = int(os.environ.get("MARGINFUSED_HYPOTHESIS_EXAMPLES", "150"))

MARGINS = st.sampled_from(
    [mf.CosFace(0.35), mf.ArcFace(0.5), mf.ArcFace(0.3, "linear"), mf.ArcFace(0.5, "easy"),
     mf.SphereFace(1.7), mf.SphereFace(4.0), mf.ExpFace(0.7), mf.CombinedMargin(1.0, 0.3, 0.2)]
)


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 24))
    classes = draw(st.integers(1, 70))
    dim = draw(st.integers(2, 40))  # D = 1 (every cosine ±1) is tested in test_contract
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    w = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    ignored = torch.rand(batch, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    y[ignored] = -100
    options = dict(
        margin=draw(MARGINS),
        scale=draw(st.sampled_from([16.0, 30.0, 64.0])),
        margin_grad=draw(st.sampled_from(["detached", "exact"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
    )
    return x, w, y, options


def test_fused_backend_equals_the_reference(backend):
    if backend.name == "torch":
        pytest.skip("the torch backend is the reference")
    device, backend = backend.device, backend.name
    @settings(max_examples=EXAMPLES.get(backend, DEFAULT_EXAMPLES), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problems())
    def check(problem):
        x, w, y, options = problem
        assert_matches_truth(backend, x.to(device), w.to(device), y.to(device), torch.float32, **options)

    check()
