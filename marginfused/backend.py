"""What a backend is: the contract every implementation of the loss fulfils."""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from .config import LossConfig
from .partials import RowPartials


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run; the message says why."""


class RowLoss(NamedTuple):
    """A backend's answer for a batch.

    loss: (B,) per-row loss in float32 (float64 for float64 inputs), 0 for ignored rows,
        differentiable with respect to embeddings and weight.
    prediction: (B,) int64 argmax_j of the cosines c_ij (the class the embedding is nearest to),
        from which training accuracy is computed.
    """

    loss: Tensor
    prediction: Tensor


class Backend(abc.ABC):
    """One implementation of the per-row margin softmax loss.

    A backend says whether it can run on this machine at all (`unavailable_reason`) and, if so,
    whether it can run on tensors of a device type and dtype (`unsupported_reason`); both return None when it can,
    otherwise a sentence saying why not. Inputs reaching `per_row_loss` have passed
    `checks.check_inputs`.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not."""

    @abc.abstractmethod
    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on tensors of this device type and dtype, else why not."""

    @abc.abstractmethod
    def per_row_loss(self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig) -> RowLoss:
        """The per-row loss and the predicted class of each row."""

    @abc.abstractmethod
    def row_partials(
        self, embeddings: Tensor, weight: Tensor, labels: Tensor, config: LossConfig, class_start: int
    ) -> RowPartials:
        """Partials (see `partials.py`) of the logits over the classes [class_start, class_start + C)
        whose centres are the C rows of `weight`; labels are global class ids. No autograd."""

    @abc.abstractmethod
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
        """Gradients of Σ_i grad_rows_i · ℓ_i with respect to embeddings and weight through the logits
        of this class range alone, given the max m and sumexp s of the partials merged over all
        `num_classes` classes: lse_i = m_i + log s_i, kept in two parts so that float32 loses
        nothing when m is large.

        ∂ℓ_i/∂z_ij = p_ij − (1 − ε)[j = y_i] − ε/num_classes with p_ij = exp(z_ij − lse_i); the
        embeddings' gradients of disjoint ranges add up to the gradient of the whole loss. A
        gradient not needed (`need_x`, `need_w`) may be skipped and returned as None."""
