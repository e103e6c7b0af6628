"""The target pre-pass: each row's target logit and its slope, in PyTorch (docs/design.md §3.1).

The margin touches one logit per row, so it is evaluated here, on (B,) tensors, and never in a
kernel. For row i with label y_i (not ignored):

    c_iy = clamp(x̂_i · ŵ_{y_i}, −1, 1)           from the gathered rows of W: O(B·D), never O(C·D)
    z_iy = s · f(c_iy)                          autograd kept to whatever f depends on besides c
                                                (per-row parameters, a norm-dependent margin)
    σ_i  = ∂z_iy/∂c_iy = s                      margin_grad="detached" (straight-through)
                       = s · f′(c_iy)           margin_grad="exact" (the margin's closed form, or
                                                autograd at c clamped a hair inside ±1)

The fused kernels take z_iy in place of the target column's s·c_iy and σ_i for that column's
gradient; their backward returns ∂L/∂z_iy, which autograd carries into f's other inputs. c_iy
enters f detached: its gradient reaches x and W through σ_i inside the kernels, once.

An adaptive margin (`marginfused.adaptive`) decides f here, once per call, from the call's target
cosines and embedding norms; it may add a rule for the hard negatives' logits and a per-row term
of the loss. Inter-class filtering (a setting) is such a rule too (`marginfused.negatives`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .adaptive import AdaptiveMargin, CallMargin, MarginCall, local_batch_sum
from .constants import DERIVATIVE_EPS
from .margins import Margin, MarginFunction, working_dtype
from .checks import check_on_device
from .negatives import NegativesRule, interclass_filtering
from .normalize import normalize_rows
from .partials import LogSumExp
from .settings import LossSettings


class TargetLogits(NamedTuple):
    """Per row: z_iy (float32, or float64 for float64 inputs; differentiable in the margin's own
    inputs) and σ_i = ∂z_iy/∂c_iy (detached); ignored rows hold z = σ = 0. With them, the call's
    negatives rule (or None), the (B,) term the margin adds to each row's loss (or None; 0 on
    ignored rows), and an adaptive margin's new statistics, written by `commit_statistics` once
    the call has passed its checks."""

    logit: Tensor
    slope: Tensor
    negatives_rule: Optional[NegativesRule] = None
    regulariser: Optional[Tensor] = None
    statistics: tuple[tuple[Tensor, Tensor], ...] = ()


def target_cosines(x: Tensor, w: Tensor, column: Tensor, valid: Tensor, subcenters: int = 1) -> Tensor:
    """c_iy = clamp(x̂_i · ŵ_{column_i}, −1, 1) from the gathered rows of W (detached: O(B·D), and
    no gather backward allocating a W-shaped gradient), in the working dtype; 0 where not `valid`.
    With K sub-centres per class, the largest over the class's K rows (O(B·K·D))."""
    column = torch.where(valid, column, torch.zeros_like(column))
    rows = w.detach().unflatten(0, (-1, subcenters))[column]  # (B, K, D)
    dtype = working_dtype(x.dtype)
    x_hat = normalize_rows(x.detach().to(dtype))
    w_hat = normalize_rows(rows.to(dtype))
    cos = (x_hat.unsqueeze(1) * w_hat).sum(dim=2).amax(dim=1).clamp(-1.0, 1.0)
    return torch.where(valid, cos, torch.zeros_like(cos))


def margin_slope(margin: MarginFunction, cos: Tensor) -> Tensor:
    """f′(c) (detached): the margin's closed form, or forward-mode autograd of f at c clamped
    inside ±1 (a margin acts row by row: f′ is the derivative of each output in its own cosine).
    Forward mode traces under torch.compile, where `torch.autograd.grad` would break the graph."""
    if isinstance(margin, Margin):
        return margin.derivative(cos).detach()
    inside = cos.detach().clamp(-1.0 + DERIVATIVE_EPS, 1.0 - DERIVATIVE_EPS)
    _, slope = torch.func.jvp(lambda c: margin(c), (inside,), (torch.ones_like(inside),))
    return slope.detach()


