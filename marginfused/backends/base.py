"""What a backend is: the contract every implementation of the loss fulfils, and the registry.

The kernel contract (docs/design.md §3.1): a fused backend never evaluates a margin. For the
classes of one shard of W it computes the softmax cross-entropy over cosines in which each row's
target column takes a logit the caller supplies,

    z_ij = s·c_ij   (j ≠ y_i),        z_iy = target_logit_i,

(hard negatives, with a negative-logit rule, s·c_ij·(a_i + q·c_ij): `marginfused.negatives`)

forward as per-row partials (`marginfused.partials`), backward as the gradients with respect to
x and the shard of W, the target column's term entering through the caller's per-row slope
∂z_iy/∂c_iy (`target_slope`). The margin itself is PyTorch code on the target cosines
(`marginfused.target`), through which autograd carries ∂L/∂z_iy.

Names at this level are the math's: x (B×D embeddings), w (C×D class centres, or a shard of them
holding the classes [class_start, class_start + C)), y (B,) global class ids or ignore_index.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from ..negatives import HardNegatives
from ..partials import RowPartials
from ..settings import LossSettings


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The input dtypes the fused backends compute from (float64 inputs go to the torch backend)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run; the message says why."""


class RowLoss(NamedTuple):
    """A backend's answer for a batch.

    loss: (B,) per-row loss in float32 (float64 for float64 inputs), 0 for ignored rows,
        differentiable with respect to x, w and whatever the margin depends on.
    prediction: (B,) int64 argmax_j of the cosines c_ij (the class the embedding is nearest to),
        from which training accuracy is computed.
    """

    loss: Tensor
    prediction: Tensor


class RowGradients(NamedTuple):
    """What a backward takes per row (each (B,)): the target logit z_iy and slope σ_i of the
    pre-pass, the max and sumexp of the partials merged over all classes, grad_rows_i, the
    gradient of the loss with respect to ℓ_i, and the call's negative-logit rule (or None)."""

    target_logit: Tensor
    target_slope: Tensor
    row_max: Tensor
    row_sumexp: Tensor
    grad_rows: Tensor
    negatives: Optional[HardNegatives] = None


class Backend(abc.ABC):
    """One implementation of the per-row margin softmax loss.

    A backend says whether it can run on this machine at all (`unavailable_reason`) and, if so,
    whether it can run on tensors of a device type and dtype (`unsupported_reason`); both return
    None when it can, otherwise a sentence saying why not. Inputs reaching it have passed
    `marginfused.checks.check_inputs`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not."""

    @abc.abstractmethod
    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on tensors of this device type and dtype, else why not."""

    @abc.abstractmethod
    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        """The per-row loss (margin included) and the predicted class of each row."""

    @abc.abstractmethod
    def row_partials(
        self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, settings: LossSettings, class_start: int,
        negatives: Optional[HardNegatives] = None,
    ) -> RowPartials:
        """Partials (`marginfused.partials`) of the logits over the classes [class_start,
        class_start + C) whose centres are the C rows of `w`, the target column of row i (if in
        range) taking target_logit_i, hard negatives by the rule `negatives`. No autograd."""

    @abc.abstractmethod
    def backward(
        self, x: Tensor, w: Tensor, y: Tensor, rows: RowGradients, settings: LossSettings, class_start: int,
        num_classes: int, need_x: bool = True, need_w: bool = True,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Gradients of Σ_i grad_rows_i · ℓ_i with respect to x and this shard of w through the
        logits of its classes, given (`rows`) the max m and sumexp s of the partials merged over all
        `num_classes` classes (lse_i = m_i + log s_i, kept in two parts so that float32 loses
        nothing when m is large):

            ∂/∂c_ij = g_i · s · (p_ij − ε/C)                           j ≠ y_i
            ∂/∂c_iy = g_i · σ_i · (p_iy − (1 − ε) − ε/C)              σ_i = rows.target_slope_i

        (a hard negative's s becoming s·(a_i + 2q·c_ij), by the rule `rows.negatives`)

        with p_ij = exp(z_ij − lse_i), then through the normalisations. The x gradients of
        disjoint class ranges add up to the whole one. A gradient not needed may be skipped and
        returned as None."""


REGISTRY: dict[str, Backend] = {}
"""Every backend by name, fastest first (filled by `marginfused.backends`)."""
