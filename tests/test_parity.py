"""The README's migrations ("from X, write Y") give the numbers of the library users come from:
loss and gradients in float64, against pytorch-metric-learning's losses themselves and against
InsightFace's CombinedMarginLoss and DistCrossEntropy as its code defines them (written out here,
as it has no package): its reported loss floors each row's probability at 1e-30, so it is the
mean of min(ℓ_i, 69.08), while its gradient is not floored.

Each comparison is of two float64 computations of one function, each within the suite's
arithmetic bound in float64 (tests/helpers.py) of the exact values, so within twice that of
each other.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf

from helpers import arithmetic_bounds, assert_close, make_inputs


@pytest.fixture
def pml():
    """pytorch-metric-learning's losses (an optional test dependency: its tests are skipped without it)."""
    return pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning is not installed")


def assert_same(loss, x, w, y, w_t: bool = False, reported=torch.mean, **options):
    """`loss` (float64, of leaves x and w, or of w's transpose with `w_t`) against the torch backend's
    loss and gradients with `options` on the same inputs; `reported` maps our per-row losses to the
    value the other library reports (their mean, unless it reports something else)."""
    grad_x, grad_w = torch.autograd.grad(loss, (x, w))
    grad_w = grad_w.T if w_t else grad_w
    centres = (w.T if w_t else w).detach()
    mine_x, mine_w = x.detach().clone().requires_grad_(), centres.clone().requires_grad_()
    mine = mf.margin_cross_entropy(mine_x, mine_w, y, backend="torch", **options)
    mine.backward()
    per_row = mf.margin_cross_entropy(x.detach(), centres, y, backend="torch", reduction="none", **options)
    bounds = arithmetic_bounds(x.detach(), centres, y, torch.float64, **options)
    assert_close("loss", reported(per_row), loss.detach(), 2 * bounds["loss"])
    assert_close("grad x", mine_x.grad, grad_x, 2 * bounds["grad_embeddings"])
    assert_close("grad w", mine_w.grad, grad_w, 2 * bounds["grad_weight"])


def insightface_reported(per_row):
    """The loss InsightFace reports for our per-row losses: each capped at −log 1e-30 = 69.08."""
    return per_row.clamp_max(-math.log(INSIGHTFACE_PROBABILITY_FLOOR)).mean()


@pytest.mark.parametrize("degrees", [28.6, 120.0])  # 120°: past π − m the linear fallback acts
def test_from_pytorch_metric_learning_arcface(pml, degrees):
    """ArcFaceLoss(C, D, margin=deg, scale=s) is MarginSoftmaxLoss(D, C, margin=mf.ArcFace(
    math.radians(deg), fallback="linear"), scale=s, margin_grad="exact") with weight = W.T."""
    x, w, y = make_inputs(17, 40, 12, seed=50)
    reference = pml.ArcFaceLoss(40, 12, margin=degrees, scale=30.0).double()
    reference.W.data.copy_(w.T)
    x.requires_grad_()
    assert_same(reference(x, y), x, reference.W, y, w_t=True, margin=mf.ArcFace(math.radians(degrees), fallback="linear"),
                scale=30.0, margin_grad="exact")


def test_from_pytorch_metric_learning_cosface(pml):
    """CosFaceLoss(C, D, margin=m, scale=s) is MarginSoftmaxLoss(D, C, margin=mf.CosFace(m), scale=s)."""
    x, w, y = make_inputs(17, 40, 12, seed=51)
    reference = pml.CosFaceLoss(num_classes=40, embedding_size=12, margin=0.35, scale=64.0).double()
    reference.W.data.copy_(w.T)
    x.requires_grad_()
    assert_same(reference(x, y), x, reference.W, y, w_t=True, margin=mf.CosFace(0.35), scale=64.0)


INSIGHTFACE_PROBABILITY_FLOOR = 1e-30
"""arcface_torch's DistCrossEntropy reports −log max(p_iy, 1e-30): at most 69.08 per row."""


class InsightFaceCrossEntropy(torch.autograd.Function):
    """arcface_torch's DistCrossEntropy on one process, as its code defines it: the reported loss is
    the mean of −log p_iy with each row's probability floored at 1e-30, its gradient (p − onehot)/B,
    unfloored."""

    @staticmethod
    def forward(ctx, logits, y):
        p = torch.softmax(logits, dim=1)
        ctx.save_for_backward(p, y)
        return -p.gather(1, y[:, None]).clamp_min(INSIGHTFACE_PROBABILITY_FLOOR).log().mean()

    @staticmethod
    def backward(ctx, grad):
        p, y = ctx.saved_tensors
        return (p - F.one_hot(y, p.shape[1]).to(p)) / p.shape[0] * grad, None


