"""Margins are PyTorch functions of the target cosine (docs/design.md §3.1): a user's own callable
and per-row margin tensors run through every backend, in both gradient modes, and match the
float64 truth by the suite's rule; gradients reach the margin's own tensors."""

import pytest
import torch

import marginfused as mf

from helpers import assert_close, assert_matches_truth, cosine_bound, make_inputs, run, usable_backends

BACKENDS = usable_backends()


def user_margin(c):
    return torch.cos(torch.acos(c) + 0.3) - 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_a_user_defined_margin(backend, margin_grad):
    x, w, y = make_inputs(19, 70, 24, ignored=2, seed=21)
    assert_matches_truth(backend, x, w, y, torch.float32, margin=user_margin, margin_grad=margin_grad,
                         reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_per_row_margin_tensors(backend, margin_grad):
    x, w, y = make_inputs(19, 70, 24, ignored=2, seed=22)
    m = torch.linspace(0.1, 0.6, 19, dtype=torch.float64)
    assert_matches_truth(backend, x, w, y, torch.float32, margin=mf.ArcFace(m.float()), margin_grad=margin_grad)


def test_the_callable_equals_the_built_in_margin_it_writes():
    x, w, y = make_inputs(9, 30, 12, seed=23)
    for mode in ("detached", "exact"):
        built_in = run("torch", x, w, y, margin=mf.CombinedMargin(1.0, 0.3, 0.1), margin_grad=mode)
        callable_ = run("torch", x, w, y, margin=user_margin, margin_grad=mode)
        for field in ("loss", "grad_embeddings", "grad_weight"):
            # two float64 evaluations of the same formula: a few float64 steps of values ≲ 100
            assert_close(field, getattr(callable_, field), getattr(built_in, field), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_a_per_row_margin_tensor(backend):
    """∂L/∂m_i through the target logit: −s·(∂ℓ_i/∂z_iy)·sin(θ + m_i) for ArcFace, the same in
    every backend (the fused ones return ∂L/∂z_iy from their backward)."""
    x, w, y = make_inputs(11, 40, 16, ignored=1, seed=24)
    grads = {}
    for name, dtype in (("torch", torch.float64), (backend, torch.float32)):
        m = torch.full((11,), 0.4, dtype=dtype, requires_grad=True)
        mf.margin_cross_entropy(x.to(dtype), w.to(dtype), y, margin=mf.ArcFace(m), backend=name).backward()
        grads[name] = m.grad.double()
    assert bool((grads["torch"][y != -100] != 0).all())
    # ∂L/∂m_i = (1/n)·(p_iy − 1)·(−s sin(θ_i + m_i)), n the rows not ignored: p carries a relative
    # error ≤ 2δz (tests/helpers.py), θ and sin a few float32 steps; |p|, |sin| ≤ 1
    n = int((y != -100).sum())
    bound = 64.0 / n * (2 * 64.0 * cosine_bound(torch.float32, 16) + 16 * 2**-24)
    assert_close("margin grad", grads[backend], grads["torch"], bound)


def test_a_margin_returning_nan_is_refused():
    x, w, y = make_inputs(5, 9, 8, seed=25)
    with pytest.raises(ValueError, match="must be finite"):
        mf.margin_cross_entropy(x, w, y, margin=lambda c: c * float("nan"))


def test_per_row_tensors_of_the_wrong_length_are_refused():
    x, w, y = make_inputs(5, 9, 8, seed=26)
    with pytest.raises(ValueError, match="margin parameter m must hold one value per row"):
        mf.margin_cross_entropy(x, w, y, margin=mf.ArcFace(torch.full((4,), 0.5, dtype=torch.float64)))
