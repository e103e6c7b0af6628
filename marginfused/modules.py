"""`MarginSoftmaxLoss`: the loss as an nn.Module that owns the class centres."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import check_backend_name
from .checks import check_inputs
from .functional import loss_with_settings
from .margins import MarginLike
from .sampling import renumbered, sample_classes, sampled_rows
from .settings import LossSettings, check_reduction
from .values import is_integer, is_real

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
    """Validate a loss head's settings, once, and store them on `module`: the validated
    `LossSettings` as `settings` (what the loss reads), and each as an attribute of its name, to
    read (an adaptive margin module becomes a submodule: its statistics are in the head's
    state_dict)."""
    for name, value in (("embedding_dim", embedding_dim), ("num_classes", num_classes)):
        if not is_integer(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    settings = LossSettings.build(margin, scale, margin_grad, ignore_index, label_smoothing, interclass_filtering,
                                  subcenters)
    module.settings = settings
    module.embedding_dim = int(embedding_dim)
    module.num_classes = int(num_classes)
    module.margin = settings.margin
    module.scale = settings.scale
    module.margin_grad = settings.margin_grad
    module.reduction = check_reduction(reduction)
    module.ignore_index = settings.ignore_index
    module.label_smoothing = settings.label_smoothing
    module.interclass_filtering = settings.interclass_filtering
    module.subcenters = settings.subcenters
    module.backend = check_backend_name(backend)


def check_sample_rate(sample_rate: float) -> float:
    """Partial FC's sample rate, a number in (0, 1] (1: every class, no sampling)."""
    if not is_real(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return float(sample_rate)


class MarginSoftmaxLoss(nn.Module):
    """A classification head of class centres trained with a margin softmax loss.

    `weight` is the (num_classes·subcenters, embedding_dim) Parameter of class centres (class j's
    sub-centres at rows j·subcenters …; one row per class by default), initialised from
    N(0, 0.01²) (the normalisation makes only the direction of each row matter; a small norm
    keeps the early gradients of W, which scale as 1/‖w_j‖, large). `forward(embeddings, labels)`
    returns `margin_cross_entropy(embeddings, self.weight, labels, ...)` with the settings given
    here, checked once, at construction; see that function for the formula and every argument.
    Every margin name works here, "adaface" and "curricularface" included: the head keeps the
    margin module (a submodule, its running statistics in the state_dict).

    `sample_rate` < 1 is Partial FC in one process: each training step keeps the classes of the
    batch's labels and random others, ⌈sample_rate × num_classes⌉ in all (`marginfused.sampling`),
    and the loss, its gradients and the accuracy are exactly those over the sampled classes; in
    eval mode every class counts. The repr names the backend that ran, after the first call.
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
        sample_rate: float = 1.0,
        backend: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        store_settings(
            self, embedding_dim, num_classes, margin, scale, margin_grad, reduction, ignore_index, label_smoothing,
            interclass_filtering, subcenters, backend,
        )
        self.sample_rate = check_sample_rate(sample_rate)
        self.backend_ran: Optional[str] = None
        rows = num_classes * self.subcenters
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()
        if isinstance(self.margin, nn.Module):  # an adaptive margin's state follows the head's dtype and device
            self.margin.to(device=self.weight.device, dtype=self.weight.dtype)

    def reset_parameters(self) -> None:
        """Draw the class centres from N(0, 0.01²)."""
        nn.init.normal_(self.weight, mean=0.0, std=WEIGHT_INIT_STD)

    def forward(
        self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The loss of `embeddings` (B, embedding_dim) with `labels` (B,); see `margin_cross_entropy`.
        `generator` draws Partial FC's random classes (with `sample_rate` < 1)."""
        weight = self.weight
        if self.sample_rate < 1 and self.training:
            check_inputs(embeddings, weight, labels, self.ignore_index, margin=self.margin, subcenters=self.subcenters)
            index = sample_classes(labels, 0, self.num_classes, self.sample_rate, self.ignore_index, generator)
            weight = F.embedding(sampled_rows(index, self.subcenters), weight)
            labels, _ = renumbered(labels.long(), index, 0, self.ignore_index)
        return loss_with_settings(embeddings, weight, labels, self.settings, self.reduction, self.backend,
                                  return_accuracy, ran=self._ran)

    def _ran(self, backend: str) -> None:
        self.backend_ran = backend

    def extra_repr(self) -> str:
        ran = f", ran={self.backend_ran!r}" if self.backend_ran is not None else ""
        sampled = f", sample_rate={self.sample_rate}" if self.sample_rate < 1 else ""
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, subcenters={self.subcenters}, "
            f"margin={self.margin}, scale={self.scale}, margin_grad={self.margin_grad!r}, "
            f"backend={self.backend!r}{ran}{sampled}"
        )
