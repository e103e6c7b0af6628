"""The loss's settings, validated once: what a call asks for besides its tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .margins import MarginFunction, MarginLike, resolve_margin

MARGIN_GRADS = ("detached", "exact")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossSettings:
    """Everything that defines the per-row loss apart from the inputs. The fused backends read
    scale, ignore_index and label_smoothing; the margin and its gradient mode act on the target
    cosines before them (`marginfused.target`), and are None in the settings a kernel receives.

    margin_grad="detached": ∂z_iy/∂c_iy = s (straight-through; InsightFace, SphereFace-R, ExpFace).
    margin_grad="exact":    ∂z_iy/∂c_iy = s·f′(c_iy) (pytorch-metric-learning, original ArcFace).
    """

    margin: Optional[MarginFunction]
    scale: float = 64.0
    margin_grad: Optional[str] = "detached"
    ignore_index: int = -100
    label_smoothing: float = 0.0

    @classmethod
    def build(
        cls,
        margin: MarginLike,
        scale: float,
        margin_grad: str,
        ignore_index: int,
        label_smoothing: float,
    ) -> "LossSettings":
        """Validate user-facing arguments; raise TypeError/ValueError naming the bad one."""
        margin = resolve_margin(margin)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(
                f"label_smoothing must be a real number, got {type(label_smoothing).__name__}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        return cls(margin, float(scale), margin_grad, ignore_index, float(label_smoothing))

    @classmethod
    def for_kernels(cls, scale: float, ignore_index: int, label_smoothing: float) -> "LossSettings":
        """The settings the fused kernels read (inside a custom operator, which takes numbers):
        the margin has already been applied to the target logits."""
        return cls(None, scale, None, ignore_index, label_smoothing)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction
