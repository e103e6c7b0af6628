"""Every backend usable here against float64 truth (DESIGN §4's rule) on inputs at the edges."""

import pytest
import torch

import marginfused as mf
from marginfused.margins import resolve_margin

from helpers import (
    assert_close, assert_matches_truth, budgets, make_inputs, run, skip_unless_supported, usable_backends,
)

BACKENDS = usable_backends()


def slack_near_plus_minus_one(margin, margin_grad: str, scale: float = 64.0) -> float:
    """What a correct float32 computation may add to the error at cosines within a few float32
    steps (2⁻²⁴) of ±1, beyond what the reference happens to make there.

    arccos is ill-conditioned at ±1: k steps move θ by ~√(2k·2⁻²⁴), hence the logit s·f by up to
    s·|f(±1) − f(±(1 − 4·2⁻²⁴))|. And where the projection through the normalisation cancels a
    gradient of size s·f′ (f′ clamped to ~1e3 at ±1 in exact mode), float32 leaves ~2⁻²⁰ of it.
    """
    ends = torch.tensor([1.0, -1.0], dtype=torch.float64)
    value = scale * (margin(ends) - margin(ends * (1 - 4 * 2**-24))).abs().max().item()
    slope = margin.derivative(ends).abs().max().item() if margin_grad == "exact" else 1.0
    return value + 2**-20 * scale * slope


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_zero_norm_embedding_and_class_centre_rows(backend, margin_grad):
    x, w, y = make_inputs(6, 9, 8, seed=1)
    x[0] = 0.0
    w[3] = 0.0
    y[1] = 3
    # a zero row's gradient is g / 1e-12 (F.normalize's eps): ~1e12, where one float32 step is ~1e5
    truth = run("torch", x, w, y, margin_grad=margin_grad)
    largest = max(truth.grad_embeddings.abs().max().item(), truth.grad_weight.abs().max().item())
    assert_matches_truth(backend, x, w, y, torch.float32, slack=4 * 2**-24 * largest, margin_grad=margin_grad)


@pytest.mark.parametrize("margin", ["arcface", "sphereface", "expface", "combined"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=1", "cos=-1"])
def test_rows_on_or_opposite_their_centre_in_exact_mode(backend, margin, sign):
    x, w, y = make_inputs(6, 9, 8, seed=2)
    x[:4] = sign * 3.0 * w[y[:4]]
    slack = slack_near_plus_minus_one(resolve_margin(margin), "exact")
    assert_matches_truth(backend, x, w, y, torch.float32, slack=slack, margin=margin, margin_grad="exact")


def test_fp16_inputs_at_scale_64(backend):
    x, w, y = make_inputs(8, 40, 16, seed=3)
    x[:2] = w[y[:2]]  # target logits of s·f(1) ≈ 56: exp(56) overflows fp16
    skip_unless_supported(backend, x.half(), w.half())
    assert_matches_truth(backend, x, w, y, torch.float16, scale=64.0)


@pytest.mark.parametrize("norm", [1e-4, 1e4])
def test_huge_and_tiny_norms(backend, norm):
    x, w, y = make_inputs(6, 9, 8, seed=4)
    assert_matches_truth(backend, x * norm, w * norm, y, torch.float32)


@pytest.mark.parametrize("batch, classes", [(1, 9), (6, 1), (1, 1)])
def test_a_single_row_or_class(backend, batch, classes):
    x, w, y = make_inputs(batch, classes, 8, seed=5)
    for reduction in ("mean", "none"):
        assert_matches_truth(backend, x, w, y, torch.float32, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored(backend, reduction):
    x, w, y = make_inputs(5, 9, 8, seed=6)
    y[:] = -100
    outcome = run(backend, x.float(), w.float(), y, reduction=reduction)
    expected = {"mean": torch.tensor(float("nan")), "sum": torch.tensor(0.0), "none": torch.zeros(5)}[reduction]
    assert_close("loss", outcome.loss, expected.double(), 0.0)
    if reduction != "mean":  # the mean's NaN would poison every gradient
        assert (outcome.grad_embeddings == 0).all() and (outcome.grad_weight == 0).all()


def column_major(t):
    """(rows, cols) with column-major strides."""
    return t.T.contiguous().T


def every_other_column(t):
    """A non-contiguous view: the even columns of a matrix twice as wide."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


@pytest.mark.parametrize("layout", [column_major, every_other_column], ids=["column-major", "strided"])
def test_transposed_and_strided_inputs(backend, layout):
    x, w, y = make_inputs(6, 9, 16, seed=7)
    assert not layout(x).is_contiguous()
    # another layout may take another BLAS path, so it is held to the truth, not to the contiguous run
    assert_matches_truth(backend, x, w, y, torch.float32, layout=layout)


@pytest.mark.parametrize("only", ["embeddings", "weight"])
def test_gradient_for_only_one_input(backend, only):
    x, w, y = make_inputs(6, 9, 8, seed=8)
    truth, limits = budgets(x, w, y, torch.float32)
    x, w = x.float(), w.float()
    leaf = x if only == "embeddings" else w
    leaf.requires_grad_()
    mf.margin_cross_entropy(x, w, y, backend=backend).backward()
    assert (x.grad is None) == (only != "embeddings") and (w.grad is None) == (only != "weight")
    field = f"grad_{only}"
    assert_close(f"{only} grad", leaf.grad.double(), getattr(truth, field), limits[field])


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_one_dimensional_embeddings(backend, margin_grad):
    # D = 1: every cosine is ±1, and the true gradients are exactly 0 (the normalisation's
    # projection removes all of them)
    x, w, y = make_inputs(7, 5, 1, seed=9)
    slack = slack_near_plus_minus_one(mf.ArcFace(), margin_grad)
    assert_matches_truth(backend, x, w, y, torch.float32, slack=slack, margin=mf.ArcFace(), margin_grad=margin_grad)