def insightface_combined_margin_loss(x, w, y, s, m1, m2, m3, filtering=0.0):
    """InsightFace's arcface_torch CombinedMarginLoss on F.linear(x̂, ŵ) and cross-entropy, as its
    code defines it: with interclass_filtering_threshold τ > 0, every non-target cosine above τ is
    multiplied by 0 (a mask without gradient); for (m1, m3) = (1, 0) the logits go through arccos,
    + m2 on the target, cos, all without gradient (the gradient of every logit is s, straight
    through); for m3 > 0 the target logit is c − m3 (m1 and m2 unused); any other combination
    raises."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    rows = torch.arange(len(y))
    logits = cos.clone()
    if filtering > 0:
        with torch.no_grad():
            dirty = (logits > filtering).to(logits)
            dirty[rows, y] = 0
        logits = (1 - dirty) * logits
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            angles = logits.detach().arccos()
            angles[rows, y] += m2
            shifted = angles.cos()
        logits = logits + (shifted - logits).detach()
    elif m3 > 0:
        logits = logits - m3 * F.one_hot(y, w.shape[0]).to(logits)
    else:
        raise ValueError("InsightFace's CombinedMarginLoss supports m1 == 1 with m3 == 0, or m3 > 0")
    return InsightFaceCrossEntropy.apply(s * logits, y)


@pytest.mark.parametrize("m1, m2, m3, filtering, margin", [
    (1.0, 0.5, 0.0, 0.0, mf.ArcFace(0.5)),
    (1.0, 0.0, 0.4, 0.0, mf.CosFace(0.4)),
    (1.0, 0.3, 0.2, 0.0, mf.CosFace(0.2)),  # its m3 > 0 branch ignores m2
    (1.0, 0.5, 0.0, 0.2, mf.ArcFace(0.5)),
], ids=["arcface", "cosface", "m3-branch", "arcface-filtering"])
def test_from_insightface_combined_margin_loss(m1, m2, m3, filtering, margin):
    """CombinedMarginLoss(64, m1, m2, m3, τ) is margin=mf.ArcFace(m2) (m3 = 0) or mf.CosFace(m3)
    (m3 > 0), margin_grad="detached" (the default), no fallback, interclass_filtering=τ."""
    x, w, y = make_inputs(17, 40, 12, seed=52)
    x.requires_grad_()
    w.requires_grad_()
    loss = insightface_combined_margin_loss(x, w, y, 64.0, m1, m2, m3, filtering)
    assert_same(loss, x, w, y, reported=insightface_reported, margin=margin, scale=64.0,
                interclass_filtering=filtering or None)


def test_insightface_floors_the_reported_loss_not_its_gradient():
    """Rows whose loss passes −log 1e-30 = 69.08 (at s = 64, random centres give several) count
    69.08 in InsightFace's reported loss and their whole loss here; the gradients are the same."""
    x, w, y = make_inputs(17, 40, 12, seed=52)
    x.requires_grad_()
    w.requires_grad_()
    theirs = insightface_combined_margin_loss(x, w, y, 64.0, 1.0, 0.5, 0.0)
    per_row = mf.margin_cross_entropy(x.detach(), w.detach(), y, margin=mf.ArcFace(0.5), backend="torch",
                                      reduction="none")
    assert 0 < int((per_row > -math.log(INSIGHTFACE_PROBABILITY_FLOOR) + 1).sum()) < 17
    assert float(per_row.mean() - theirs.detach()) > 1 / 17
    assert_same(theirs, x, w, y, reported=insightface_reported, margin=mf.ArcFace(0.5))


def test_from_pytorch_metric_learning_subcenter_arcface(pml):
    """SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=deg, scale=s, sub_centers=K) is
    MarginSoftmaxLoss(D, C, margin=mf.ArcFace(math.radians(deg), fallback="linear"), scale=s,
    margin_grad="exact", subcenters=K) with weight = W.T (class j's sub-centres at its columns
    jK … jK + K − 1, our rows)."""
    x, w, y = make_inputs(17, 40 * 3, 12, seed=53)
    y = y % 40
    reference = pml.SubCenterArcFaceLoss(num_classes=40, embedding_size=12, margin=28.6, scale=30.0,
                                         sub_centers=3).double()
    reference.W.data.copy_(w.T)
    x.requires_grad_()
    assert_same(reference(x, y), x, reference.W, y, w_t=True, margin=mf.ArcFace(math.radians(28.6), fallback="linear"),
                scale=30.0, margin_grad="exact", subcenters=3)


def test_subcentre_cleaning_is_pytorch_metric_learnings_get_outliers(pml):
    """Its get_outliers(embeddings, labels, threshold=75) finds the same outliers and dominant
    sub-centres as mf.subcenter_outliers (classes with samples; it leaves the others unset)."""
    g = torch.Generator().manual_seed(54)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=g)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64)
    reference = pml.SubCenterArcFaceLoss(num_classes=10, embedding_size=8, sub_centers=3).double()
    reference.W.data.copy_(w.T)
    outliers, dominant_centres = reference.get_outliers(x, y, threshold=75)
    got = mf.subcenter_outliers(x, w, y, subcenters=3, threshold_degrees=75.0)
    assert sorted(outliers.tolist()) == got.outliers.nonzero().flatten().tolist()
    assert 0 < len(outliers) < 200
    present = torch.unique(y)
    chosen = w.view(10, 3, 8)[present, got.dominant[present]]
    assert torch.equal(chosen, dominant_centres.T[present])
