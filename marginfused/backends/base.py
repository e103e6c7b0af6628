"""What a backend is: the contract every implementation of the loss fulfils, what it needs to run,
and the one value that crosses the operator boundary.

The kernel contract (docs/design.md §3.1): a fused backend never evaluates a margin. For the
classes of one shard of W it computes the softmax cross-entropy over cosines in which each row's
target column takes a logit the caller supplies,

    z_ij = s·c_ij   (j ≠ y_i),        z_iy = target_logit_i,

(hard negatives, under a negatives rule, s·c_ij·(a_i + q·c_ij): `marginfused.negatives`), forward
as per-row partials (`marginfused.partials`), backward as the gradients with respect to x and the
shard of W, the target column's term entering through the caller's per-row slope ∂z_iy/∂c_iy.
The margin itself is PyTorch code on the target cosines (`marginfused.target`), through which
autograd carries ∂L/∂z_iy.

Names at this level are the math's: x (B×D embeddings), w (C·K×D class centres, or a shard of
them holding the classes [class_start, class_start + C)), y (B,) global class ids or ignore_index.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Optional

import torch
from torch import Tensor

from ..negatives import NegativesRule
from ..partials import LogSumExp, RowPartials, rescaled
from ..settings import LossSettings

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The input dtypes the fused backends compute from (float64 inputs go to the torch backend)."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run; the message says why."""


class RowLoss(NamedTuple):
    """A backend's answer for a batch.

    loss: (B,) per-row loss in float32 (float64 for float64 inputs), 0 for ignored rows,
        differentiable with respect to x, w and whatever the margin depends on.
    partials: the per-row partials over all classes (`marginfused.partials`), detached; their
        best_class is argmax_j c_ij, the class each embedding is nearest to (training accuracy).
    """

    loss: Tensor
    partials: RowPartials


class ForwardSaved(NamedTuple):
    """What a fused backend's forward keeps for its backward; a field it keeps not is empty (no
    elements), and its backward recomputes what it needs.

    weighted_centres: (B, D) float32, O_i = Σ_j exp(z_ij − m_i)·(∂z_ij/∂c_ij / s)·ŵ_j over the
        shard's classes but each row's target, relative to the per-row max m_i of the merged partials
        it came with (the triton backend's, made when x needs a gradient: kernels/forward.py).
    inv_x: (B,) float32, inv_w: (R,) float32: 1/max(‖v‖, 1e-12) of the rows of x and of the shard
        of W.
    """

    weighted_centres: Tensor
    inv_x: Tensor
    inv_w: Tensor

    @classmethod
    def nothing(cls, x: Tensor) -> "ForwardSaved":
        """Nothing kept (every field empty; three tensors, as an operator's outputs must be)."""
        return cls(*(x.new_empty(0, dtype=torch.float32) for _ in cls._fields))

    def relative_to(self, from_max: Tensor, to_max: Tensor) -> "ForwardSaved":
        """The weighted centres taken relative to the per-row max `from_max`, made relative to
        `to_max` (`marginfused.partials.rescaled`)."""
        if not self.weighted_centres.numel():
            return self
        return self._replace(weighted_centres=rescaled(self.weighted_centres, from_max, to_max))


@dataclass(frozen=True)
class KernelSettings:
    """What a fused backend reads of a call besides its tensors: built once per call, from settings
    validated once, and passed by keyword to the backend's `partials` and `gradients`.

    scale: the logit scale s. ignore_index: the label of rows that take no part.
    label_smoothing: ε. subcenters: K, rows of W per class. num_classes: C over every shard (ε/C).
    class_start: the first class of the shard of W at hand. negatives_rule: the call's rule for
    hard negatives (`marginfused.negatives`), or None.
    """

    scale: float
    ignore_index: int
    label_smoothing: float
    subcenters: int
    num_classes: int
    class_start: int = 0
    negatives_rule: Optional[NegativesRule] = None

    @classmethod
    def for_call(cls, settings: LossSettings, num_classes: int, negatives_rule: Optional[NegativesRule],
                 class_start: int = 0) -> "KernelSettings":
        rule = None if negatives_rule is None else negatives_rule.for_kernels()
        return cls(settings.scale, settings.ignore_index, settings.label_smoothing, settings.subcenters, num_classes,
                   class_start, rule)

    @property
    def smoothing_per_class(self) -> float:
        """ε/C."""
        return self.label_smoothing / self.num_classes

    def shard_classes(self, w: Tensor) -> int:
        """The classes of the shard `w` (its rows are whole classes of K sub-centres)."""
        return w.shape[0] // self.subcenters


@dataclass(frozen=True)
class Requirements:
    """What a backend needs of the tensors it takes: their device type, their dtype, and on CUDA
    the oldest compute capability whose code it checks (None: any)."""

    device_type: Optional[str]  # None: any device
    dtypes: tuple[torch.dtype, ...]
    min_capability: Optional[tuple[int, int]] = None
    capability_reason: str = ""

    def unsupported_reason(self, backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if tensors of this device and dtype fit, else a sentence saying why not."""
        if self.device_type is not None and device.type != self.device_type:
            return f"the {backend} backend runs on {self.device_type} tensors, got {device.type} tensors"
        if dtype not in self.dtypes:
            hint = "; use backend='torch'" if dtype == torch.float64 else ""
            shown = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"{dtype} inputs are not supported ({shown} only){hint}"
        if self.min_capability is not None and device.type == "cuda":
            capability = torch.cuda.get_device_capability(device)
            if capability < self.min_capability:
                return (f"needs a GPU of compute capability {self.min_capability[0]}.{self.min_capability[1]} or "
                        f"later, got {capability[0]}.{capability[1]} ({torch.cuda.get_device_name(device)}): "
                        f"{self.capability_reason}")
        return None


class Backend(abc.ABC):
    """One implementation of the per-row margin softmax loss: whether it can run on this machine at
    all (`unavailable_reason`), on which tensors (`requirements`), and the loss of a batch."""

    name: ClassVar[str]
    requirements: ClassVar[Requirements]
    holds_logits: ClassVar[bool] = False
    """Whether it holds the B × C logits in memory (the torch reference): `backend="auto"` never
    times it against the others."""

    @abc.abstractmethod
    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run on this machine, else why not."""

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on tensors of this device and dtype, else why not."""
        return self.requirements.unsupported_reason(self.name, torch.device(device), dtype)

    @abc.abstractmethod
    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        """The per-row loss (margin included) and the partials over all classes."""


REGISTRY: dict[str, Backend] = {}
"""Every backend by name, fastest first (filled by `marginfused.backends`)."""
