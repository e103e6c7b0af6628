"""The checking rule of docs/design.md §4, written once, for every backend's tests.

Truth is the `torch` backend on float64 inputs. A backend computing from inputs in dtype d passes
when, for the loss and for each gradient,

    max |backend_d − truth|  ≤  2 · max |torch_d − truth|  +  rounding_d  +  arithmetic_d

i.e. it may be at most twice as wrong as the plain PyTorch reference in the same dtype, plus the
two parts of a correct computation's error that the reference may happen to avoid: rounding_d,
the exact effect of rounding the inputs to d (max |truth(inputs rounded to d) − truth|, computed
in float64), and arithmetic_d, a bound on the error of a correct computation from those rounded
inputs, derived below. For reduction="none" the backward pass takes a random upstream gradient.

**The rule for every tolerance in this suite.** A tolerance comes from an error bound, never
from an error observed on one machine: BLAS libraries take different code paths per CPU (AVX2,
AVX-512, AMX; AMD and Intel) and per thread count, so two correct float computations of the
same value differ by amounts no test may assume. Two computations that may round differently
(layouts, thread counts, chunkings, class shards, compiled or eager) are each compared with the
float64 truth under this rule, never with each other; bit-identity is asserted only where the
code guarantees it (same inputs, same code path, same thread count: the determinism tests).
A test whose inputs lie outside the first-order bound's reach (cosines at ±1, zero rows) adds a
slack derived in the test itself.

**The arithmetic bound** (`arithmetic_bounds`), first order in the unit roundoffs u_w of the
working precision (fp32 for 16- and 32-bit inputs, fp64 for fp64 ones) and u_d of the input dtype
(2⁻⁵³ fp64, 2⁻²⁴ fp32, 2⁻¹¹ fp16, 2⁻⁸ bf16). A sum of n terms with independent rounding errors
stays within λ·√n·u of its exact value except with probability 2·exp(−λ²/2) (Higham & Mary, "A
new approach to probabilistic rounding error analysis", 2019); λ = 8 makes that 3e-14 per sum.

    δc = λ·√(D + 2)·u_w + [d ≠ w]·u_d
                                      a cosine: a D-term dot product and two norms, and for 16-bit
                                      inputs one rounding of the product to d (|c| ≤ 1), which the
                                      torch reference itself makes (its matmul returns d) and so
                                      may any backend (the cpu backend's native bfloat16 GEMMs)
    δz = s·L·δc                       a logit, L = max(1, |f′(c_iy)|) over the targets (the margin
                                      moves its value by |f′|·δc)
    δℓ_i = 2·δz + λ·√C·u_w·(2s + |ℓ_i|)
                                      the loss of a row: lse is 1-Lipschitz in the logits and the
                                      target logit enters once; the sum of C exponentials and the
                                      final log and subtraction round relative to their sizes
    ρ = 2·δz + λ·√(B + C + D)·u_w + 3·u_d
                                      the relative error of a gradient term: p_ij = exp(z − lse)
                                      moves by ≤ 2δz relative, the sums over rows, classes and
                                      dims round, and the gradient tile, its GEMMs' products and
                                      the result may each be rounded to d
A gradient entry is a sum of terms G_ij·(unit vector)/‖row‖ with G_ij = ω_i·s·(p_ij − t_ij)
(times the target's slope in exact mode), ω_i the upstream weight of row i and t_ij the smoothed
one-hot target. p_ij and t_ij each carry a relative error up to ρ, and their difference may
cancel (p_iy → 1 for a row that is fit), so the error is at most ρ times the size of the parts:

    ∂/∂x_i:  ρ · Σ_j H_ij / ‖x_i‖        ∂/∂w_j:  ρ · Σ_i H_ij / ‖w_j‖,    H_ij = |ω_i|·s·(p_ij + t_ij)

computed from the float64 truth (the sizes of the terms, not an error). The loss bound is
Σ_i |ω_i|·δℓ_i for "mean" and "sum", max_i δℓ_i for "none".

**Sub-centres** (K rows of W per class; c_ij the largest of the class's K cosines). The max moves
by no more than its arguments, so δc holds; each term H_ij goes to the row the class chose. Where
a class's best two sub-centres are within 4δc, a correct computation may choose either: that
class's terms then count whole (not ρ of them) for each of its rows and, twice, for x.

**Adaptive margins and negatives rules** (`marginfused.adaptive`, `marginfused.negatives`).
The bound is taken for the call's decision (margin, rule, per-row term), from the inputs as the
margin sees them. A hard negative's logit moves by s·(|a_i| + 2|q|)·δc, so L also covers
|a_i| + 2|q|, and H_ij takes the rule's slope s·|a_i + 2q·c_ij| in place of s. Where the decision
depends on the norms a_i = ‖x_i‖ (MagFace), computed to λ·√D·u_w relative: z_iy moves by
|∂z_iy/∂a_i|·a_i·λ√D·u_w more; the per-row term r_i adds its own error λ·u_w·|r_i| +
|∂r_i/∂a_i|·a_i·λ√D·u_w to the loss; and ∂/∂x_i gains ρ·|ω_i|·(|∂ℓ_i/∂z_iy|·|∂z_iy/∂a_i| +
|∂r_i/∂a_i|) for the paths through a_i (x̂_i a unit vector).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import marginfused as mf
from marginfused.adaptive import AdaptiveMargin, MarginCall, local_batch_sum
from marginfused.margins import working_dtype
from marginfused.negatives import interclass_filtering, negative_logits
from marginfused.settings import resolve_margin
from marginfused.target import margin_slope

MARGINS = {
    "cosface": mf.CosFace(0.35),
    "arcface": mf.ArcFace(0.5),
    "arcface-linear": mf.ArcFace(0.9, fallback="linear"),  # m = 0.9: the switch point is reached
    "arcface-easy": mf.ArcFace(0.5, fallback="easy"),
    "sphereface": mf.SphereFace(1.7),
    "sphereface4": mf.SphereFace(4.0),
    "expface": mf.ExpFace(0.7),
    "combined": mf.CombinedMargin(1.1, 0.3, 0.2),
}
"""Every margin kind and fallback, for the backends' truth tests."""

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
"""Half the distance from 1 to the next float of each dtype."""

