"""The loss's settings, validated once: what a call asks for besides its tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .adaptive import ADAPTIVE_NAMES, AdaptiveMargin
from .margins import MARGIN_NAMES, MarginFunction, MarginLike
from .values import is_integer, is_real

MARGIN_GRADS = ("detached", "exact")
REDUCTIONS = ("mean", "sum", "none")


def resolve_margin(margin: MarginLike) -> MarginFunction:
    """A margin function from a name or alias (literature defaults: a fixed margin of
    `marginfused.margins`, or an adaptive margin module of `marginfused.adaptive`), a margin
    object, or any callable f(cos) → cos′ on a (B,) tensor."""
    if isinstance(margin, str):
        cls = MARGIN_NAMES.get(margin.lower()) or ADAPTIVE_NAMES.get(margin.lower())
        if cls is None:
            known = ", ".join(sorted([*MARGIN_NAMES, *ADAPTIVE_NAMES]))
            raise ValueError(f"margin: unknown name {margin!r}; known names: {known}")
        return cls()
    if callable(margin):
        return margin
    raise TypeError(
        f"margin must be a name, a margin object (CosFace, ArcFace, ...) or a callable f(cos) -> cos', "
        f"got {type(margin).__name__}"
    )


def check_functional_margin(margin: MarginLike) -> None:
    """A loss function (not a head) resolves a name afresh on every call, so a margin with running
    statistics named by a string would start over each time: refuse it, saying what to pass."""
    if isinstance(margin, str) and margin.lower() in ADAPTIVE_NAMES:
        cls = ADAPTIVE_NAMES[margin.lower()]
        if any(True for _ in cls().buffers()):
            raise ValueError(
                f"margin={margin!r} keeps running statistics, which a name passed to a loss function would "
                f"start afresh on every call: pass one marginfused.{cls.__name__}() kept across calls, or use a "
                f"loss head (MarginSoftmaxLoss(..., margin={margin!r}))"
            )


@dataclass(frozen=True)
class LossSettings:
    """Everything that defines the per-row loss apart from the inputs. The fused backends read
    scale, ignore_index and label_smoothing; the margin and its gradient mode act on the target
    cosines before them (`marginfused.target`), and are None in the settings a kernel receives.

    margin_grad="detached": ∂z_iy/∂c_iy = s (straight-through; InsightFace, SphereFace-R, ExpFace).
    margin_grad="exact":    ∂z_iy/∂c_iy = s·f′(c_iy) (pytorch-metric-learning, original ArcFace).
    interclass_filtering: τ, InsightFace's filter (negatives with c_ij > τ take logit 0 and no
    gradient; `marginfused.negatives`), or None.
    subcenters: K, the class centres' rows per class (sub-centre ArcFace): W holds C·K rows, class
    j's at rows jK..jK+K−1, and c_ij is the largest of their cosines.
    """

    margin: Optional[MarginFunction]
    scale: float = 64.0
    margin_grad: Optional[str] = "detached"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    interclass_filtering: Optional[float] = None
    subcenters: int = 1

    @classmethod
    def build(
        cls,
        margin: MarginLike,
        scale: float,
        margin_grad: str,
        ignore_index: int,
        label_smoothing: float,
        interclass_filtering: Optional[float] = None,
        subcenters: int = 1,
    ) -> "LossSettings":
        """Validate user-facing arguments; raise TypeError/ValueError naming the bad one."""
        margin = resolve_margin(margin)
        if not is_real(scale):
            raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad must be one of {MARGIN_GRADS}, got {margin_grad!r}")
        if not is_integer(ignore_index):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not is_real(label_smoothing):
            raise TypeError(
                f"label_smoothing must be a real number, got {type(label_smoothing).__name__}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if interclass_filtering is not None:
            if not is_real(interclass_filtering):
                raise TypeError(
                    f"interclass_filtering must be None or a real number, got {type(interclass_filtering).__name__}"
                )
            if not -1.0 <= interclass_filtering < 1.0:
                raise ValueError(f"interclass_filtering must be in [-1, 1) (a cosine), got {interclass_filtering}")
            if isinstance(margin, AdaptiveMargin) and margin.has_negatives_rule:
                raise ValueError(
                    f"interclass_filtering cannot be combined with {type(margin).__name__}, which rules the "
                    "negatives' logits itself"
                )
            interclass_filtering = float(interclass_filtering)
        return cls(margin, float(scale), margin_grad, int(ignore_index), float(label_smoothing), interclass_filtering,
                   check_subcenters(subcenters))

    @classmethod
    def for_kernels(cls, scale: float, ignore_index: int, label_smoothing: float, subcenters: int = 1) -> "LossSettings":
        """The settings the fused kernels read (inside a custom operator, which takes numbers):
        the margin has already been applied to the target logits."""
        return cls(None, scale, None, ignore_index, label_smoothing, None, subcenters)


def check_subcenters(subcenters: int) -> int:
    if not is_integer(subcenters):
        raise TypeError(f"subcenters must be an int, got {type(subcenters).__name__}")
    if subcenters < 1:
        raise ValueError(f"subcenters must be >= 1, got {subcenters}")
    return int(subcenters)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction
