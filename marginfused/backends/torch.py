"""The `torch` backend: the reference every other backend is tested against.

Plain PyTorch that materialises the (B, C) logits, written to be obviously right:

    x̂_i = x_i / max(‖x_i‖, 1e-12),  ŵ_j = w_j / max(‖w_j‖, 1e-12)
    c_ij = clamp(x̂_i · ŵ_j, −1, 1)      (with K sub-centres, the largest over class j's K rows)
    z_ij = s · c_ij (j ≠ y_i),  z_iy = s · f(c_iy)
    ℓ_i = F.cross_entropy(z_i, y_i, ignore_index, label_smoothing)

The margin is the same PyTorch code the fused backends' pre-pass runs (`marginfused.target`),
applied to the target column of the materialised cosines, with ∂z_iy/∂c_iy = σ_i through a
straight-through term; a negatives rule (`marginfused.negatives`) applies to the other
columns, differentiated by autograd. The clamp bounds the value only; the gradient passes through
it unchanged.
Normalisation and the matmul run in the input dtype (as a plain PyTorch user would); everything
from the cosines on runs in float32, or float64 for float64 inputs.

Its shard pieces (`partials`, `gradients`) take the target logits and slopes like every fused
backend, so the class-sharded loss runs on it too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import WEIGHT_NOT_FINITE, check_on_device
from ..constants import NORM_EPS
from ..margins import working_dtype
from ..negatives import NegativesRule, negative_logits
from ..normalize import inverse_norms, normalize_rows
from ..partials import LogSumExp, RowPartials
from ..settings import LossSettings
from ..target import check_finite, commit_statistics, target_logits, with_regulariser
from .base import FUSED_DTYPES, KernelSettings, Requirements, RowLoss
from .ops import FusedBackend


def cosines(x: Tensor, w: Tensor) -> Tensor:
    """c = x̂ ŵᵀ clamped to [−1, 1] (value only), in the working dtype. The rows are normalised in
    the working dtype (in float16, 1e-12 itself would round to 0 and a zero row to 0/0) and the
    product taken in the inputs' dtype."""
    work = working_dtype(x.dtype)
    x_hat = normalize_rows(x.to(work)).to(x.dtype)
    w_hat = normalize_rows(w.to(work)).to(w.dtype)
    cos = (x_hat @ w_hat.T).to(work)
    return cos + (cos.clamp(-1.0, 1.0) - cos).detach()


def class_cosines(x: Tensor, w: Tensor, subcenters: int) -> tuple[Tensor, Optional[Tensor]]:
    """c (B, C) and, with K > 1 sub-centres per class (W's rows jK..jK+K−1), which of its K each
    class's cosine comes from (B, C), the first on ties: the max's gradient goes to it alone."""
    cos = cosines(x, w)
    if subcenters == 1:
        return cos, None
    best = cos.unflatten(1, (-1, subcenters)).max(dim=2)
    return best.values, best.indices


def _to_rows(grad_cos: Tensor, choice: Optional[Tensor], subcenters: int) -> Tensor:
    """∂/∂(cosines of W's rows) from ∂/∂c (B, C): each class's at its chosen sub-centre."""
    if choice is None:
        return grad_cos
    rows = torch.zeros(*grad_cos.shape, subcenters, dtype=grad_cos.dtype, device=grad_cos.device)
    return rows.scatter_(2, choice.unsqueeze(2), grad_cos.unsqueeze(2)).flatten(1)


def _with_targets(cos: Tensor, local: Tensor, inside: Tensor, logit: Tensor, slope: Tensor, scale: float,
                  rule: Optional[NegativesRule]) -> tuple[Tensor, Tensor]:
    """The logits and ∂z/∂c: s·c (or the rule's, for hard negatives) with the target column of the
    rows `inside` replaced by the target logit, whose gradient in c is the slope (straight-through)."""
    column = local.clamp(min=0).unsqueeze(1)
    negative, negative_slope = negative_logits(cos, rule, scale)
    c_target = cos.gather(1, column).squeeze(1)
    z_target = logit + slope * (c_target - c_target.detach())
    z_target = torch.where(inside, z_target, negative.gather(1, column).squeeze(1))
    z_slope = torch.where(inside, slope, negative_slope.gather(1, column).squeeze(1))
    return negative.scatter(1, column, z_target.unsqueeze(1)), negative_slope.scatter(1, column, z_slope.unsqueeze(1))