LAMBDA = 8.0
"""The probabilistic bound's constant λ (see the module docstring)."""


def cosine_bound(dtype: torch.dtype, dim: int) -> float:
    """δc: how far a correctly computed cosine may be from the exact cosine of its inputs (as
    rounded to `dtype`), the product rounded once to a 16-bit `dtype` included."""
    work = working_dtype(dtype)
    product = UNIT_ROUNDOFF[dtype] if dtype != work else 0.0  # the product rounded once to dtype
    return LAMBDA * math.sqrt(dim + 2) * UNIT_ROUNDOFF[work] + product


def make_inputs(
    batch: int,
    num_classes: int,
    dim: int,
    *,
    ignored: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Random float64 embeddings (norms spread over ~[0.5, 2]), class centres and labels, with
    `ignored` rows labelled -100; the last row's label is the last class (a target in the last
    partial tile of any tiling)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x = x * (0.5 + 1.5 * torch.rand(batch, 1, generator=g, dtype=torch.float64)) / dim**0.5
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    y[-1] = num_classes - 1
    if ignored:
        y[torch.randperm(batch, generator=g)[:ignored]] = -100
    return x.to(device), w.to(device), y.to(device)


def spread_inputs(batch, num_classes, dim, *, ignored=0, seed=0, device="cpu"):
    """Like `make_inputs`, but each row's target cosine is set, spread evenly over (−0.97, 0.97), so
    every branch of every margin (ArcFace's fallbacks, SphereFace's k > 0) is exercised."""
    x, w, y = make_inputs(batch, num_classes, dim, ignored=ignored, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.linspace(-0.97, 0.97, batch, dtype=torch.float64)[torch.randperm(batch, generator=g)]
    w_hat = F.normalize(w[y.clamp(min=0)], dim=1)
    noise = x - (x * w_hat).sum(1, keepdim=True) * w_hat
    noise = F.normalize(noise, dim=1)
    x = (t[:, None] * w_hat + (1 - t[:, None] ** 2).sqrt() * noise) * x.norm(dim=1, keepdim=True)
    return x.to(device), w.to(device), y.to(device)


@dataclass
class Outcome:
    """Loss and gradients of one run, as float64."""

    loss: Tensor
    grad_embeddings: Tensor
    grad_weight: Tensor


def run(
    backend: str,
    x: Tensor,
    w: Tensor,
    y: Tensor,
    *,
    upstream: Optional[Tensor] = None,
    **kwargs,
) -> Outcome:
    """Forward and backward of `margin_cross_entropy` on fresh leaf copies of x and w. A margin
    module's state (running statistics) is as it was before the run, after it: runs compared
    with each other start from the same state."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    margin = kwargs.get("margin")
    state = copy.deepcopy(margin.state_dict()) if isinstance(margin, torch.nn.Module) else None
    loss = mf.margin_cross_entropy(x, w, y, backend=backend, **kwargs)
    grad = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    loss.backward(grad)
    if state is not None:
        margin.load_state_dict(state)
    return Outcome(loss.detach().double(), x.grad.double(), w.grad.double())


def max_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected|, with NaN where both are NaN counted as equal."""
    both_nan = actual.isnan() & expected.isnan()
    diff = (actual - expected).abs().masked_fill(both_nan, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(name: str, actual: Tensor, expected: Tensor, tolerance: float) -> None:
    """Fail with the first mismatching indices; NaN/Inf reported separately from plain error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad_finite = actual.isfinite() != expected.isfinite()
    bad_finite |= actual.isnan() != expected.isnan()
    if bool(bad_finite.any()):
        where = bad_finite.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad_finite.sum())} elements non-finite where the truth is not "
            f"(or the reverse), first at {where}: got {actual[bad_finite][:5].tolist()}, "
            f"expected {expected[bad_finite][:5].tolist()}"
        )
    error = max_error(actual, expected)
    if error > tolerance:
        diff = (actual - expected).abs().nan_to_num(0.0)
        where = (diff > tolerance).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: max error {error:.3e} exceeds {tolerance:.3e}; "
            f"first mismatches at {where}: got {actual[diff > tolerance][:5].tolist()}, "
            f"expected {expected[diff > tolerance][:5].tolist()}"
        )


def _settings(kwargs: dict) -> tuple:
    """(margin, scale, margin_grad, reduction, ignore_index, label_smoothing, interclass_filtering,
    subcenters) of a call's kwargs."""
    return (
        resolve_margin(kwargs.get("margin", "arcface")),
        float(kwargs.get("scale", 64.0)),
        kwargs.get("margin_grad", "detached"),
        kwargs.get("reduction", "mean"),
        int(kwargs.get("ignore_index", -100)),
        float(kwargs.get("label_smoothing", 0.0)),
        kwargs.get("interclass_filtering"),
        int(kwargs.get("subcenters", 1)),
    )


class Decision:
    """What the loss's pre-pass decides for a call on float64 inputs (for the bound, not the
    truth): the margin function, the negatives rule, the per-row term r_i, and ∂z_iy/∂a_i,
    ∂r_i/∂a_i in the norms a_i = ‖x_i‖ (zero where nothing depends on them)."""

    def __init__(self, margin, x: Tensor, c_target: Tensor, valid: Tensor, scale: float,
                 filtering: Optional[float]):
        self.negatives_rule = None if filtering is None else interclass_filtering(filtering, c_target, valid)
        zero = torch.zeros_like(c_target)
        self.regulariser, self.logit_in_norm, self.regulariser_in_norm = zero, zero, zero
        if not isinstance(margin, AdaptiveMargin):
            self.margin = margin
            return
        adaptive = copy.deepcopy(margin)
        norms = x.norm(dim=1).requires_grad_(True)
        decision = adaptive.for_call(MarginCall(c_target, norms, valid, local_batch_sum(valid)))
        self.margin = decision.margin
        self.negatives_rule = decision.negatives_rule if decision.negatives_rule is not None else self.negatives_rule
        logit = scale * self.margin(c_target)
        if logit.requires_grad:
            self.logit_in_norm = torch.autograd.grad(logit.sum(), norms, retain_graph=True)[0].abs()
        if decision.regulariser is not None:
            self.regulariser = decision.regulariser.detach().where(valid, zero)
            self.regulariser_in_norm = torch.autograd.grad(decision.regulariser.sum(), norms)[0].abs()


def arithmetic_bounds(
    x: Tensor, w: Tensor, y: Tensor, dtype: torch.dtype, upstream: Optional[Tensor] = None, **kwargs
) -> dict[str, float]:
    """The bound (module docstring) on the arithmetic error of the loss and of each gradient
    computed from inputs x, w in `dtype`, with labels y and `margin_cross_entropy`'s kwargs."""
    margin, scale, margin_grad, reduction, ignore_index, smoothing, filtering, subcenters = _settings(kwargs)
    x, w = x.to(dtype).double().cpu(), w.to(dtype).double().cpu()
    y = y.long().cpu()
    batch, dim = x.shape
    classes = w.shape[0] // subcenters
    valid = y != ignore_index
    rows = torch.where(valid, y, torch.zeros_like(y))
    cos, choice, near = _class_cosines(x, w, subcenters, 4 * cosine_bound(dtype, dim))
    c_target = cos.gather(1, rows[:, None]).squeeze(1).where(valid, torch.zeros_like(valid, dtype=cos.dtype))
    decision = Decision(margin, x, c_target, valid, scale, filtering)
    margin = decision.margin
    slope = margin_slope(margin, c_target).abs().where(valid, torch.ones_like(c_target))
    lipschitz = max(1.0, float(slope.max()))
    logits, slopes = negative_logits(cos, decision.negatives_rule, scale)
    if decision.negatives_rule is not None:
        rule = decision.negatives_rule
        lipschitz = max(lipschitz, float((rule.offset.abs() + 2 * abs(rule.quadratic)).max()))
        # a negative's logit jumps where its cosine crosses τ_i: no first-order bound covers a cosine
        # that a correct computation may put on either side (τ_i itself moves with c_iy by |ArcFace′|)
        margin_of_error = 4 * (1 + lipschitz) * cosine_bound(dtype, dim)
        off_target = torch.ones_like(cos, dtype=torch.bool)
        off_target[valid, rows[valid]] = False
        close = ((cos - rule.threshold[:, None]).abs() < margin_of_error) & off_target & valid[:, None]
        assert not bool(close.any()), (
            f"{int(close.sum())} negative cosine(s) within {margin_of_error:.1e} of their row's threshold: "
            "the bound does not cover the rule's jump there; choose other inputs"
        )
        slopes = slopes.abs() + 2 * abs(rule.quadratic) * scale * cosine_bound(dtype, dim)  # s(a + 2qc) errs by 2|q|sδc
    logits[valid, rows[valid]] = scale * margin(c_target)[valid].detach()
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - (1 - smoothing) * logits.gather(1, rows[:, None]).squeeze(1) - smoothing * logits.mean(dim=1)

    u_d, u_w = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[working_dtype(dtype)]
    norm_error = LAMBDA * math.sqrt(dim) * u_w * x.norm(dim=1)  # of each a_i = ‖x_i‖
    delta_z = scale * lipschitz * cosine_bound(dtype, dim) + float((decision.logit_in_norm * norm_error).max())
    delta_loss = 2 * delta_z + LAMBDA * math.sqrt(classes) * u_w * (2 * scale + loss.abs())
    delta_loss = delta_loss + LAMBDA * u_w * decision.regulariser.abs() + decision.regulariser_in_norm * norm_error
    rho = 2 * delta_z + LAMBDA * math.sqrt(batch + classes + dim) * u_w + 3 * u_d

    if reduction == "none":
        omega = (upstream if upstream is not None else torch.ones(batch)).double().cpu().abs()
    elif reduction == "sum":
        omega = torch.ones(batch, dtype=torch.float64)
    else:
        omega = torch.full((batch,), 1.0 / max(1, int(valid.sum())), dtype=torch.float64)
    omega = omega.where(valid, torch.zeros_like(omega))
    target = torch.full_like(cos, smoothing / classes)
    target[valid, rows[valid]] += 1 - smoothing
    probabilities = torch.softmax(logits, dim=1)
    terms = omega[:, None] * slopes.abs() * (probabilities + target)
    terms[valid, rows[valid]] = omega[valid] * scale * (probabilities + target)[valid, rows[valid]]
    if margin_grad == "exact":
        terms[valid, rows[valid]] *= slope[valid]
    p_target = (probabilities + target).gather(1, rows[:, None]).squeeze(1)
    through_norms = omega * (p_target * decision.logit_in_norm + decision.regulariser_in_norm)
    if reduction == "none":
        loss_bound = float(delta_loss.where(valid, torch.zeros_like(delta_loss)).max())
    else:
        loss_bound = float((delta_loss * omega).sum())
    # a class whose two best sub-centres are within reach of the cosines' error may send its
    # gradient to either: its terms count whole for each of its rows and for x (‖ŵ_k − ŵ_k′‖ ≤ 2)
    unsure = (terms * near).sum(dim=0).repeat_interleave(subcenters)
    x_norms = x.norm(dim=1).clamp_min(1e-12)
    return {
        "loss": loss_bound,
        "grad_embeddings": float((rho * (terms.sum(dim=1) / x_norms + through_norms)
                                  + 2 * (terms * near).sum(dim=1) / x_norms).max()),
        "grad_weight": float(((rho * _by_row(terms, choice, subcenters).sum(dim=0) + unsure)
                              / w.norm(dim=1).clamp_min(1e-12)).max()),
    }


def _by_row(terms: Tensor, choice: Optional[Tensor], subcenters: int) -> Tensor:
    """(B, C) terms placed at each class's chosen row of W: (B, C·K)."""
    if choice is None:
        return terms
    rows = torch.zeros(*terms.shape, subcenters, dtype=terms.dtype)
    return rows.scatter_(2, choice.unsqueeze(2), terms.unsqueeze(2)).flatten(1)


def _class_cosines(x: Tensor, w: Tensor, subcenters: int, reach: float) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """The class cosines (B, C), which sub-centre gives each (None for one per class), and where the
    best two sub-centres are closer than `reach` (B, C bool)."""
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1.0, 1.0)
    if subcenters == 1:
        return cos, None, torch.zeros_like(cos, dtype=torch.bool)
    grouped = cos.unflatten(1, (-1, subcenters))
    best_two = grouped.topk(2, dim=2).values
    best = grouped.max(dim=2)
    return best.values, best.indices, (best_two[..., 0] - best_two[..., 1]) < reach


def budgets(
    x: Tensor, w: Tensor, y: Tensor, dtype: torch.dtype, upstream: Optional[Tensor] = None, **kwargs
) -> tuple[Outcome, dict[str, float]]:
    """The float64 truth and, per field, the most a correct backend computing in `dtype` may be
    off from it: 2 × the torch backend's own error in `dtype` + rounding_d + arithmetic_d (module
    docstring). x, w are the float64 inputs, before any cast."""
    truth = run("torch", x.double(), w.double(), y, upstream=upstream, **kwargs)
    reference = run("torch", x.to(dtype), w.to(dtype), y, upstream=upstream, **kwargs)
    rounded = run("torch", x.to(dtype).double(), w.to(dtype).double(), y, upstream=upstream, **kwargs)
    bounds = arithmetic_bounds(x, w, y, dtype, upstream, **kwargs)
    limits = {}
    for field in ("loss", "grad_embeddings", "grad_weight"):
        expected = getattr(truth, field)
        limits[field] = (
            2 * max_error(getattr(reference, field), expected)
            + max_error(getattr(rounded, field), expected)
            + bounds[field]
        )
    return truth, limits


def assert_matches_truth(
    backend: str,
    x: Tensor,
    w: Tensor,
    y: Tensor,
    dtype: torch.dtype,
    slack: float = 0.0,
    layout: Optional[Callable[[Tensor], Tensor]] = None,
    **kwargs,
) -> None:
    """Check `backend` in `dtype` against float64 truth by docs/design.md §4's rule: loss, dX and dW.

    `layout` maps each input of the backend (after the cast to `dtype`) to the memory layout under
    test (a transpose, a strided view). `slack` widens every budget by an absolute amount, for
    inputs outside the first-order bound's reach (a test using it derives it and says why)."""
    upstream = None
    if kwargs.get("reduction") == "none":
        upstream = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        upstream = upstream.to(x.device)
    arrange = layout or (lambda t: t)
    truth, limits = budgets(x, w, y, dtype, upstream, **kwargs)
    candidate = run(backend, arrange(x.to(dtype)), arrange(w.to(dtype)), y, upstream=upstream, **kwargs)
    for field, limit in limits.items():
        assert_close(f"{backend}/{dtype}/{field}", getattr(candidate, field), getattr(truth, field), limit + slack)


def assert_predictions_are_nearest(prediction: Tensor, x: Tensor, w: Tensor, dtype: torch.dtype) -> None:
    """Each predicted class is a nearest class centre of its row, up to the cosines' rounding:
    its true cosine is within 2·δc of the row's largest (a float computation may resolve a near
    tie either way; exact ties go to the first class, which the tie tests check)."""
    cos = F.normalize(x.double().cpu(), dim=1) @ F.normalize(w.double().cpu(), dim=1).T
    chosen = cos.gather(1, prediction.cpu().long()[:, None]).squeeze(1)
    shortfall = cos.max(dim=1).values - chosen
    tolerance = 2 * cosine_bound(dtype, x.shape[1])
    assert bool((shortfall <= tolerance).all()), (
        f"predicted classes are not nearest: shortfall {shortfall.max():.3e} > {tolerance:.3e} at rows "
        f"{(shortfall > tolerance).nonzero().flatten()[:5].tolist()}"
    )


def usable_backends(device: str = "cpu") -> list[str]:
    """The backends that can run on float32 tensors of `device` here (the reference included)."""
    from marginfused.backends import REGISTRY as BACKENDS

    return [
        name for name, backend in BACKENDS.items()
        if backend.unavailable_reason() is None and backend.unsupported_reason(device, torch.float32) is None
    ]


def skip_unless_supported(backend: str, x: Tensor, w: Tensor) -> None:
    """pytest.skip, with the backend's own reason, when it cannot take these tensors."""
    import pytest

    from marginfused.backends import REGISTRY as BACKENDS

    reason = BACKENDS[backend].unsupported_reason(x.device, x.dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def shard_targets(x: Tensor, w: Tensor, y: Tensor, settings) -> tuple[Tensor, Tensor]:
    """(target logits, slopes) of the rows of y over all of w, as the loss's pre-pass computes them
    (`marginfused.target`), for tests that call a backend's kernels directly."""
    from marginfused.target import target_cosines, target_logits

    valid = y != settings.ignore_index
    target = target_logits(target_cosines(x, w, y, valid), valid, settings, x)
    return target.logit.detach(), target.slope


def kernel_settings(settings, num_classes: int, class_start: int = 0):
    """The kernels' settings of a call with these loss settings, no negatives rule."""
    from marginfused.backends import KernelSettings

    return KernelSettings.for_call(settings, num_classes, None, class_start)


def check_float16_keeps_the_negative_classes_gradient(backend: str, device: str) -> None:
    """At B = 1024, s = 64 the gradient tile's entries for negative classes, g·s·p, fall below
    float16's smallest subnormal (2⁻²⁴ ≈ 6e-8), where a cast flushes them to zero; a fused backend
    must scale the tile by a power of two before the cast and unscale in float32.

    Every embedding points along the last coordinate; the 1000 classes that hold the labels have a
    cosine of 0.05 with it, the 4000 negative classes none (their coordinates are disjoint: their
    cosines are exactly 0), so each negative class holds p ≈ e⁻¹⁰ of every row and
    G = g·s·p ≈ 3e-9 with g = 2⁻²⁰, summing over the batch to a gradient of ~1e-6 per class. Held
    to the truth by the suite's bound without the reference's term: the torch backend's own float16
    backward casts the same gradients unscaled, so its error is no yardstick here."""
    batch, classes, dim, negatives_from = 1024, 5000, 16, 1000
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(batch, dim, dtype=torch.float64)
    x[:, -1] = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
    w = torch.zeros(classes, dim, dtype=torch.float64)
    w[:negatives_from, dim // 2:-1] = torch.randn(negatives_from, dim // 2 - 1, generator=g, dtype=torch.float64)
    w[:negatives_from, -1] = 0.05 * w[:negatives_from, dim // 2:-1].norm(dim=1)
    w[negatives_from:, :dim // 2] = torch.randn(classes - negatives_from, dim // 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, negatives_from, (batch,), generator=g)
    upstream = torch.full((batch,), 2.0**-20, dtype=torch.float64)
    options = dict(reduction="none")
    truth = run("torch", x, w, y, upstream=upstream, **options)
    rounded = run("torch", x.half().double(), w.half().double(), y, upstream=upstream, **options)
    bound = arithmetic_bounds(x, w, y, torch.float16, upstream, **options)["grad_weight"]
    got = run(backend, x.half().to(device), w.half().to(device), y.to(device), upstream=upstream.to(device), **options)
    negative = slice(negatives_from, classes)
    assert float(truth.grad_weight[negative].abs().max()) > 1e-7  # what the cast would flush
    limit = max_error(rounded.grad_weight[negative], truth.grad_weight[negative]) + bound
    assert_close("negative classes' dW", got.grad_weight[negative].cpu(), truth.grad_weight[negative], limit)


def unit_embeddings_and_small_centres(batch: int, num_classes: int, dim: int, seed: int, device: str = "cpu"):
    """Unit embeddings against class centres of norm 0.01 (a head drawn at std 0.01 in a small
    dimension), float64: the gradient tiles carry 1/‖w_j‖ = 100, which a float16 backward must count
    when it lifts its tiles into float16's range (marginfused/backends/lift.py)."""
    x, w, y = make_inputs(batch, num_classes, dim, seed=seed, device=device)
    return F.normalize(x, dim=1), 0.01 * F.normalize(w, dim=1), y
