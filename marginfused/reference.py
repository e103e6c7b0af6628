"""The `torch` backend: the reference every other backend is tested against.

Plain PyTorch that materialises the (B, C) logits, written to be obviously right:

    x̂_i = x_i / max(‖x_i‖, 1e-12),  ŵ_j = w_j / max(‖w_j‖, 1e-12)
    c_ij = clamp(x̂_i · ŵ_j, −1, 1)
    z_ij = s · c_ij (j ≠ y_i),  z_iy = s · f(c_iy)
    ℓ_i = F.cross_entropy(z_i, y_i, ignore_index, label_smoothing)

The clamp bounds the value only; the gradient passes through it unchanged, as in DESIGN §1's
gradient. The margin's gradient mode decides ∂z_iy/∂c_iy: s in "detached" mode, s·f′(c_iy) in
"exact" mode. Normalisation and the matmul run in the input dtype (as a plain PyTorch user
would); everything from the cosines on runs in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import Backend, RowLoss
from .config import LossConfig
from .constants import NORM_EPS
from .partials import RowPartials


def cosines(embeddings: Tensor, weight: Tensor) -> Tensor:
    """c = x̂ ŵᵀ clamped to [−1, 1] (value only), in float32 (float64 for float64 inputs)."""
    x_hat = F.normalize(embeddings, dim=1, eps=NORM_EPS)
    w_hat = F.normalize(weight, dim=1, eps=NORM_EPS)
    out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    cos = (x_hat @ w_hat.T).to(out_dtype)
    return cos + (cos.clamp(-1.0, 1.0) - cos).detach()


def margin_logits(cos: Tensor, labels: Tensor, config: LossConfig) -> Tensor:
    """z = s·c with the target column replaced by s·f(c_iy), in the configured gradient mode;
    rows labelled `ignore_index` have no target and keep z = s·c."""
    valid = labels != config.ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    c_target = cos.gather(1, target).squeeze(1)
    if config.margin_grad == "exact":
        slope = config.margin.derivative(c_target.detach())
    else:
        slope = torch.ones_like(c_target)
    # value f(c_iy); gradient slope · dc_iy
    z_target = config.margin(c_target.detach()) + slope * (c_target - c_target.detach())
    z_target = torch.where(valid, z_target, c_target)  # a row without a target keeps its cosines
    return config.scale * cos.scatter(1, target, z_target.unsqueeze(1))


def _normalized(rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(r̂, ‖r‖) per row in `dtype`, r̂ = r / max(‖r‖, 1e-12)."""
    rows = rows.to(dtype)
    norm = rows.norm(dim=1, keepdim=True)
    return rows / norm.clamp_min(NORM_EPS), norm


def _through_normalization(grad_hat: Tensor, hat: Tensor, norm: Tensor) -> Tensor:
    """∂/∂r from ∂/∂r̂ for r̂ = r / max(‖r‖, ε): (g − r̂ (r̂·g)) / ‖r‖, or g / ε where ‖r‖ < ε."""
    projected = (grad_hat - hat * (hat * grad_hat).sum(dim=1, keepdim=True)) / norm.clamp_min(NORM_EPS)
    return torch.where(norm < NORM_EPS, grad_hat / NORM_EPS, projected)


class TorchBackend(Backend):
    """The reference: materialises B×C logits; any device, any float dtype including float64."""

    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        return None

    def per_row_loss(self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig) -> RowLoss:
        cos = cosines(embeddings, weight)
        logits = margin_logits(cos, labels, config)
        loss = F.cross_entropy(
            logits,
            labels,
            ignore_index=config.ignore_index,
            label_smoothing=config.label_smoothing,
            reduction="none",
        )
        return RowLoss(loss, cos.detach().argmax(dim=1))

    def _range_logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig, class_start: int):
        """Cosines and logits of the classes [class_start, class_start + C); labels outside the
        range take no margin there (they are treated as ignored within it)."""
        local = labels - class_start
        inside = (local >= 0) & (local < weight.shape[0]) & (labels != config.ignore_index)
        local = torch.where(inside, local, torch.full_like(local, config.ignore_index))
        cos = cosines(embeddings, weight)
        return cos, margin_logits(cos, local, config), local, inside

    def row_partials(
        self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig, class_start: int
    ) -> RowPartials:
        with torch.no_grad():
            cos, logits, local, inside = self._range_logits(embeddings, weight, labels, config, class_start)
            top = logits.max(dim=1).values
            target = logits.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)
            best = cos.max(dim=1)
            return RowPartials(
                max=top,
                sumexp=torch.exp(logits - top.unsqueeze(1)).sum(dim=1),
                target=torch.where(inside, target, torch.zeros_like(target)),
                logit_sum=logits.sum(dim=1),
                best_cos=best.values,
                best_class=best.indices + class_start,
            )

    def shard_backward(
        self,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        config: LossConfig,
        class_start: int,
        num_classes: int,
        row_max: Tensor,
        row_sumexp: Tensor,
        grad_rows: Tensor,
        need_x: bool = True,
        need_w: bool = True,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        eps = config.label_smoothing
        with torch.no_grad():
            cos, logits, local, inside = self._range_logits(embeddings, weight, labels, config, class_start)
            probabilities = torch.exp(logits - row_max.unsqueeze(1)) / row_sumexp.unsqueeze(1)
            target = local.clamp(min=0).unsqueeze(1)
            onehot = torch.zeros_like(logits).scatter_(1, target, inside.unsqueeze(1).to(logits.dtype))
            weight_rows = torch.where(labels != config.ignore_index, grad_rows.to(logits.dtype), 0.0)
            # G_ij = ∂/∂c_ij = s · g_i · (p_ij − (1 − ε)[j = y_i] − ε/C), times f′(c_iy) at the target in exact mode
            grad_cos = config.scale * weight_rows.unsqueeze(1) * (probabilities - (1 - eps) * onehot - eps / num_classes)
            if config.margin_grad == "exact":
                slope = config.margin.derivative(cos.gather(1, target).squeeze(1))
                slope = torch.where(inside, slope, torch.ones_like(slope))
                grad_cos.scatter_(1, target, grad_cos.gather(1, target) * slope.unsqueeze(1))
            x_hat, x_norm = _normalized(embeddings, cos.dtype)
            w_hat, w_norm = _normalized(weight, cos.dtype)
            grad_x = _through_normalization(grad_cos @ w_hat, x_hat, x_norm).to(embeddings.dtype) if need_x else None
            grad_w = _through_normalization(grad_cos.T @ x_hat, w_hat, w_norm).to(weight.dtype) if need_w else None
        return grad_x, grad_w
