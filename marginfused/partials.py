"""Per-row statistics of the logits over class ranges, their one merge, and the loss they give.

A fused backend never holds a row of logits. Walking the classes [start, stop) it keeps, per row i,

    max        m_i = max_j z_ij
    sumexp     s_i = Σ_j exp(z_ij − m_i)
    logit_sum  Σ_j z_ij                       (for label smoothing)
    best_cos   max_j c_ij,  best_class = argmax_j c_ij as a global class id

where z_ij = s·c_ij, except on each row's target column, which takes the target logit z_iy the
caller supplies (`marginfused.target`). Partials of disjoint class ranges merge exactly (`merge`:
logaddexp of the (max, sumexp) pairs; sums add; the larger cosine wins), which is how a backend's
class splits, threads or chunks, and the ranks of a sharded head, are combined: every backend
returns its partials unmerged, stacked along a first dimension in class order.

The log-sum-exp over all C classes is kept in two float32 parts, `LogSumExp` (m_i, log s_i): the
backward forms p_ij = exp((z_ij − m_i) − log s_i), whose first difference is exact where p matters
(z near m), so p keeps float32's relative accuracy; a single float32 lse ≈ s rounds to ~4e-6 at
s = 64, and p_iy − 1 for a confident row would inherit that error. With it,

    ℓ_i = m_i + log s_i − (1 − ε)·z_iy − (ε / C)·Σ_j z_ij

which is `F.cross_entropy` with label smoothing ε; ignored rows get 0.

A backend whose forward also makes the weighted centres (O_i = Σ_j exp(z_ij − m_i)·…·w_j, a D-vector
per row: kernels/forward.py) merges them as it merges sumexp: `merge_centres`, and a sum taken
relative to one max is made relative to another by `rescaled` (a sharded head's ranks: each rank's
own max to the global one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RowPartials(NamedTuple):
    """Per-row statistics over class ranges: each field (B,), or (k, B) for k ranges in class order;
    float32 (float64 for float64 inputs) but best_class (int64)."""

    max: Tensor
    sumexp: Tensor
    logit_sum: Tensor
    best_cos: Tensor
    best_class: Tensor


class LogSumExp(NamedTuple):
    """lse_i = max_i + log_sumexp_i over all classes, in two parts (module docstring)."""

    max: Tensor
    log_sumexp: Tensor


def rescaled(sums: Tensor, from_max: Tensor, to_max: Tensor) -> Tensor:
    """Sums of exp(z_ij − m_i)-weighted terms taken relative to the per-row max `from_max`, made
    relative to `to_max`: sums·exp(from_max − to_max), the rows' factors broadcast over any
    trailing dimension of `sums` (a sumexp (…, B), weighted centres (…, B, D))."""
    factor = torch.exp(from_max - to_max)
    return sums * factor.reshape(*factor.shape, *(1,) * (sums.dim() - factor.dim()))


def merge(parts: RowPartials) -> RowPartials:
    """The partials of the union of k disjoint class ranges given stacked along dim 0, in class
    order: the largest max, the sums rescaled to it and added, the logit sums added, and the first
    range holding the largest cosine (its class the smallest among equal cosines, as argmax)."""
    top = parts.max.amax(dim=0)
    best_cos = parts.best_cos.amax(dim=0)
    winner = (parts.best_cos == best_cos).to(torch.uint8).argmax(dim=0, keepdim=True)  # the first maximal
    return RowPartials(
        max=top,
        sumexp=rescaled(parts.sumexp, parts.max, top).sum(dim=0),
        logit_sum=parts.logit_sum.sum(dim=0),
        best_cos=best_cos,
        best_class=parts.best_class.gather(0, winner).squeeze(0),
    )


def merge_centres(maxes: Tensor, centres: Tensor, top: Tensor) -> Tensor:
    """The weighted centres (B, D) of the union of k disjoint class ranges, given per range (k, B, D)
    relative to the range's max `maxes` (k, B), in class order: relative to `top` (the merged
    partials' max, which may take in ranges without weighted centres), as `merge` adds the sumexps."""
    return rescaled(centres, maxes, top).sum(dim=0)


def log_sum_exp(partials: RowPartials) -> LogSumExp:
    """(m_i, log s_i) of merged partials."""
    return LogSumExp(partials.max, torch.log(partials.sumexp))


def row_loss(lse: LogSumExp, logit_sum: Tensor, target_logit: Tensor, y: Tensor, ignore_index: int,
             label_smoothing: float, num_classes: int) -> Tensor:
    """ℓ_i from the log-sum-exp and logit sum over all `num_classes` classes and the target logits
    z_iy; 0 where y == ignore_index."""
    loss = (lse.max + lse.log_sumexp) - (1.0 - label_smoothing) * target_logit - (label_smoothing / num_classes) * logit_sum
    return torch.where(y == ignore_index, torch.zeros_like(loss), loss)
