"""Per-row statistics of the logits over a range of classes, and the loss they give.

A fused backend never holds a row of logits. Walking the classes [start, stop) it keeps, per row i,

    max        m_i = max_j z_ij
    sumexp     s_i = Σ_j exp(z_ij − m_i)
    logit_sum  Σ_j z_ij                       (for label smoothing)
    best_cos   max_j c_ij,  best_class = argmax_j c_ij as a global class id

where z_ij = s·c_ij, except on each row's target column, which takes the target logit z_iy the
caller supplies (`marginfused.target`). Partials of disjoint class ranges merge exactly (logaddexp
of the (max, sumexp) pairs; sums add; the larger cosine wins), so a range can be a tile, a split of
the classes across thread blocks, or a shard of W on another rank. Over all C classes, with
lse_i = m_i + log s_i,

    ℓ_i = lse_i − (1 − ε)·z_iy − (ε / C)·Σ_j z_ij

which is `F.cross_entropy` with label smoothing ε; ignored rows get 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RowPartials(NamedTuple):
    """Per-row statistics over one class range; every field has shape (B,), in the working precision
    (float32, float64 for float64 inputs) but best_class (int64)."""

    max: Tensor
    sumexp: Tensor
    logit_sum: Tensor
    best_cos: Tensor
    best_class: Tensor


def merge_partials(a: RowPartials, b: RowPartials) -> RowPartials:
    """The partials of the union of two disjoint class ranges. Ties in best_cos keep `a`'s class."""
    top = torch.maximum(a.max, b.max)
    sumexp = a.sumexp * torch.exp(a.max - top) + b.sumexp * torch.exp(b.max - top)
    b_wins = b.best_cos > a.best_cos
    return RowPartials(
        max=top,
        sumexp=sumexp,
        logit_sum=a.logit_sum + b.logit_sum,
        best_cos=torch.where(b_wins, b.best_cos, a.best_cos),
        best_class=torch.where(b_wins, b.best_class, a.best_class),
    )


def log_sum_exp(partials: RowPartials) -> Tensor:
    """lse_i = m_i + log s_i."""
    return partials.max + torch.log(partials.sumexp)


def row_loss(
    partials: RowPartials, target_logit: Tensor, y: Tensor, ignore_index: int, label_smoothing: float,
    num_classes: int,
) -> Tensor:
    """ℓ_i from partials over all `num_classes` classes and the target logits z_iy; 0 where
    y == ignore_index."""
    loss = (
        log_sum_exp(partials)
        - (1.0 - label_smoothing) * target_logit
        - (label_smoothing / num_classes) * partials.logit_sum
    )
    return torch.where(y == ignore_index, torch.zeros_like(loss), loss)
