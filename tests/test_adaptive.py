"""The adaptive margins (AdaFace, MagFace, CurricularFace) and inter-class filtering: the torch
backend in float64 against the papers' formulas written out here as a plain loop over rows; their
running statistics over calls, in training and eval mode, in the head's state_dict; their names;
and what they refuse. What every fused backend must do with them is in test_contract.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf

from helpers import arithmetic_bounds, assert_close, make_inputs, run
from test_contract import adaptive_cases, adaptive_inputs

SCALE = 32.0


def papers_losses(x, w, y, case: str, margin_grad: str, state: dict) -> torch.Tensor:
    """Each row's loss (0 for ignored rows) from the papers' formulas, logits materialised row by
    row in float64, differentiable in x and w. `state` holds the statistics before the call
    (AdaFace's μ, σ; CurricularFace's t); a training call updates them before use.

    AdaFace: a = clip(‖x‖, 1e-3, 100), μ ← 0.01·mean a + 0.99·μ, σ ← 0.01·std a + 0.99·σ,
    ĝ = clip(0.333·(a − μ)/(σ + 1e-3), −1, 1), f = cos(clip(θ − 0.4ĝ, 1e-3, π − 1e-3)) − 0.4(1 + ĝ).
    MagFace: a = clamp(‖x‖, 10, 110), m = 0.45 + 0.35(a − 10)/100, f = cos(θ + m) for c > 0 else c,
    loss + 35·(a/110² + 1/a). CurricularFace: f = cos(θ + 0.5) for c > cos(π − 0.5) else
    c − 0.5·sin 0.5; t ← 0.01·mean c_y + 0.99·t; negatives above cos(θ_y + 0.5) take c(t + c).
    Filtering: ArcFace 0.5, negatives above 0.1 take 0. In detached mode the target's logit passes
    the gradient of s·c (straight-through)."""
    valid = y != -100
    norms = x.norm(dim=1)
    cos_all = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1, 1)
    targets = cos_all[valid, y[valid]].detach()
    if case == "adaface":
        a = norms.detach().clamp(1e-3, 100)
        mean = 0.01 * a[valid].mean() + 0.99 * state["batch_mean"]
        std = 0.01 * a[valid].std() + 0.99 * state["batch_std"]
        quality = (0.333 * (a - mean) / (std + 1e-3)).clamp(-1, 1)
    if case == "curricularface":
        t = 0.01 * targets.mean() + 0.99 * state["t"]
    losses = []
    for i in range(len(y)):
        if not valid[i]:
            losses.append(torch.zeros((), dtype=x.dtype))
            continue
        cos = cos_all[i]
        c = cos[y[i]]
        cf = c.detach() if margin_grad == "detached" else c
        theta = torch.acos(cf)
        logits = SCALE * cos
        if case == "adaface":
            f = torch.cos((theta - 0.4 * quality[i]).clamp(1e-3, math.pi - 1e-3)) - 0.4 * (1 + quality[i])
        elif case == "magface":
            m = 0.45 + 0.35 * (norms[i].clamp(10, 110) - 10) / 100
            f = torch.cos(theta + m) if cf > 0 else cf
        elif case == "curricularface":
            f = torch.cos(theta + 0.5) if cf > math.cos(math.pi - 0.5) else cf - 0.5 * math.sin(0.5)
            hard = cos > torch.cos(torch.acos(c.detach()) + 0.5)
            logits = torch.where(hard, SCALE * cos * (t + cos), logits)
        else:
            f = torch.cos(theta + 0.5)
            logits = torch.where(cos > 0.1, torch.zeros_like(logits), logits)
        if margin_grad == "detached":
            f = f + (c - c.detach())
        logits = torch.cat([logits[: y[i]], (SCALE * f).reshape(1), logits[y[i] + 1:]])
        loss = torch.logsumexp(logits, dim=0) - logits[y[i]]
        if case == "magface":
            a = norms[i].clamp(10, 110)
            loss = loss + 35.0 * (a / 110**2 + 1 / a)
        losses.append(loss)
    return torch.stack(losses)


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("case", list(adaptive_cases()))
def test_the_reference_is_the_papers_formulas(case, margin_grad):
    """Two float64 computations of one function (the margin's statistics in float64 too): each
    within the suite's arithmetic bound in float64 of the exact values, so within twice that of
    each other."""
    x, w, y = adaptive_inputs(33, "cpu")
    options = adaptive_cases()[case]
    margin = options["margin"]
    state = {}
    if isinstance(margin, torch.nn.Module):
        margin.double()
        state = {name: float(value) for name, value in margin.state_dict().items()}
    upstream = torch.linspace(-1.0, 2.0, len(y), dtype=torch.float64)
    got = run("torch", x, w, y, upstream=upstream, margin_grad=margin_grad, reduction="none", scale=SCALE, **options)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = papers_losses(xx, ww, y, case, margin_grad, state)
    expected.backward(upstream)
    bounds = arithmetic_bounds(x, w, y, torch.float64, upstream, margin_grad=margin_grad, reduction="none",
                               scale=SCALE, **options)
    assert_close("loss", got.loss, expected.detach(), 2 * bounds["loss"])
    assert_close("grad x", got.grad_embeddings, xx.grad, 2 * bounds["grad_embeddings"])
    assert_close("grad w", got.grad_weight, ww.grad, 2 * bounds["grad_weight"])


def test_adaface_statistics_advance_before_use_in_training_only():
    x, w, y = adaptive_inputs(34, "cpu")
    head = mf.MarginSoftmaxLoss(24, 70, margin="adaface", scale=SCALE, backend="torch", dtype=torch.float64)
    head.weight.data.copy_(w)
    a = x.norm(dim=1).clamp(1e-3, 100)[y != -100]
    mean, std = torch.tensor(20.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    for _ in range(3):
        head(x, y)
        mean, std = 0.01 * a.mean() + 0.99 * mean, 0.01 * a.std() + 0.99 * std
        # float32 buffers: the statistics of float64 norms, rounded to float32 once per call
        assert_close("μ", head.margin.batch_mean.double(), mean, 3 * 2**-24 * float(mean))
        assert_close("σ", head.margin.batch_std.double(), std, 3 * 2**-24 * float(std))
    head.eval()
    before = {k: v.clone() for k, v in head.margin.state_dict().items()}
    head(x, y)
    assert all(torch.equal(before[k], v) for k, v in head.margin.state_dict().items())
    assert set(head.state_dict()) == {"weight", "margin.batch_mean", "margin.batch_std"}


def test_curricularface_t_advances_before_use_in_training_only():
    x, w, y = make_inputs(19, 70, 24, ignored=2, seed=35)
    valid = y != -100
    w[y[valid]] += 3 * F.normalize(x[valid], dim=1)  # centres near their samples: a mean target cosine ≫ 0
    margin = mf.CurricularFace()
    targets = (F.normalize(x, dim=1) * F.normalize(w[y.clamp(min=0)], dim=1)).sum(1)[valid]
    t = 0.0
    # t in a float32 buffer: rounded once per call; the float64 mean of ≤ 19 cosines errs ≤ λ√19·2⁻⁵³
    bound = lambda t: 3 * 2**-24 * abs(t) + 8 * math.sqrt(19) * 2**-53  # noqa: E731
    for _ in range(3):
        mf.margin_cross_entropy(x, w, y, margin, backend="torch")
        t = 0.01 * float(targets.mean()) + 0.99 * t
        assert abs(float(margin.t) - t) <= bound(t)
    margin.eval()
    mf.margin_cross_entropy(x, w, y, margin, backend="torch")
    assert abs(float(margin.t) - t) <= bound(t)


def test_statistics_load_from_a_state_dict():
    head = mf.MarginSoftmaxLoss(8, 20, margin="curricularface")
    head.margin.t.fill_(0.25)
    other = mf.MarginSoftmaxLoss(8, 20, margin=mf.CurricularFace())
    other.load_state_dict(head.state_dict())
    assert float(other.margin.t) == 0.25


def test_every_batch_statistic_counts_valid_rows_only():
    """Ignored rows do not move AdaFace's μ, σ or CurricularFace's t; a batch of one valid row
    moves μ but not σ (the std of one value is undefined); no valid row moves nothing."""
    x, w, y = make_inputs(6, 10, 8, seed=36)
    for margin in (mf.AdaFace(), mf.CurricularFace()):
        mf.margin_cross_entropy(x, w, torch.full_like(y, -100), margin, backend="torch", reduction="sum")
        assert all(float(v) == {"batch_mean": 20.0, "batch_std": 100.0, "t": 0.0}[k]
                   for k, v in margin.state_dict().items())
    ada = mf.AdaFace()
    one = torch.full_like(y, -100)
    one[2] = 3
    mf.margin_cross_entropy(x, w, one, ada, backend="torch")
    assert float(ada.batch_std) == 100.0
    assert abs(float(ada.batch_mean) - (0.01 * float(x[2].norm()) + 0.99 * 20.0)) <= 1e-5


def test_magface_loss_includes_its_regulariser():
    """The returned loss is the margin's cross-entropy plus λ_g·mean(a/u_a² + 1/a)."""
    x, w, y = adaptive_inputs(37, "cpu")
    valid = y != -100
    a = x.norm(dim=1).clamp(10, 110)
    margins = 0.45 + 0.35 * (a - 10) / 100
    loss = mf.margin_cross_entropy(x, w, y, "magface", backend="torch")
    without = mf.margin_cross_entropy(x, w, y, mf.ArcFace(margins, fallback="easy"), backend="torch")
    regulariser = 35.0 * (a / 110**2 + 1 / a)[valid].mean()
    assert_close("loss", loss, without + regulariser, 1e-12 * float(loss))


def test_names_give_the_defaults():
    head = mf.MarginSoftmaxLoss(8, 20, margin="adaface")
    assert isinstance(head.margin, mf.AdaFace) and (head.margin.m, head.margin.h) == (0.4, 0.333)
    assert isinstance(mf.MarginSoftmaxLoss(8, 20, margin="MagFace").margin, mf.MagFace)
    curricular = mf.MarginSoftmaxLoss(8, 20, margin="curricularface").margin
    assert isinstance(curricular, mf.CurricularFace) and curricular.m == 0.5
    magface = mf.MagFace()
    assert (magface.l_a, magface.u_a, magface.l_m, magface.u_m, magface.lambda_g) == (10, 110, 0.45, 0.8, 35)


@pytest.mark.parametrize("name", ["adaface", "curricularface"])
def test_a_loss_function_refuses_a_stateful_margin_by_name(name):
    x, w, y = make_inputs(4, 6, 5)
    with pytest.raises(ValueError, match="keeps running statistics"):
        mf.margin_cross_entropy(x, w, y, name)


def test_bad_settings_are_refused_and_change_nothing():
    x, w, y = make_inputs(4, 6, 5)
    curricular = mf.CurricularFace()
    curricular.t.fill_(0.2)
    with pytest.raises(ValueError, match="cannot be combined with CurricularFace"):
        mf.margin_cross_entropy(x, w, y, curricular, interclass_filtering=0.4)
    with pytest.raises(ValueError, match="labels must be in"):
        mf.margin_cross_entropy(x, w, torch.full_like(y, 7), curricular)
    assert float(curricular.t) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="interclass_filtering must be in"):
        mf.margin_cross_entropy(x, w, y, "arcface", interclass_filtering=1.5)
    with pytest.raises(TypeError, match="interclass_filtering must be None or a real number"):
        mf.margin_cross_entropy(x, w, y, "arcface", interclass_filtering="0.4")
    with pytest.raises(ValueError, match="momentum"):
        mf.AdaFace(momentum=1.5)
    with pytest.raises(ValueError, match="u_a"):
        mf.MagFace(l_a=50, u_a=40)
    with pytest.raises(ValueError, match="m must be"):
        mf.CurricularFace(m=-0.1)


def test_an_adaptive_margin_called_directly_in_training_mode_says_to_use_eval():
    cos = torch.linspace(-0.9, 0.9, 5)
    with pytest.raises(RuntimeError, match="eval mode"):
        mf.AdaFace()(cos)
    assert torch.allclose(mf.CurricularFace().eval()(cos), mf.ArcFace(0.5, fallback="linear")(cos))
