"""The `torch` backend: the reference every other backend is tested against.

Plain PyTorch that materialises the (B, C) logits, written to be obviously right:

    x̂_i = x_i / max(‖x_i‖, 1e-12),  ŵ_j = w_j / max(‖w_j‖, 1e-12)
    c_ij = clamp(x̂_i · ŵ_j, −1, 1)      (with K sub-centres, the largest over class j's K rows)
    z_ij = s · c_ij (j ≠ y_i),  z_iy = s · f(c_iy)
    ℓ_i = F.cross_entropy(z_i, y_i, ignore_index, label_smoothing)

The margin is the same PyTorch code the fused backends' pre-pass runs (`marginfused.target`),
applied to the target column of the materialised cosines, with ∂z_iy/∂c_iy = σ_i through a
straight-through term; a negative-logit rule (`marginfused.negatives`) applies to the other
columns, differentiated by autograd. The clamp bounds the value only; the gradient passes through
it unchanged.
Normalisation and the matmul run in the input dtype (as a plain PyTorch user would); everything
from the cosines on runs in float32, or float64 for float64 inputs.

Its shard pieces (`row_partials`, `backward`) take the target logits and slopes like every fused
backend, so the class-sharded loss runs on it too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..constants import NORM_EPS
from ..margins import working_dtype
from ..negatives import HardNegatives, negative_logits
from ..normalize import inverse_norms, normalize_rows
from ..partials import RowPartials
from ..settings import LossSettings
from ..target import check_finite, target_logits, with_regulariser
from .base import Backend, RowGradients, RowLoss


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
                  negatives: Optional[HardNegatives]) -> tuple[Tensor, Tensor]:
    """The logits and ∂z/∂c: s·c (or the rule's, for hard negatives) with the target column of the
    rows `inside` replaced by the target logit, whose gradient in c is the slope (straight-through)."""
    column = local.clamp(min=0).unsqueeze(1)
    negative, negative_slope = negative_logits(cos, negatives, scale)
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


class TorchBackend(Backend):
    """The reference: materialises B×C logits; any device, any float dtype including float64."""

    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        return None

    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        cos, _ = class_cosines(x, w, settings.subcenters)
        valid = y != settings.ignore_index
        column = torch.where(valid, y, torch.zeros_like(y))
        target = target_logits(cos.gather(1, column.unsqueeze(1)).squeeze(1), valid, settings, x)
        check_finite(target, valid)
        logits, _ = _with_targets(cos, column, valid, target.logit.to(cos.dtype), target.slope.to(cos.dtype),
                                  settings.scale, target.negatives)
        loss = F.cross_entropy(
            logits, y, ignore_index=settings.ignore_index, label_smoothing=settings.label_smoothing, reduction="none"
        )
        return RowLoss(with_regulariser(loss, target), cos.detach().argmax(dim=1))

    def _range_logits(self, x, w, y, target_logit, target_slope, settings, class_start, negatives):
        """Cosines, chosen sub-centres, logits and ∂z/∂c of the classes [class_start, class_start + C);
        labels outside the range have no target there."""
        local = y - class_start
        inside = (local >= 0) & (local < w.shape[0] // settings.subcenters) & (y != settings.ignore_index)
        cos, choice = class_cosines(x, w, settings.subcenters)
        logits, slopes = _with_targets(cos, torch.where(inside, local, torch.zeros_like(local)), inside,
                                       target_logit.to(cos.dtype), target_slope.to(cos.dtype), settings.scale,
                                       negatives)
        return cos, choice, logits, slopes, local, inside

    def row_partials(
        self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, settings: LossSettings, class_start: int,
        negatives: Optional[HardNegatives] = None,
    ) -> RowPartials:
        with torch.no_grad():
            cos, _, logits, _, _, _ = self._range_logits(
                x, w, y, target_logit, torch.zeros_like(target_logit), settings, class_start, negatives
            )
            top = logits.max(dim=1).values
            best = cos.max(dim=1)
            return RowPartials(
                max=top,
                sumexp=torch.exp(logits - top.unsqueeze(1)).sum(dim=1),
                logit_sum=logits.sum(dim=1),
                best_cos=best.values,
                best_class=best.indices + class_start,
            )

    def backward(
        self, x: Tensor, w: Tensor, y: Tensor, rows: RowGradients, settings: LossSettings, class_start: int,
        num_classes: int, need_x: bool = True, need_w: bool = True,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        target_logit, target_slope, row_max, row_sumexp, grad_rows, negatives = rows
        eps = settings.label_smoothing
        with torch.no_grad():
            cos, choice, logits, slopes, local, inside = self._range_logits(
                x, w, y, target_logit, target_slope, settings, class_start, negatives
            )
            probabilities = torch.exp(logits - row_max.unsqueeze(1).to(logits)) / row_sumexp.unsqueeze(1).to(logits)
            column = torch.where(inside, local, torch.zeros_like(local)).unsqueeze(1)
            onehot = torch.zeros_like(logits).scatter_(1, column, inside.unsqueeze(1).to(logits.dtype))
            weight_rows = torch.where(y != settings.ignore_index, grad_rows.to(logits.dtype), 0.0)
            # ∂/∂c_ij = g_i · ∂z_ij/∂c_ij · (p_ij − (1 − ε)[j = y_i] − ε/C)
            grad_cos = slopes * weight_rows.unsqueeze(1) * (probabilities - (1 - eps) * onehot - eps / num_classes)
            grad_cos = _to_rows(grad_cos, choice, settings.subcenters)
            x_hat, x_inverse = _normalized(x, cos.dtype)
            w_hat, w_inverse = _normalized(w, cos.dtype)
            grad_x = _through_normalization(grad_cos @ w_hat, x_hat, x_inverse).to(x.dtype) if need_x else None
            grad_w = _through_normalization(grad_cos.T @ x_hat, w_hat, w_inverse).to(w.dtype) if need_w else None
        return grad_x, grad_w