def _normalized(rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(r̂, 1/max(‖r‖, 1e-12)) per row in `dtype` (`marginfused.normalize`)."""
    rows = rows.to(dtype)
    return normalize_rows(rows), inverse_norms(rows).to(dtype).unsqueeze(1)


def _through_normalization(grad_hat: Tensor, hat: Tensor, inverse: Tensor) -> Tensor:
    """∂/∂r from ∂/∂r̂ for r̂ = r / max(‖r‖, ε): (g − r̂ (r̂·g)) / ‖r‖, or g / ε where ‖r‖ < ε
    (where the inverse norm is 1/ε)."""
    projected = (grad_hat - hat * (hat * grad_hat).sum(dim=1, keepdim=True)) * inverse
    return torch.where(inverse * NORM_EPS >= 1.0, grad_hat / NORM_EPS, projected)


class TorchBackend(FusedBackend):
    """The reference: materialises B×C logits; any device, any float dtype including float64. Its
    `partials` and `gradients` (the same math on a shard of W) let the class-sharded loss run on
    it too."""

    name = "torch"
    requirements = Requirements(device_type=None, dtypes=(torch.float64, *FUSED_DTYPES))
    holds_logits = True

    def unavailable_reason(self) -> Optional[str]:
        return None

    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        cos, _ = class_cosines(x, w, settings.subcenters)
        valid = y != settings.ignore_index
        column = torch.where(valid, y, torch.zeros_like(y))
        target = target_logits(cos.gather(1, column.unsqueeze(1)).squeeze(1), valid, settings, x)
        check_finite(target, valid)
        logits, _ = _with_targets(cos, column, valid, target.logit.to(cos.dtype), target.slope.to(cos.dtype),
                                  settings.scale, target.negatives_rule)
        partials = _partials(cos.detach(), logits.detach(), 0)
        check_on_device(partials.max.isfinite() & partials.sumexp.isfinite(), WEIGHT_NOT_FINITE)
        loss = F.cross_entropy(
            logits, y, ignore_index=settings.ignore_index, label_smoothing=settings.label_smoothing, reduction="none"
        )
        commit_statistics(target)
        return RowLoss(with_regulariser(loss, target), partials)

    def _range_logits(self, x, w, y, target_logit, target_slope, kernel: KernelSettings):
        """Cosines, chosen sub-centres, logits and ∂z/∂c of the shard's classes; labels outside the
        shard have no target there."""
        local = y - kernel.class_start
        inside = (local >= 0) & (local < kernel.shard_classes(w)) & (y != kernel.ignore_index)
        cos, choice = class_cosines(x, w, kernel.subcenters)
        logits, slopes = _with_targets(cos, torch.where(inside, local, torch.zeros_like(local)), inside,
                                       target_logit.to(cos.dtype), target_slope.to(cos.dtype), kernel.scale,
                                       kernel.negatives_rule)
        return cos, choice, logits, slopes, local, inside

    def partials(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings) -> RowPartials:
        with torch.no_grad():
            cos, _, logits, _, _, _ = self._range_logits(x, w, y, target_logit, torch.zeros_like(target_logit), kernel)
            return RowPartials(*(field.unsqueeze(0) for field in _partials(cos, logits, kernel.class_start)))

    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool,
                  need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        eps = kernel.label_smoothing
        with torch.no_grad():
            cos, choice, logits, slopes, local, inside = self._range_logits(x, w, y, target_logit, target_slope, kernel)
            probabilities = torch.exp((logits - lse.max.unsqueeze(1).to(logits)) - lse.log_sumexp.unsqueeze(1).to(logits))
            column = torch.where(inside, local, torch.zeros_like(local)).unsqueeze(1)
            onehot = torch.zeros_like(logits).scatter_(1, column, inside.unsqueeze(1).to(logits.dtype))
            weight_rows = torch.where(y != kernel.ignore_index, upstream.to(logits.dtype), 0.0)
            # ∂/∂c_ij = u_i · ∂z_ij/∂c_ij · (p_ij − (1 − ε)[j = y_i] − ε/C)
            grad_cos = slopes * weight_rows.unsqueeze(1) * (probabilities - (1 - eps) * onehot - kernel.smoothing_per_class)
            grad_cos = _to_rows(grad_cos, choice, kernel.subcenters)
            x_hat, x_inverse = _normalized(x, cos.dtype)
            w_hat, w_inverse = _normalized(w, cos.dtype)
            grad_x = _through_normalization(grad_cos @ w_hat, x_hat, x_inverse).to(x.dtype) if need_x else None
            grad_w = _through_normalization(grad_cos.T @ x_hat, w_hat, w_inverse).to(w.dtype) if need_w else None
        return grad_x, grad_w


def _partials(cos: Tensor, logits: Tensor, class_start: int) -> RowPartials:
    """The partials (B,) of materialised cosines and logits of the classes from `class_start`."""
    top = logits.max(dim=1).values
    best = cos.max(dim=1)
    return RowPartials(max=top, sumexp=torch.exp(logits - top.unsqueeze(1)).sum(dim=1), logit_sum=logits.sum(dim=1),
                       best_cos=best.values, best_class=best.indices + class_start)
