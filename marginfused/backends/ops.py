"""The fused backends' per-row loss as PyTorch custom operators, forward and backward.

Every fused backend computes two things (`base.Backend`): the partials of the logits over a class
range, and the backward of a class range given the max and sumexp of the partials over all
classes. Here they become two custom operators,

    marginfused::margin_loss(x, w, y, target_logit, target_slope, hard_threshold, hard_offset,
                             backend, scale, ignore_index, label_smoothing, hard_quadratic,
                             subcenters) -> (loss, prediction, row_max, row_sumexp)
        partials over all C classes, then ℓ_i = row_loss(...)   (`marginfused.partials`)
    marginfused::margin_loss_backward(x, w, y, target_logit, target_slope, hard_threshold,
                                      hard_offset, row_max, row_sumexp, grad_rows, backend, scale,
                                      ignore_index, label_smoothing, hard_quadratic, subcenters,
                                      need_x, need_w) -> (dx, dw)   (empty where not needed)

(hard_threshold, hard_offset, hard_quadratic: the negative-logit rule, `marginfused.negatives`;
None, None, 0 without one. subcenters: W's rows per class, C = rows / subcenters.)

joined by `register_autograd` and given shape functions by `register_fake`, so that autograd
needs nothing else and torch.compile traces a training step through the loss with no graph
break. `loss` is differentiable in x, w and target_logit: ∂L/∂z_iy = g_i·(p_iy − (1−ε) − ε/C)
is O(B) and computed here, and autograd carries it into the margin's own inputs
(`marginfused.target`). The backend is looked up by name in `base.REGISTRY`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from typing import Optional

from ..negatives import HardNegatives
from ..partials import row_loss
from ..settings import LossSettings
from ..target import check_finite, target_cosines, target_logit_grad, target_logits, with_regulariser
from .base import REGISTRY, Backend, RowGradients, RowLoss


def _rule(threshold: Optional[Tensor], offset: Optional[Tensor], quadratic: float) -> Optional[HardNegatives]:
    return None if threshold is None else HardNegatives(threshold, offset, quadratic)


def _margin_loss(
    x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, hard_threshold: Optional[Tensor],
    hard_offset: Optional[Tensor], backend: str, scale: float, ignore_index: int, label_smoothing: float,
    hard_quadratic: float, subcenters: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    settings = LossSettings.for_kernels(scale, ignore_index, label_smoothing, subcenters)
    negatives = _rule(hard_threshold, hard_offset, hard_quadratic)
    partials = REGISTRY[backend].row_partials(x, w, y, target_logit, settings, 0, negatives)
    loss = row_loss(partials, target_logit, y, ignore_index, label_smoothing, w.shape[0] // subcenters)
    return loss, partials.best_class, partials.max, partials.sumexp


margin_loss = torch.library.custom_op("marginfused::margin_loss", _margin_loss, mutates_args=())


@margin_loss.register_fake
def _(x, w, y, target_logit, target_slope, *settings):
    rows = x.shape[0]
    return (
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.int64),
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.float32),
    )


def _margin_loss_backward(
    x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, hard_threshold: Optional[Tensor],
    hard_offset: Optional[Tensor], row_max: Tensor, row_sumexp: Tensor, grad_rows: Tensor, backend: str,
    scale: float, ignore_index: int, label_smoothing: float, hard_quadratic: float, subcenters: int, need_x: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor]:
    settings = LossSettings.for_kernels(scale, ignore_index, label_smoothing, subcenters)
    negatives = _rule(hard_threshold, hard_offset, hard_quadratic)
    rows = RowGradients(target_logit, target_slope, row_max, row_sumexp, grad_rows, negatives)
    dx, dw = REGISTRY[backend].backward(x, w, y, rows, settings, 0, w.shape[0] // subcenters, need_x, need_w)
    return _or_nothing(dx, x, need_x), _or_nothing(dw, w, need_w)


def _or_nothing(grad, like: Tensor, needed: bool) -> Tensor:
    """An operator returns tensors, not None: a gradient not needed is an empty tensor."""
    return grad if needed else like.new_empty(0)


margin_loss_backward = torch.library.custom_op(
    "marginfused::margin_loss_backward", _margin_loss_backward, mutates_args=()
)


@margin_loss_backward.register_fake
def _(x, w, *rest):
    need_x, need_w = rest[-2:]
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, w, y, target_logit, target_slope, hard_threshold, hard_offset, *settings = inputs
    _, _, row_max, row_sumexp = output
    ctx.save_for_backward(x, w, y, target_logit, target_slope, hard_threshold, hard_offset, row_max, row_sumexp)
    ctx.settings = settings


def _backward(ctx, grad_rows, grad_prediction, grad_max, grad_sumexp):
    x, w, y, target_logit, target_slope, hard_threshold, hard_offset, row_max, row_sumexp = ctx.saved_tensors
    backend, scale, ignore_index, label_smoothing, hard_quadratic, subcenters = ctx.settings
    need_x, need_w, need_target = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:4]
    grad_rows = grad_rows.contiguous()
    dx = dw = grad_target = None
    if need_x or need_w:
        dx, dw = margin_loss_backward(
            x, w, y, target_logit, target_slope, hard_threshold, hard_offset, row_max, row_sumexp, grad_rows,
            *ctx.settings, need_x, need_w,
        )
    if need_target:
        grad_target = target_logit_grad(
            row_max, row_sumexp, target_logit, grad_rows, y, ignore_index, label_smoothing, w.shape[0] // subcenters
        )
    return (dx if need_x else None, dw if need_w else None, None, grad_target) + (None,) * (3 + len(ctx.settings))


margin_loss.register_autograd(_backward, setup_context=_setup_context)


class FusedBackend(Backend):
    """A backend whose per-row loss is the target pre-pass (`marginfused.target`) and then
    `marginfused::margin_loss` over its own `row_partials` and `backward`: subclasses implement
    those two (and say where they can run)."""

    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        valid = y != settings.ignore_index
        target = target_logits(target_cosines(x, w, y, valid, settings.subcenters), valid, settings, x)
        check_finite(target, valid)
        threshold, offset, quadratic = (None, None, 0.0) if target.negatives is None else target.negatives.for_kernels()
        loss, prediction, _, _ = margin_loss(
            x, w, y, target.logit.float(), target.slope.float(), threshold, offset, self.name, settings.scale,
            settings.ignore_index, settings.label_smoothing, quadratic, settings.subcenters,
        )
        return RowLoss(with_regulariser(loss, target), prediction)
