"""What every backend must do, each checked against the float64 truth by the suite's rule
(tests/helpers.py): every margin in both gradient modes, any user margin and per-row margin
tensors, awkward shapes, reductions and smoothing, ignored rows, one-sided gradients, edge-case
inputs, predictions, class shards that merge into the whole, and memory that never holds B×C
elements nor a second W-shaped tensor.

The `backend` fixture (tests/conftest.py) runs each test on every backend that can run here.
What only one backend has (its C++ argument checks, its interpreter, its compiled code) lives in
that backend's own test module.
"""

import math
import traceback

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf
from marginfused.backends import REGISTRY
from marginfused.partials import RowPartials, log_sum_exp, merge, row_loss
from marginfused.settings import LossSettings, resolve_margin

from allocations import AllocationTracker
from helpers import (
    MARGINS, assert_close, assert_matches_truth, assert_predictions_are_nearest, budgets, cosine_bound,
    kernel_settings, make_inputs, run, shard_targets, skip_unless_supported, spread_inputs,
    unit_embeddings_and_small_centres,
)


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


def user_margin(c):
    """A margin the package does not know: only a differentiable function of the cosine."""
    return torch.cos(torch.acos(c) + 0.3) - 0.1


# --- the margins ---------------------------------------------------------------------------------


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS), ids=list(MARGINS))
def test_every_margin_and_gradient_mode(backend, margin, margin_grad):
    x, w, y = spread_inputs(19, 150, 40, ignored=3, seed=7, device=backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin=MARGINS[margin], margin_grad=margin_grad,
                         reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_a_user_defined_margin(backend, margin_grad):
    x, w, y = spread_inputs(19, 70, 24, ignored=2, seed=21, device=backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin=user_margin, margin_grad=margin_grad,
                         reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_per_row_margin_tensors(backend, margin_grad):
    x, w, y = spread_inputs(19, 70, 24, ignored=2, seed=22, device=backend.device)
    m = torch.linspace(0.1, 0.6, 19, device=backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin=mf.ArcFace(m), margin_grad=margin_grad)


@pytest.mark.parametrize("kind, margin", [("arc", mf.ArcFace), ("cos", mf.CosFace)])
def test_elasticface_draws_each_rows_margin_once_per_call(backend, kind, margin):
    """ElasticFace in training mode: the loss and gradients are those of ArcFace (CosFace) with
    per-row margins drawn from N(m, 0.05) by its generator, once per call (the slope of exact mode
    from the same draws); in eval mode, those of the mean margin."""
    x, w, y = spread_inputs(19, 70, 24, ignored=2, seed=23, device=backend.device)
    mean = {"arc": 0.5, "cos": 0.35}[kind]
    drawn = torch.normal(mean, 0.05, size=(19,), generator=torch.Generator(backend.device).manual_seed(5),
                         device=backend.device)  # as ElasticFace draws for float32 cosines
    truth, limits = budgets(x, w, y, torch.float32, margin=margin(drawn.double()), margin_grad="exact")
    elastic = mf.ElasticFace(kind, generator=torch.Generator(backend.device).manual_seed(5))
    got = run(backend.name, x.float(), w.float(), y, margin=elastic, margin_grad="exact")
    for field, limit in limits.items():
        assert_close(f"{backend.name}/{field}", getattr(got, field), getattr(truth, field), limit)
    truth, limits = budgets(x, w, y, torch.float32, margin=margin(mean))
    got = run(backend.name, x.float(), w.float(), y, margin=elastic.eval())
    assert_close(f"{backend.name}/eval loss", got.loss, truth.loss, limits["loss"])


def adaptive_inputs(seed: int, device: str):
    """`spread_inputs` with the embeddings' norms spread over [4, 130]: past both ends of MagFace's
    [10, 110] and across AdaFace's quality range."""
    x, w, y = spread_inputs(19, 70, 24, ignored=2, seed=seed, device=device)
    norms = torch.linspace(4.0, 130.0, 19, dtype=x.dtype, device=device)[torch.randperm(19, generator=torch.Generator().manual_seed(seed))]
    return x / x.norm(dim=1, keepdim=True) * norms[:, None], w, y


def adaptive_cases() -> dict:
    """Each adaptive margin and negative-logit rule, with state away from its start (AdaFace's
    norm statistics, CurricularFace's t), as `margin_cross_entropy` keyword arguments."""
    adaface = mf.AdaFace()
    adaface.batch_mean.fill_(50.0)
    adaface.batch_std.fill_(30.0)
    curricular = mf.CurricularFace()
    curricular.t.fill_(0.3)
    return {
        "adaface": dict(margin=adaface),
        "magface": dict(margin=mf.MagFace()),
        "curricularface": dict(margin=curricular),
        "interclass-filtering": dict(margin=mf.ArcFace(0.5), interclass_filtering=0.1),
    }


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("case", list(adaptive_cases()))
def test_adaptive_margins_and_negative_logit_rules(backend, case, margin_grad):
    """AdaFace, MagFace (its margin and regulariser differentiable in ‖x‖), CurricularFace (its hard
    negatives), inter-class filtering: a training-mode call, whose statistics advance before use."""
    x, w, y = adaptive_inputs(31, backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin_grad=margin_grad, reduction="none",
                         label_smoothing=0.1, scale=32.0, **adaptive_cases()[case])


def rule_inputs(device: str):
    """Inputs whose negatives lie far (≥ 0.1) from the rules' thresholds, so that 16-bit rounding
    (δc up to ~4e-3) leaves every negative on its side: class centres along the first 8 axes of
    32 dims; row i's target cosine t_i ∈ [0.6, 0.75] (CurricularFace's τ_i = cos(θ_iy + 0.5) ∈
    [0.14, 0.34]), one hard negative at τ_i + 0.15 (above the filter's 0.1 too), six at −0.1 or 0,
    the rest of the unit vector along the other axes; norms spread over [4, 130]."""
    batch, classes, dim = 12, 8, 32
    g = torch.Generator().manual_seed(40)
    w = torch.eye(classes, dim, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    x = torch.zeros(batch, dim, dtype=torch.float64)
    for i, t in enumerate(torch.linspace(0.6, 0.75, batch, dtype=torch.float64)):
        others = [j for j in range(classes) if j != y[i]]
        x[i, others] = -0.1 * torch.randint(0, 2, (7,), generator=g, dtype=torch.float64)
        x[i, others[i % 7]] = math.cos(math.acos(t) + 0.5) + 0.15
        x[i, y[i]] = t
        rest = torch.randn(dim - classes, generator=g, dtype=torch.float64)
        x[i, classes:] = rest / rest.norm() * (1 - x[i].square().sum()).sqrt()
    norms = torch.linspace(4.0, 130.0, batch, dtype=torch.float64)
    return (x * norms[:, None]).to(device), w.to(device), y.to(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["curricularface", "interclass-filtering"])
def test_negative_logit_rules_in_low_precision(backend, dtype, case):
    """The rules' slopes s·(a_i + 2q·c) enter the float16 gradient scale's bound."""
    x, w, y = rule_inputs(backend.device)
    skip_unless_supported(backend.name, x.to(dtype), w.to(dtype))
    assert_matches_truth(backend.name, x, w, y, dtype, margin_grad="exact", **adaptive_cases()[case])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_reach_a_per_row_margin_tensor(backend, reduction):
    """∂L/∂m_i through the target logit, ∂L/∂z_iy = g_i·(p_iy − (1 − ε) − ε/C), which the fused
    backends compute from their partials."""
    x, w, y = make_inputs(11, 40, 16, ignored=1, seed=24, device=backend.device)
    upstream = torch.linspace(-1.0, 2.0, 11, dtype=torch.float64, device=backend.device)
    grads = {}
    for name, dtype in (("torch", torch.float64), (backend.name, torch.float32)):
        m = torch.full((11,), 0.4, dtype=dtype, device=backend.device, requires_grad=True)
        loss = mf.margin_cross_entropy(x.to(dtype), w.to(dtype), y, margin=mf.ArcFace(m), backend=name,
                                       reduction=reduction, label_smoothing=0.1)
        loss.backward(upstream.to(dtype) if reduction == "none" else None)
        grads[name] = m.grad.double()
    assert bool((grads["torch"][y != -100] != 0).all())
    # ∂L/∂m_i = g_i·(p_iy − (1 − ε) − ε/C)·(−s sin(θ_i + m_i)), |g_i| ≤ max|upstream| (or 1/n for
    # the mean over the n rows not ignored): p carries a relative error ≤ 2δz (tests/helpers.py),
    # θ and sin a few float32 steps; |p|, |sin| ≤ 1
    weight = 2.0 if reduction == "none" else 1.0 / int((y != -100).sum())
    bound = 64.0 * weight * (2 * 64.0 * cosine_bound(torch.float32, 16) + 16 * 2**-24)
    assert_close("margin grad", grads[backend.name], grads["torch"], bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("margin", ["arcface", "expface", "combined"])
def test_low_precision_inputs(backend, dtype, margin):
    x, w, y = spread_inputs(19, 333, 64, ignored=2, seed=8, device=backend.device)
    skip_unless_supported(backend.name, x.to(dtype), w.to(dtype))
    assert_matches_truth(backend.name, x, w, y, dtype, margin=margin, margin_grad="exact", reduction="none",
                         label_smoothing=0.1)


# --- shapes, reductions, ignored rows -------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, classes, dim",
    [
        (37, 1031, 96),  # no dimension a multiple of any block or chunk
        (5, 1, 7),  # C = 1
        (20, 17, 33),  # C below one block or chunk
        (4, 301, 5),  # a last chunk of one class, holding the last row's target
        (1, 70, 16),  # B = 1
    ],
    ids=["37x1031x96", "C=1", "C<block", "last-chunk-of-one", "B=1"],
)
def test_shapes_that_break_tiling(backend, batch, classes, dim):
    # make_inputs puts the last row's target on the last class: in the last, partial class tile
    x, w, y = make_inputs(batch, classes, dim, ignored=batch // 5, seed=1, device=backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin="sphereface", margin_grad="exact",
                         reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_reductions_and_label_smoothing(backend, reduction, smoothing):
    x, w, y = make_inputs(23, 300, 40, ignored=4, seed=5, device=backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin="arcface", margin_grad="exact",
                         reduction=reduction, label_smoothing=smoothing)


def test_ignore_index_that_is_a_class(backend):
    """Rows labelled ignore_index take no part; the class of that id still counts for the others."""
    x, w, y = make_inputs(21, 90, 24, seed=3, device=backend.device)
    y[::4] = 5
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin="cosface", ignore_index=5,
                         reduction="none", label_smoothing=0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_label_ignored(backend, reduction):
    x, w, y = make_inputs(5, 9, 8, seed=6, device=backend.device)
    y[:] = -100
    outcome = run(backend.name, x.float(), w.float(), y, reduction=reduction)
    expected = {"mean": torch.tensor(float("nan")), "sum": torch.tensor(0.0), "none": torch.zeros(5)}[reduction]
    assert_close("loss", outcome.loss.cpu(), expected.double(), 0.0)
    if reduction != "mean":  # the mean's NaN would poison every gradient
        assert (outcome.grad_embeddings == 0).all() and (outcome.grad_weight == 0).all()


@pytest.mark.parametrize("needs", ["embeddings", "weight"])
def test_gradient_to_one_input_only(backend, needs):
    """Either input may be a leaf without grad (a backend may then skip that half of its work)."""
    x, w, y = make_inputs(11, 50, 24, ignored=2, seed=14, device=backend.device)
    truth, limits = budgets(x, w, y, torch.float32, margin="arcface", margin_grad="exact")
    xb = x.float().requires_grad_(needs == "embeddings")
    wb = w.float().requires_grad_(needs == "weight")
    mf.margin_cross_entropy(xb, wb, y, "arcface", margin_grad="exact", backend=backend.name).backward()
    assert (xb.grad is None) == (needs != "embeddings") and (wb.grad is None) == (needs != "weight")
    field = f"grad_{needs}"
    leaf = xb if needs == "embeddings" else wb
    assert_close(field, leaf.grad.double(), getattr(truth, field), limits[field])


def test_non_contiguous_weight_and_int32_labels(backend):
    x, w, y = make_inputs(13, 60, 40, seed=6, device=backend.device)
    assert_matches_truth(backend.name, x, w, y.int(), torch.float32, margin="combined",
                         layout=lambda t: t.T.contiguous().T)


def test_the_module_head(backend):
    head = mf.MarginSoftmaxLoss(24, 50, margin="cosface", backend=backend.name).to(backend.device)
    x, _, y = make_inputs(11, 50, 24, seed=15, device=backend.device)
    truth, limits = budgets(x, head.weight.detach().double(), y, torch.float32, margin="cosface")
    loss, accuracy = head(x.float(), y, return_accuracy=True)
    loss.backward()
    assert loss.dtype == torch.float32 and 0.0 <= float(accuracy) <= 1.0
    assert_close("loss", loss.detach().double(), truth.loss, limits["loss"])
    assert_close("weight grad", head.weight.grad.double(), truth.grad_weight, limits["grad_weight"])


# --- predictions -----------------------------------------------------------------------------------


def test_prediction_is_a_nearest_centre_and_accuracy_follows(backend):
    x, w, y = spread_inputs(30, 80, 24, ignored=3, seed=8, device=backend.device)
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    prediction = REGISTRY[backend.name].per_row_loss(x.float(), w.float(), y, settings).partials.best_class
    assert prediction.dtype == torch.int64
    assert_predictions_are_nearest(prediction, x, w, torch.float32)
    _, accuracy = mf.margin_cross_entropy(x.float(), w.float(), y, backend=backend.name, return_accuracy=True)
    valid = y != -100
    assert 0.0 < float(accuracy) < 1.0  # the data make the check meaningful
    assert float(accuracy) == float(((prediction == y) & valid).sum() / valid.sum())


def test_prediction_takes_the_first_of_tied_classes(backend):
    x, w, y = make_inputs(6, 300, 16, seed=9, device=backend.device)
    w[270] = w[3]  # class 270 (another chunk or split) ties with class 3 exactly
    w[140] = w[3] * 2.0  # same direction, twice the norm: an exact tie too (scaling by 2 is exact)
    x[:3] = w[3]
    settings = LossSettings.build("cosface", 64.0, "detached", -100, 0.0)
    prediction = REGISTRY[backend.name].per_row_loss(x.float(), w.float(), y, settings).partials.best_class
    assert prediction[:3].tolist() == [3, 3, 3]


# --- class shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [(0, 45, 100), (0, 1, 64, 100)], ids=["two", "four"])
def test_class_shards_merge_into_the_whole(backend, bounds):
    """The shard pieces of the class-sharded loss: partials over class ranges [a, b) with global
    labels merge into the loss, and the shards' gradients (with the global lse) add up to the
    gradients. Sharded and whole are each held to the float64 truth: they round differently."""
    implementation = REGISTRY[backend.name]
    x, w, y = make_inputs(17, 100, 24, ignored=3, seed=11, device=backend.device)
    options = dict(margin="sphereface", scale=30.0, margin_grad="exact", label_smoothing=0.1, reduction="none")
    upstream = torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(backend.device)
    truth, limits = budgets(x, w, y, torch.float32, upstream, **options)
    settings = LossSettings.build("sphereface", 30.0, "exact", -100, 0.1)
    x, w = x.float(), w.float()
    logit, slope = shard_targets(x, w, y, settings)
    pieces = [implementation.partials(x, w[a:b], y, logit.float(), kernel_settings(settings, 100, a))
              for a, b in zip(bounds, bounds[1:])]
    merged = merge(RowPartials(*(torch.cat(fields) for fields in zip(*pieces))))
    lse = log_sum_exp(merged)
    sharded = row_loss(lse, merged.logit_sum, logit.float(), y, -100, 0.1, 100)
    assert_close("sharded loss", sharded.double(), truth.loss, limits["loss"])
    assert_predictions_are_nearest(merged.best_class, x, w, torch.float32)

    dx = torch.zeros_like(x)
    dw = []
    for a, b in zip(bounds, bounds[1:]):
        dx_part, dw_part = implementation.gradients(x, w[a:b], y, logit.float(), slope.float(), lse, upstream.float(),
                                                    kernel_settings(settings, 100, a), True, True)
        dx += dx_part
        dw.append(dw_part)
    # the shards' dx add up in float32: one rounding per shard of values up to the gradient's size
    adds = (len(bounds) - 1) * 2**-24 * float(truth.grad_embeddings.abs().max())
    assert_close("sharded dx", dx.double(), truth.grad_embeddings, limits["grad_embeddings"] + adds)
    assert_close("sharded dw", torch.cat(dw).double(), truth.grad_weight, limits["grad_weight"])


# --- memory ----------------------------------------------------------------------------------------


def _made_by_the_interpreter() -> bool:
    """Triton's interpreter copies every tensor argument of a launch to emulate device memory:
    those copies are the emulator's, not the backend's."""
    return any(frame.filename.endswith("triton/runtime/interpreter.py") for frame in traceback.extract_stack())


def _allocations(backend, classes, batch=48, dim=8, dtype=torch.float32):
    """Every storage (bytes, shape) a forward + backward allocates."""
    x, w, y = make_inputs(batch, classes, dim, ignored=2, seed=12, device=backend.device)
    x = x.to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    seen = []

    class Recorder(AllocationTracker):
        def _count(self, tensor):
            if id(tensor.untyped_storage()) not in self._counted and not _made_by_the_interpreter():
                seen.append((tensor.untyped_storage().nbytes(), tuple(tensor.shape)))
            super()._count(tensor)

    with Recorder():
        mf.margin_cross_entropy(x, w, y, "arcface", margin_grad="exact", label_smoothing=0.1,
                                backend=backend.name).backward()
    return seen


def test_no_batch_by_classes_allocation_and_no_second_weight_sized_one(backend):
    """A fused backend allocates nothing of B×C elements (not even B×C bytes), and nothing of
    W's size but W's gradient itself (no gather backward's zeros, no copy of W); beyond vectors of
    one number per class (the inverse norms), its working memory does not grow with C."""
    if backend.name == "torch":
        pytest.skip("the torch backend is the reference: it materialises B×C logits by design")
    batch, dim = 48, 8  # D·4 < B: a W-sized float32 buffer is smaller than B×C bytes
    small = _allocations(backend, 300, batch, dim)
    large = _allocations(backend, 3000, batch, dim)
    assert max(nbytes for nbytes, _ in large) < batch * 3000, large
    weight_sized = [(n, s) for n, s in large if n >= 3000 * dim * 4]
    assert len(weight_sized) == 1, f"W-sized allocations besides W's gradient: {weight_sized}"
    working = max(n for n, shape in small if shape not in ((300, dim), (300,)))
    grown = max(n for n, shape in large if shape not in ((3000, dim), (3000,)))
    assert grown <= working, (working, grown)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_the_backward_has_no_weight_sized_temporary(backend, dtype):
    """At a shape where C·D float32 is 20× the class splits' B·D float32 (3 splits under the
    interpreter), everything a forward + backward allocates besides W's gradient itself is at
    most 1/20 of C·D float32: no (C, D) float32 accumulator, whatever W's dtype (vectors of one
    number per class, C·4 bytes, are D/20 times smaller)."""
    if backend.name == "torch":
        pytest.skip("the torch backend is the reference: it materialises B×C logits by design")
    batch, dim, classes = 48, 64, 3000
    assert classes * dim * 4 >= 20 * 3 * batch * dim * 4
    skip_unless_supported(backend.name, torch.zeros(1, dim, dtype=dtype), torch.zeros(1, dim, dtype=dtype))
    seen = _allocations(backend, classes, batch, dim, dtype)
    gradient = classes * dim * dtype.itemsize
    assert sum(1 for n, shape in seen if (n, shape) == (gradient, (classes, dim))) == 1, seen
    others = [n for n, shape in seen if (n, shape) != (gradient, (classes, dim))]
    assert max(others) <= classes * dim * 4 / 20, sorted(others)[-5:]


# --- inputs at the edges ---------------------------------------------------------------------------


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_zero_norm_embedding_and_class_centre_rows(backend, margin_grad):
    x, w, y = make_inputs(6, 9, 8, seed=1, device=backend.device)
    x[0] = 0.0
    w[3] = 0.0
    y[1] = 3
    # a zero row's gradient is g / 1e-12 (F.normalize's eps): ~1e12, where one float32 step is ~1e5
    truth = run("torch", x, w, y, margin_grad=margin_grad)
    largest = max(truth.grad_embeddings.abs().max().item(), truth.grad_weight.abs().max().item())
    assert_matches_truth(backend.name, x, w, y, torch.float32, slack=4 * 2**-24 * largest, margin_grad=margin_grad)


@pytest.mark.parametrize("zero", ["class centre", "embedding"])
def test_a_float16_zero_row_does_not_reach_the_other_gradient(backend, zero):
    """In float16 a zero row's own gradient, g/1e-12, overflows (as in the torch reference), but a
    zero class centre contributes exactly 0 to dX and a zero embedding exactly 0 to dW: that
    gradient still holds to the truth (a kernel scaling the gradient tile by 1/‖row‖ before a
    float16 cast must not turn the zero row into inf·0 = NaN)."""
    x, w, y = spread_inputs(19, 333, 64, ignored=2, seed=8, device=backend.device)
    skip_unless_supported(backend.name, x.half(), w.half())
    (w if zero == "class centre" else x)[3] = 0.0
    y[3] = 3
    field = "grad_embeddings" if zero == "class centre" else "grad_weight"
    truth, limits = budgets(x, w, y, torch.float16, margin="arcface", label_smoothing=0.1)
    got = run(backend.name, x.half(), w.half(), y, margin="arcface", label_smoothing=0.1)
    assert_close(f"{backend.name}/{field}", getattr(got, field), getattr(truth, field), limits[field])


@pytest.mark.parametrize("margin", ["arcface", "sphereface", "expface", "combined"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["cos=1", "cos=-1"])
def test_rows_on_or_opposite_their_centre_in_exact_mode(backend, margin, sign):
    x, w, y = make_inputs(6, 9, 8, seed=2, device=backend.device)
    x[:4] = sign * 3.0 * w[y[:4]]
    slack = slack_near_plus_minus_one(resolve_margin(margin), "exact")
    assert_matches_truth(backend.name, x, w, y, torch.float32, slack=slack, margin=margin, margin_grad="exact")


def test_fp16_inputs_at_scale_64(backend):
    x, w, y = make_inputs(8, 40, 16, seed=3, device=backend.device)
    x[:2] = w[y[:2]]  # target logits of s·f(1) ≈ 56: exp(56) overflows fp16
    skip_unless_supported(backend.name, x.half(), w.half())
    assert_matches_truth(backend.name, x, w, y, torch.float16, scale=64.0)


def test_fp16_unit_embeddings_against_small_centres(backend):
    x, w, y = unit_embeddings_and_small_centres(64, 300, 32, seed=9, device=backend.device)
    skip_unless_supported(backend.name, x.half(), w.half())
    assert_matches_truth(backend.name, x, w, y, torch.float16, scale=64.0, label_smoothing=0.1)


@pytest.mark.parametrize("norm", [1e-4, 1e4])
def test_huge_and_tiny_norms(backend, norm):
    x, w, y = make_inputs(6, 9, 8, seed=4, device=backend.device)
    assert_matches_truth(backend.name, x * norm, w * norm, y, torch.float32)


@pytest.mark.parametrize("norm", [3e38, 1e-38])
def test_rows_of_norm_near_the_float32_limits(backend, norm):
    """An embedding and a class centre of norm 3e38 (their squares overflow float32) or 1e-38 (they
    underflow), the others of norm 0.9 so that every dot product stays finite (|x·w| ≤ ‖x‖‖w‖):
    the norms are computed scaled where their squares would overflow (marginfused/normalize.py),
    and the loss and both gradients hold to the truth."""
    x, w, y = make_inputs(7, 50, 16, seed=3, device=backend.device)
    x, w = 0.9 * F.normalize(x, dim=1), 0.9 * F.normalize(w, dim=1)
    x[2] = norm * F.normalize(x[2], dim=0)
    w[5] = norm * F.normalize(w[5], dim=0)
    y[2] = 5
    assert_matches_truth(backend.name, x, w, y, torch.float32, label_smoothing=0.1)


@pytest.mark.parametrize("batch, classes", [(1, 9), (6, 1), (1, 1)])
def test_a_single_row_or_class(backend, batch, classes):
    x, w, y = make_inputs(batch, classes, 8, seed=5, device=backend.device)
    for reduction in ("mean", "none"):
        assert_matches_truth(backend.name, x, w, y, torch.float32, reduction=reduction, label_smoothing=0.1)


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
    x, w, y = make_inputs(6, 9, 16, seed=7, device=backend.device)
    assert not layout(x).is_contiguous()
    # another layout may take another BLAS path, so it is held to the truth, not to the contiguous run
    assert_matches_truth(backend.name, x, w, y, torch.float32, layout=layout)


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_one_dimensional_embeddings(backend, margin_grad):
    # D = 1: every cosine is ±1, and the true gradients are exactly 0 (the normalisation's
    # projection removes all of them)
    x, w, y = make_inputs(7, 5, 1, seed=9, device=backend.device)
    slack = slack_near_plus_minus_one(mf.ArcFace(), margin_grad)
    assert_matches_truth(backend.name, x, w, y, torch.float32, slack=slack, margin=mf.ArcFace(), margin_grad=margin_grad)


# --- sub-centres ----------------------------------------------------------------------------------


def subcenter_inputs(subcenters: int, seed: int, device: str):
    """23 rows against 37 classes of `subcenters` rows each (the last row's target the last class,
    in the last partial tile), D = 20."""
    x, w, y = make_inputs(23, 37 * subcenters, 20, ignored=3, seed=seed, device=device)
    y = torch.where(y >= 0, y % 37, y)
    y[-1] = 36
    return x, w, y


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("subcenters", [1, 2, 3])
def test_subcenters(backend, subcenters, margin_grad):
    """Each class's cosine is the largest of its K sub-centres', and its gradient goes to that one."""
    x, w, y = subcenter_inputs(subcenters, 60 + subcenters, backend.device)
    assert_matches_truth(backend.name, x, w, y, torch.float32, margin="arcface", margin_grad=margin_grad,
                         subcenters=subcenters, reduction="none", label_smoothing=0.1)


def test_a_subcentre_no_sample_chose_gets_no_gradient(backend):
    """Exactly zero: no term of the loss reaches it. (No class's best two sub-centres are within
    float32's reach of each other here, 4δc: every backend chooses as the float64 truth does.)"""
    x, w, y = subcenter_inputs(3, 64, backend.device)
    x, w, y = x[:4], w, y[:4]  # few rows: many sub-centres chosen by none
    cos = (F.normalize(x.cpu(), dim=1) @ F.normalize(w.cpu(), dim=1).T).unflatten(1, (37, 3))
    best_two = cos.topk(2, dim=2).values
    assert bool(((best_two[..., 0] - best_two[..., 1]) > 4 * cosine_bound(torch.float32, 20)).all()), "a near-tie"
    chosen = torch.zeros(37 * 3, dtype=torch.bool)
    for i in range(4):
        if y[i] != -100:
            chosen[torch.arange(37) * 3 + cos[i].argmax(dim=1)] = True
    got = run(backend.name, x.float(), w.float(), y, margin="arcface", subcenters=3, label_smoothing=0.1)
    assert bool((got.grad_weight[~chosen.to(got.grad_weight.device)] == 0).all())
    assert bool((got.grad_weight[chosen.to(got.grad_weight.device)].abs().sum(dim=1) > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_subcenters_in_low_precision(backend, dtype):
    x, w, y = subcenter_inputs(3, 65, backend.device)
    skip_unless_supported(backend.name, x.to(dtype), w.to(dtype))
    assert_matches_truth(backend.name, x, w, y, dtype, margin="arcface", subcenters=3)
