"""`margin_cross_entropy`: the loss as a function."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .autocast import cast_for_autocast
from .backends import backend_for_call, check_backend_name
from .checks import check_inputs, labels_for_the_loss
from .margins import MarginLike
from .settings import LossSettings, check_functional_margin, check_reduction


def margin_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: MarginLike = "arcface",
    *,
    scale: float = 64.0,
    margin_grad: str = "detached",
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    interclass_filtering: Optional[float] = None,
    subcenters: int = 1,
    backend: str = "auto",
    return_accuracy: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Margin softmax cross-entropy of embeddings against class centres, without B×C logits
    where a fused backend runs.

    With x̂, ŵ the L2-normalised rows of `embeddings` (B×D) and `weight` (C×D),
    c_ij = clamp(x̂_i · ŵ_j, −1, 1), logits z_ij = s·c_ij except z_iy = s·f(c_iy) on the target
    column, and ℓ_i = logsumexp_j z_ij − z_iy (with label smoothing ε:
    (1−ε)ℓ_i + ε(logsumexp_j z_ij − mean_j z_ij)), exactly as `F.cross_entropy` defines it.

    Args:
        embeddings: (B, D) floating tensor.
        weight: (C·K, D) class centres, same dtype and device as `embeddings`: K = `subcenters` rows
            per class, class j's at rows j·K to j·K + K − 1 (one row per class by default).
        labels: (B,) integer class ids in [0, C), or `ignore_index` for rows that take no part.
        margin: a name ("cosface"/"additive", "arcface"/"angular", "sphereface"/"multiplicative",
            "expface"/"exponential", "combined", "magface", "elasticface") with literature defaults, a margin
            object (`CosFace`, `ArcFace`, `SphereFace`, `ExpFace`, `CombinedMargin`) whose
            parameters may be floats or (B,) tensors of per-row values, an adaptive margin module
            (`AdaFace`, `MagFace`, `CurricularFace`, `ElasticFace`; keep the same instance across
            calls: its running statistics advance on training-mode calls, which is why
            "adaface" and "curricularface" are names for loss heads only), or any differentiable
            callable f(cos) -> cos' on the (B,) tensor of target cosines (e.g.
            `lambda c: torch.cos(torch.acos(c) + 0.3) - 0.1`). The margin runs in PyTorch on the
            target cosines only (`marginfused.target`); autograd reaches whatever it depends on.
        scale: s, the logit scale (> 0).
        margin_grad: "detached" — ∂z_iy/∂c_iy = s (straight-through, InsightFace's choice);
            "exact" — ∂z_iy/∂c_iy = s·f′(c_iy) (a margin object's closed form, or autograd for
            a callable).
        reduction: "mean" over rows not ignored (NaN if every row is ignored, like
            `F.cross_entropy`), "sum", or "none" (per-row, 0 for ignored rows).
        ignore_index: label value marking rows that take no part.
        label_smoothing: ε in [0, 1).
        interclass_filtering: τ in [−1, 1), InsightFace's inter-class filtering: negatives whose
            cosine exceeds τ (likely the same identity under another label) take logit 0 and no
            gradient; None (default) filters nothing. Not with CurricularFace.
        subcenters: K, sub-centre ArcFace's sub-centres per class: c_ij is the largest cosine of
            class j's K rows, and its gradient goes to that row alone (the first on ties).
            `marginfused.subcenter_outliers` finds each class's dominant sub-centre and the
            samples far from it.
        backend: "auto" (fastest usable for the tensors' device), or one of
            `available_backends()`; a backend named here that cannot run raises
            `BackendUnavailableError` saying why.
        return_accuracy: also return the training accuracy: the fraction of rows not ignored
            whose nearest class centre (argmax_j c_ij, no margin) is their label.

    Returns:
        The loss in float32 (float64 for float64 inputs), and with `return_accuracy` a
        (loss, accuracy) pair, accuracy a 0-dim float32 tensor.

    Under `torch.autocast` for the inputs' device, embeddings and weight are cast once to the
    autocast dtype (so they may arrive in different dtypes), the cosine matmul runs in it, and
    everything after the matmul stays in float32; gradients flow back to the original dtypes
    (see `marginfused.autocast`).
    """
    check_functional_margin(margin)
    settings = LossSettings.build(margin, scale, margin_grad, ignore_index, label_smoothing, interclass_filtering,
                                  subcenters)
    return loss_with_settings(embeddings, weight, labels, settings, check_reduction(reduction),
                              check_backend_name(backend), return_accuracy)


def loss_with_settings(embeddings: Tensor, weight: Tensor, labels: Tensor, settings: LossSettings, reduction: str,
                       backend: str, return_accuracy: bool,
                       ran: Optional[Callable[[str], None]] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """`margin_cross_entropy` with its settings, reduction and backend name already checked (a head
    checks them once, at construction); `ran` is told which backend ran."""
    embeddings, weight, autocast_off = cast_for_autocast(embeddings, weight)
    with autocast_off:
        check_inputs(embeddings, weight, labels, settings.ignore_index, margin=settings.margin,
                     subcenters=settings.subcenters)
        labels = labels_for_the_loss(labels, weight.shape[0] // settings.subcenters, settings.ignore_index)
        implementation = backend_for_call(backend, embeddings, weight, labels, settings)
        if ran is not None:
            ran(implementation.name)
        per_row, partials = implementation.per_row_loss(embeddings, weight, labels, settings)
    valid = labels != settings.ignore_index
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        loss = per_row.sum() / valid.sum()
    if not return_accuracy:
        return loss
    correct = (partials.best_class == labels) & valid
    accuracy = correct.sum(dtype=torch.float32) / valid.sum(dtype=torch.float32)
    return loss, accuracy
