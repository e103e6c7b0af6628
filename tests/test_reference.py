"""The `torch` backend is the loss docs/design.md §1 defines: checked against F.cross_entropy on logits
built from the textbook formulas, and by gradcheck in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf

from helpers import make_inputs

S = 64.0

TEXTBOOK = {
    "cosface": lambda c: c - 0.35,
    "arcface": lambda c: torch.cos(torch.acos(c) + 0.5),
    "sphereface": lambda c: (
        (1 - 2 * (torch.floor(1.7 * torch.acos(c) / math.pi) % 2)) * torch.cos(1.7 * torch.acos(c))
        - 2 * torch.floor(1.7 * torch.acos(c) / math.pi)
    ),
    "expface": lambda c: torch.cos(math.pi * (torch.acos(c) / math.pi) ** 0.7),
    "combined": lambda c: torch.cos(torch.acos(c) + 0.3) - 0.2,
}
"""f(c) for each margin name with its literature defaults, written out independently."""


def textbook_loss(x, w, y, f, *, margin_grad, reduction="mean", label_smoothing=0.0, ignore_index=-100):
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(y.clamp(min=0), w.shape[0]).to(cos.dtype)
    if margin_grad == "exact":
        logits = S * (cos * (1 - onehot) + f(cos) * onehot)
    else:
        logits = S * (cos + onehot * (f(cos) - cos).detach())
    return F.cross_entropy(
        logits, y, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )


def loss_and_grads(fn, x, w):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w)
    upstream = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    gx, gw = torch.autograd.grad(loss, (x, w), upstream)
    return loss.detach(), gx, gw


@pytest.mark.parametrize("name", list(TEXTBOOK))
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_equals_cross_entropy_on_textbook_margin_logits(name, margin_grad, reduction, label_smoothing):
    x, w, y = make_inputs(12, 23, 10, ignored=3, seed=1)
    options = dict(margin_grad=margin_grad, reduction=reduction, label_smoothing=label_smoothing)
    expected = loss_and_grads(lambda a, b: textbook_loss(a, b, y, TEXTBOOK[name], **options), x, w)
    actual = loss_and_grads(
        lambda a, b: mf.margin_cross_entropy(a, b, y, name, scale=S, backend="torch", **options), x, w
    )
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_detached_and_exact_differ_where_the_margin_is_not_a_shift():
    x, w, y = make_inputs(6, 9, 8, seed=2)
    _, gx_detached, _ = loss_and_grads(lambda a, b: mf.margin_cross_entropy(a, b, y, "arcface"), x, w)
    _, gx_exact, _ = loss_and_grads(
        lambda a, b: mf.margin_cross_entropy(a, b, y, "arcface", margin_grad="exact"), x, w
    )
    assert (gx_detached - gx_exact).abs().max() > 1e-3


def targets_past_the_arcface_threshold(x, w, y):
    """Put half the rows near the opposite of their centre, c ≈ −0.95 (past θ > π − m)."""
    x = x.clone()
    half = x.shape[0] // 2
    x[:half] = -F.normalize(w[y[:half].clamp(min=0)], dim=1) + 0.15 * F.normalize(x[:half], dim=1)
    return x


GRADCHECK_MARGINS = [
    mf.CosFace(),
    mf.ArcFace(),
    mf.ArcFace(fallback="linear"),
    mf.ArcFace(fallback="easy"),
    mf.SphereFace(),
    mf.ExpFace(),
    mf.CombinedMargin(),
]


@pytest.mark.parametrize("margin", GRADCHECK_MARGINS, ids=repr)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_exact_mode(margin, reduction):
    x, w, y = make_inputs(8, 11, 6, ignored=1, seed=4)
    x = targets_past_the_arcface_threshold(x, w, y)
    fn = lambda a, b: mf.margin_cross_entropy(  # noqa: E731
        a, b, y, margin, scale=S, margin_grad="exact", reduction=reduction, label_smoothing=0.1
    )
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_detached_mode_where_it_is_the_true_gradient(reduction):
    # Detached mode passes s·dc through the margin: the true gradient exactly when f′ = 1,
    # i.e. CosFace, and ArcFace where the "easy" fallback makes f(c) = c.
    x, w, y = make_inputs(8, 11, 6, ignored=1, seed=5)
    for margin in (mf.CosFace(), mf.CosFace(m=0.0)):
        fn = lambda a, b: mf.margin_cross_entropy(a, b, y, margin, reduction=reduction)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("margin", GRADCHECK_MARGINS, ids=repr)
def test_detached_gradient_is_the_gradient_with_the_margin_frozen(margin):
    # Detached mode = the exact gradient of the loss whose target offset f(c) − c is a constant.
    x, w, y = make_inputs(8, 11, 6, ignored=1, seed=6)
    x = targets_past_the_arcface_threshold(x, w, y)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    target = y.clamp(min=0)
    c_y = cos.gather(1, target[:, None]).squeeze(1)
    offset = (margin(c_y) - c_y).detach()

    def frozen(a, b):
        c = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
        shifted = c.scatter_add(1, target[:, None], offset[:, None])
        return F.cross_entropy(S * shifted, y, reduction="sum")

    assert torch.autograd.gradcheck(frozen, (x.clone().requires_grad_(), w.clone().requires_grad_()), fast_mode=True)
    expected = loss_and_grads(frozen, x, w)
    actual = loss_and_grads(lambda a, b: mf.margin_cross_entropy(a, b, y, margin, reduction="sum"), x, w)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_mean_is_over_rows_not_ignored():
    x, w, y = make_inputs(10, 7, 5, ignored=4, seed=7)
    rows = mf.margin_cross_entropy(x, w, y, reduction="none")
    ignored = y == -100
    assert (rows[ignored] == 0).all() and (rows[~ignored] > 0).all()
    torch.testing.assert_close(mf.margin_cross_entropy(x, w, y), rows.sum() / 6)
    torch.testing.assert_close(mf.margin_cross_entropy(x, w, y, reduction="sum"), rows.sum())


def test_a_custom_ignore_index():
    x, w, y = make_inputs(6, 7, 5, seed=8)
    y[:2] = 3
    rows = mf.margin_cross_entropy(x, w, y, ignore_index=3, reduction="none")
    assert (rows[:2] == 0).all() and (rows[y != 3] > 0).all()


def test_every_row_ignored_gives_nan_mean_zero_sum_and_zero_gradients():
    x, w, y = make_inputs(4, 7, 5, seed=9)
    y[:] = -100
    for reduction, check in (("mean", torch.isnan), ("sum", lambda v: v == 0)):
        loss, gx, gw = loss_and_grads(lambda a, b: mf.margin_cross_entropy(a, b, y, reduction=reduction), x, w)
        assert check(loss)
        assert F.cross_entropy(torch.zeros(4, 7), y, reduction=reduction).isnan() == loss.isnan()
    _, gx, gw = loss_and_grads(lambda a, b: mf.margin_cross_entropy(a, b, y, reduction="sum"), x, w)
    assert (gx == 0).all() and (gw == 0).all()


def test_accuracy_counts_rows_nearest_their_centre():
    x, w, y = make_inputs(8, 5, 6, seed=10)
    y[:] = torch.tensor([0, 1, 2, 3, 4, 0, -100, -100])
    x[:3] = w[y[:3]] * 2.0  # exactly on their centres: predicted right
    x[3:6] = w[(y[3:6] + 1) % 5]  # on another class's centre: predicted wrong
    _, accuracy = mf.margin_cross_entropy(x, w, y, return_accuracy=True)
    assert accuracy.dtype == torch.float32
    assert accuracy.item() == pytest.approx(3 / 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_loss_dtype_and_gradient_dtypes(dtype):
    x, w, y = make_inputs(5, 9, 8, seed=11)
    x = x.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    loss = mf.margin_cross_entropy(x, w, y)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.05), (torch.bfloat16, 0.3), (torch.float32, 1e-4)])
def test_low_precision_is_close_to_float64(dtype, tolerance):
    x, w, y = make_inputs(16, 40, 32, seed=12)
    truth = mf.margin_cross_entropy(x, w, y)
    assert abs(mf.margin_cross_entropy(x.to(dtype), w.to(dtype), y).item() - truth.item()) < tolerance


@pytest.mark.parametrize("grad_on", ["embeddings", "weight"])
def test_gradients_flow_when_only_one_input_requires_them(grad_on):
    x, w, y = make_inputs(5, 9, 8, seed=13)
    leaf = x if grad_on == "embeddings" else w
    leaf.requires_grad_()
    mf.margin_cross_entropy(x, w, y).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_integer_labels_of_any_width():
    x, w, y = make_inputs(5, 9, 8, seed=14)
    assert mf.margin_cross_entropy(x, w, y.int()).item() == mf.margin_cross_entropy(x, w, y).item()


def test_cosines_are_clamped_in_value_but_pass_the_gradient():
    # in float32, an embedding exactly on (or opposite) its centre rounds to |c| > 1 for many rows
    from marginfused.backends.torch import cosines

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    x = torch.cat([w[:32], -w[32:]]).requires_grad_()
    raw = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).diagonal()
    assert (raw.abs() > 1).any()
    cos = cosines(x, w)
    assert cos.abs().max() <= 1.0
    cos.diagonal().sum().backward()
    (unclamped,) = torch.autograd.grad(raw.sum(), x)
    torch.testing.assert_close(x.grad, unclamped)
