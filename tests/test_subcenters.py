"""Sub-centre ArcFace: the torch reference against the formula written out as a plain loop, the
head's shape, what is refused, and the cleaning step. What every fused backend must do with
sub-centres is in test_contract.py; parity with pytorch-metric-learning in test_parity.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf

from helpers import arithmetic_bounds, assert_close, make_inputs, run


def plain_loop_losses(x, w, y, subcenters: int, scale: float, m: float) -> torch.Tensor:
    """Each row's loss: c_ij = max_k cos(x_i, w_{jK+k}), ArcFace cos(θ + m) on the target (straight
    through: its gradient that of s·c), softmax cross-entropy; 0 for ignored rows."""
    losses = []
    for i in range(len(y)):
        if y[i] == -100:
            losses.append(torch.zeros((), dtype=x.dtype))
            continue
        cos = (F.normalize(w, dim=1) @ F.normalize(x[i], dim=0)).clamp(-1, 1).view(-1, subcenters).amax(dim=1)
        c = cos[y[i]]
        target = torch.cos(torch.acos(c.detach()) + m) + (c - c.detach())
        logits = torch.cat([cos[: y[i]], target.reshape(1), cos[y[i] + 1:]]) * scale
        losses.append(torch.logsumexp(logits, dim=0) - logits[y[i]])
    return torch.stack(losses)


@pytest.mark.parametrize("subcenters", [1, 2, 3])
def test_the_reference_is_the_formula(subcenters):
    """Two float64 computations of one function: within twice the suite's float64 bound."""
    x, w, y = make_inputs(13, 29 * subcenters, 10, ignored=2, seed=70)
    y = torch.where(y >= 0, y % 29, y)
    upstream = torch.linspace(-1.0, 2.0, 13, dtype=torch.float64)
    options = dict(margin=mf.ArcFace(0.5), scale=30.0, subcenters=subcenters, reduction="none")
    got = run("torch", x, w, y, upstream=upstream, **options)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    plain_loop_losses(xx, ww, y, subcenters, 30.0, 0.5).backward(upstream)
    bounds = arithmetic_bounds(x, w, y, torch.float64, upstream, **options)
    assert_close("loss", got.loss, plain_loop_losses(x, w, y, subcenters, 30.0, 0.5), 2 * bounds["loss"])
    assert_close("grad x", got.grad_embeddings, xx.grad, 2 * bounds["grad_embeddings"])
    assert_close("grad w", got.grad_weight, ww.grad, 2 * bounds["grad_weight"])


def test_the_head_holds_k_rows_per_class():
    head = mf.MarginSoftmaxLoss(8, 20, subcenters=3)
    assert head.weight.shape == (60, 8) and head.subcenters == 3
    loss = head(torch.randn(5, 8), torch.tensor([0, 19, 7, 7, 3]))
    loss.backward()
    assert head.weight.grad.shape == (60, 8)


def test_what_sub_centres_refuse():
    x, w, y = make_inputs(4, 12, 5)
    y = y % 4
    with pytest.raises(ValueError, match="not whole classes of subcenters=5"):
        mf.margin_cross_entropy(x, w, y, subcenters=5)
    with pytest.raises(ValueError, match="subcenters must be >= 1"):
        mf.margin_cross_entropy(x, w, y, subcenters=0)
    with pytest.raises(TypeError, match="subcenters must be an int"):
        mf.margin_cross_entropy(x, w, y, subcenters=3.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        mf.margin_cross_entropy(x, w, torch.tensor([0, 1, 2, 4]), subcenters=3)
    with pytest.raises(TypeError, match="subcenters must be an int"):
        mf.MarginSoftmaxLoss(8, 20, subcenters="3")


def test_cleaning_finds_the_dominant_sub_centre_and_the_samples_far_from_it():
    """Class 0: three samples near sub-centre 1, one near sub-centre 0 but 90° from sub-centre 1 (an
    outlier at 75°, not at 100°); class 1: no samples; an ignored row is never an outlier."""
    e = torch.eye(4, dtype=torch.float64)
    w = torch.stack([e[0], e[1], -e[1], e[2], e[3], -e[3]])  # classes 0 and 1, three sub-centres each
    x = torch.stack([e[1] + 0.1 * e[2], e[1], e[1] - 0.2 * e[3], e[0], -e[1]])
    y = torch.tensor([0, 0, 0, 0, -100])
    found = mf.subcenter_outliers(x, w, y, subcenters=3)
    assert found.dominant.tolist() == [1, -1]
    assert found.outliers.tolist() == [False, False, False, True, False]
    assert not mf.subcenter_outliers(x, w, y, subcenters=3, threshold_degrees=100.0).outliers.any()
    with pytest.raises(ValueError, match="threshold_degrees"):
        mf.subcenter_outliers(x, w, y, subcenters=3, threshold_degrees=200.0)
    with pytest.raises(ValueError, match="not whole classes"):
        mf.subcenter_outliers(x, w[:5], y, subcenters=3)


def test_cleaning_threshold_is_an_angle():
    """A sample 60° from its class's dominant sub-centre is an outlier at 59° and not at 61°."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    sixty = math.radians(60)
    x = torch.tensor([[1.0, 0.01], [1.0, -0.01], [math.cos(sixty), -math.sin(sixty)]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.int64)
    assert mf.subcenter_outliers(x, w, y, subcenters=2, threshold_degrees=59.0).outliers.tolist() == [False, False, True]
    assert mf.subcenter_outliers(x, w, y, subcenters=2, threshold_degrees=61.0).outliers.tolist() == [False, False, False]
