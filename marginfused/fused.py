"""The per-row loss of a fused backend as PyTorch custom operators, forward and backward.

Every fused backend computes two things (see `backend.Backend`): the partials of the logits over
a class range, and the backward of a class range given the max and sumexp of the partials over
all classes. Here they become two custom operators,

    marginfused::margin_loss(x, W, y, backend, margin and loss settings)
        -> (loss, prediction, row_max, row_sumexp)
        partials over all C classes, then ℓ_i = row_loss(...)   (see partials.py)
    marginfused::margin_loss_backward(x, W, y, row_max, row_sumexp, grad_loss, same settings,
                                      need_x, need_w) -> (dx, dW)   (empty where not needed)

joined by `register_autograd` and given shape functions by `register_fake`, so that autograd
needs nothing else and torch.compile traces a training step through the loss with no graph
break (the operators stay opaque calls in the compiled graph). Only `loss` is differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import Backend, RowLoss
from .config import LossConfig
from .margins import margin_from_spec
from .partials import row_loss


def _settings(config: LossConfig) -> tuple:
    """The config as the operators' scalar arguments."""
    m1, m2, m3 = config.margin.params
    return (
        int(config.margin.kind), int(config.margin.fallback_code), m1, m2, m3, config.scale,
        config.margin_grad == "exact", config.ignore_index, config.label_smoothing,
    )


def _config(kind, fallback, m1, m2, m3, scale, exact, ignore_index, label_smoothing) -> LossConfig:
    margin = margin_from_spec(kind, (m1, m2, m3), fallback)
    return LossConfig(margin, scale, "exact" if exact else "detached", ignore_index, label_smoothing)


def _backend(name: str) -> Backend:
    from .dispatch import BACKENDS  # dispatch imports the backends, which import this module

    return BACKENDS[name]


def _margin_loss(
    x: Tensor, w: Tensor, y: Tensor, backend: str, kind: int, fallback: int, m1: float, m2: float, m3: float,
    scale: float, exact: bool, ignore_index: int, label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    config = _config(kind, fallback, m1, m2, m3, scale, exact, ignore_index, label_smoothing)
    partials = _backend(backend).row_partials(x, w, y, config, 0)
    loss = row_loss(partials, y, ignore_index, label_smoothing, w.shape[0])
    return loss, partials.best_class, partials.max, partials.sumexp


margin_loss = torch.library.custom_op("marginfused::margin_loss", _margin_loss, mutates_args=())


@margin_loss.register_fake
def _(x, w, y, *settings):
    rows = x.shape[0]
    return (
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.int64),
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.float32),
    )


def _margin_loss_backward(
    x: Tensor, w: Tensor, y: Tensor, row_max: Tensor, row_sumexp: Tensor, grad_loss: Tensor, backend: str,
    kind: int, fallback: int, m1: float, m2: float, m3: float, scale: float, exact: bool, ignore_index: int,
    label_smoothing: float, need_x: bool, need_w: bool,
) -> tuple[Tensor, Tensor]:
    config = _config(kind, fallback, m1, m2, m3, scale, exact, ignore_index, label_smoothing)
    dx, dw = _backend(backend).shard_backward(
        x, w, y, config, 0, w.shape[0], row_max, row_sumexp, grad_loss, need_x, need_w
    )
    return _or_nothing(dx, x, need_x), _or_nothing(dw, w, need_w)


def _or_nothing(grad, like: Tensor, needed: bool) -> Tensor:
    """An operator returns tensors, not None: a gradient not needed is an empty tensor."""
    return grad if needed else like.new_empty(0)


margin_loss_backward = torch.library.custom_op(
    "marginfused::margin_loss_backward", _margin_loss_backward, mutates_args=()
)

IMPLEMENTATIONS = {
    "marginfused::margin_loss": _margin_loss,
    "marginfused::margin_loss_backward": _margin_loss_backward,
}
"""The Python implementation behind each operator, by name: `memory.AllocationTracker` runs them
itself so that it counts what they allocate (a dispatch mode sees an operator as one call)."""


@margin_loss_backward.register_fake
def _(x, w, *rest):
    need_x, need_w = rest[-2:]
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, w, y, *settings = inputs
    _, _, row_max, row_sumexp = output
    ctx.save_for_backward(x, w, y, row_max, row_sumexp)
    ctx.settings = settings


def _backward(ctx, grad_loss, grad_prediction, grad_max, grad_sumexp):
    x, w, y, row_max, row_sumexp = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    dx, dw = margin_loss_backward(
        x, w, y, row_max, row_sumexp, grad_loss.contiguous(), *ctx.settings, need_x, need_w
    )
    return (dx if need_x else None, dw if need_w else None) + (None,) * (1 + len(ctx.settings))


margin_loss.register_autograd(_backward, setup_context=_setup_context)


class FusedBackend(Backend):
    """A backend whose per-row loss is `marginfused::margin_loss` over its own `row_partials` and
    `shard_backward`: subclasses implement those two (and say where they can run)."""

    def per_row_loss(self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig) -> RowLoss:
        loss, prediction, _, _ = margin_loss(embeddings, weight, labels, self.name, *_settings(config))
        return RowLoss(loss, prediction)
