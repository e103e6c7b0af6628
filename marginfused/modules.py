"""`MarginSoftmaxLoss`: the loss as an nn.Module that owns the class centres."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .settings import LossSettings, check_reduction
from .functional import margin_cross_entropy
from .margins import MarginLike

WEIGHT_INIT_STD = 0.01


def store_settings(
    module: nn.Module,
    embedding_dim: int,
    num_classes: int,
    margin: MarginLike,
    scale: float,
    margin_grad: str,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    interclass_filtering: Optional[float],
    subcenters: int,
    backend: str,
) -> None:
    """Validate a loss head's settings and store them on `module` as attributes of those names
    (an adaptive margin module becomes a submodule: its statistics are in the head's state_dict)."""
    for name, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    settings = LossSettings.build(margin, scale, margin_grad, ignore_index, label_smoothing, interclass_filtering,
                                  subcenters)
    module.embedding_dim = embedding_dim
    module.num_classes = num_classes
    module.margin = settings.margin
    module.scale = settings.scale
    module.margin_grad = settings.margin_grad
    module.reduction = check_reduction(reduction)
    module.ignore_index = settings.ignore_index
    module.label_smoothing = settings.label_smoothing
    module.interclass_filtering = settings.interclass_filtering
    module.subcenters = settings.subcenters
    module.backend = backend


class MarginSoftmaxLoss(nn.Module):
    """A classification head of class centres trained with a margin softmax loss.

    `weight` is the (num_classes·subcenters, embedding_dim) Parameter of class centres (class j's
    sub-centres at rows j·subcenters …; one row per class by default), initialised from
    N(0, 0.01²) (the normalisation makes only the direction of each row matter; a small norm
    keeps the early gradients of W, which scale as 1/‖w_j‖, large). `forward(embeddings, labels)`
    returns `margin_cross_entropy(embeddings, self.weight, labels, ...)` with the settings given
    here; see that function for the formula and every argument. Every margin name works here,
    "adaface" and "curricularface" included: the head keeps the margin module (a submodule, its
    running statistics in the state_dict).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: MarginLike = "arcface",
        scale: float = 64.0,
        *,
        margin_grad: str = "detached",
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        interclass_filtering: Optional[float] = None,
        subcenters: int = 1,
        backend: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        store_settings(
            self, embedding_dim, num_classes, margin, scale, margin_grad, reduction, ignore_index, label_smoothing,
            interclass_filtering, subcenters, backend,
        )
        rows = num_classes * self.subcenters
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()
        if isinstance(self.margin, nn.Module):  # an adaptive margin's state follows the head's dtype and device
            self.margin.to(device=self.weight.device, dtype=self.weight.dtype)

    def reset_parameters(self) -> None:
        """Draw the class centres from N(0, 0.01²)."""
        nn.init.normal_(self.weight, mean=0.0, std=WEIGHT_INIT_STD)

    def forward(
        self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The loss of `embeddings` (B, embedding_dim) with `labels` (B,); see `margin_cross_entropy`."""
        return margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.margin,
            scale=self.scale,
            margin_grad=self.margin_grad,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            interclass_filtering=self.interclass_filtering,
            subcenters=self.subcenters,
            backend=self.backend,
            return_accuracy=return_accuracy,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, subcenters={self.subcenters}, "
            f"margin={self.margin}, scale={self.scale}, margin_grad={self.margin_grad!r}, "
            f"backend={self.backend!r}"
        )