def _decide(cos: Tensor, valid: Tensor, settings: LossSettings, x: Tensor,
            batch_sum: Optional[Callable[[Tensor], Tensor]]) -> CallMargin:
    """This call's margin: the settings' own, or an adaptive margin's decision (from the norms of
    the embeddings `x`, differentiable, and sums over the global batch)."""
    if not isinstance(settings.margin, AdaptiveMargin):
        return CallMargin(settings.margin)
    norms = x.to(working_dtype(x.dtype)).norm(dim=1).to(cos.dtype)
    call = MarginCall(cos, norms, valid, batch_sum or local_batch_sum(valid))
    return settings.margin.for_call(call)


def target_logits(cos: Tensor, valid: Tensor, settings: LossSettings, x: Tensor,
                  batch_sum: Optional[Callable[[Tensor], Tensor]] = None) -> TargetLogits:
    """z_iy = s·f(c_iy) and σ_i for the (B,) target cosines `cos` (detached) of the rows `valid`
    of the embeddings `x`, with this call's margin decided first (`_decide`; `batch_sum` is
    `MarginCall.batch_sum`, the local batch's when None), and the call's negatives rule."""
    cos = cos.detach()
    decision = _decide(cos, valid, settings, x, batch_sum)
    margin = decision.margin
    value = margin(cos)
    if not isinstance(value, Tensor) or value.shape != cos.shape:
        raise ValueError(
            f"margin must map the (B,) target cosines to a tensor of the same shape {tuple(cos.shape)}, "
            f"got {tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
        )
    logit = settings.scale * value.to(cos.dtype)
    if settings.margin_grad == "exact":
        slope = settings.scale * margin_slope(margin, cos).to(cos.dtype)
    else:
        slope = torch.full_like(cos, settings.scale)
    zero = torch.zeros_like(cos)
    rule = decision.negatives_rule
    if settings.interclass_filtering is not None:
        rule = interclass_filtering(settings.interclass_filtering, cos, valid)
    regulariser = decision.regulariser
    if regulariser is not None:
        regulariser = torch.where(valid, regulariser.to(cos.dtype), zero)
    return TargetLogits(torch.where(valid, logit, zero), torch.where(valid, slope, zero), rule, regulariser,
                        decision.statistics)


def with_regulariser(loss: Tensor, target: TargetLogits) -> Tensor:
    """The per-row loss plus the margin's per-row term, if it has one."""
    return loss if target.regulariser is None else loss + target.regulariser.to(loss.dtype)


NON_FINITE_MESSAGE = "margin: the target logits s·f(c) and slopes must be finite; the margin returned NaN or Inf"


def finite(target: TargetLogits, valid: Tensor) -> Tensor:
    """(B,) bool: the row's target logit and slope are finite, or the row is ignored."""
    return (torch.isfinite(target.logit.detach()) & torch.isfinite(target.slope)) | ~valid


def check_finite(target: TargetLogits, valid: Tensor) -> None:
    """A ValueError (`marginfused.checks.check_on_device`) where a valid row's target logit or
    slope is NaN or Inf."""
    check_on_device(finite(target, valid), NON_FINITE_MESSAGE)


def commit_statistics(target: TargetLogits) -> None:
    """Write an adaptive margin's new running statistics to its buffers (after the call's checks)."""
    with torch.no_grad():
        for buffer, value in target.statistics:
            buffer.copy_(value)


def target_logit_grad(lse: LogSumExp, target_logit: Tensor, upstream: Tensor, y: Tensor, ignore_index: int,
                      label_smoothing: float, num_classes: int) -> Tensor:
    """∂(Σ_i u_i ℓ_i)/∂z_iy = u_i·(p_iy − (1 − ε) − ε/C), p_iy = exp((z_iy − m_i) − log s_i) from the
    log-sum-exp over all classes; 0 for ignored rows. O(B): no kernel needed."""
    p = torch.exp((target_logit - lse.max) - lse.log_sumexp)
    grad = upstream * (p - (1.0 - label_smoothing) - label_smoothing / num_classes)
    return torch.where(y == ignore_index, torch.zeros_like(grad), grad)
