"""The margins: the function f(c) that replaces the target cosine c = cos θ, in PyTorch.

Every margin softmax loss computes, for embedding i and its label y_i,

    z_ij = s · c_ij            for every class j ≠ y_i
    z_iy = s · f(c_iy)         for the target class only

and then a softmax cross-entropy over z. The margins differ only in f:

    CosFace        f(c) = c − m                               f′(c) = 1
    ArcFace        f(c) = cos(θ + m)                          f′(c) = sin(θ + m) / sin θ
    SphereFace     f(c) = (−1)^k cos(mθ) − 2k,  k = ⌊mθ/π⌋    f′(c) = (−1)^k m sin(mθ) / sin θ
    ExpFace        f(c) = cos(π (θ/π)^m)                      f′(c) = m (θ/π)^(m−1) sin(π (θ/π)^m) / sin θ
    CombinedMargin f(c) = cos(m1 θ + m2) − m3                 f′(c) = m1 sin(m1 θ + m2) / sin θ

with θ = arccos(c). Where f′ divides by sin θ, θ is taken from c clamped to
[−1 + DERIVATIVE_EPS, 1 − DERIVATIVE_EPS], so f′ stays finite at c = ±1.

This module is the only place a margin formula exists: the fused kernels never evaluate one (they
take each row's target logit and slope, `marginfused.target`). A margin is any differentiable
PyTorch function of a (B,) tensor of target cosines; the built-in ones are frozen dataclasses whose
parameters are floats or (B,) tensors of per-row values (AdaFace-style adaptive margins, or a
margin per identity), and which also give f′ in closed form (`derivative`). Any other callable
f(cos) → cos′ works too; its f′ comes from autograd.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .constants import DERIVATIVE_EPS
from .values import is_real

Parameter = Union[float, Tensor]
"""A margin parameter: one value for every row, or a (B,) tensor of per-row values."""


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other dtype: the precision every backend
    computes in after the cosine matmul, and the margins' precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _theta(cos: Tensor) -> Tensor:
    """θ = arccos(c) for f: c clamped to [−1, 1]."""
    return torch.acos(cos.to(working_dtype(cos.dtype)).clamp(-1.0, 1.0))


def _theta_inside(cos: Tensor) -> Tensor:
    """θ = arccos(c) for f′: c clamped a hair inside ±1, so sin θ > 0."""
    c = cos.to(working_dtype(cos.dtype))
    return torch.acos(c.clamp(-1.0 + DERIVATIVE_EPS, 1.0 - DERIVATIVE_EPS))


def _check_parameter(owner: str, name: str, value: object, low: float, high: float = math.inf,
                     low_open: bool = False, high_open: bool = False) -> Parameter:
    """A float in the range, or a floating tensor of at most one dimension whose values all are."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.dim() > 1:
            raise TypeError(f"{owner}: {name} must be a float or a 1-D floating tensor of per-row values, "
                            f"got a {value.dim()}-D {value.dtype} tensor")
        values = value.detach()
    elif not is_real(value):
        raise TypeError(f"{owner}: {name} must be a real number or a (B,) tensor, got {type(value).__name__}")
    else:
        value = float(value)
        values = None
    if values is not None and values.numel() == 0:
        return value
    if values is None:
        inside = math.isfinite(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    else:
        inside = bool(torch.isfinite(values).all()) and bool(((values > low) if low_open else (values >= low)).all()) \
            and bool(((values < high) if high_open else (values <= high)).all())
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        shown = value if values is None else f"values in [{values.min():g}, {values.max():g}]"
        raise ValueError(f"{owner}: {name} must be finite and in {interval}, got {shown}")
    return value


def _per_row(value: Parameter, like: Tensor) -> Union[float, Tensor]:
    """A parameter ready to combine with the (B,) cosines `like`: a float, or a tensor in their
    dtype and device (its own autograd graph kept)."""
    return value.to(device=like.device, dtype=like.dtype) if isinstance(value, Tensor) else value


@dataclass(frozen=True)
class Margin(abc.ABC):
    """A built-in margin f applied to the target cosines; subclasses are frozen dataclasses whose
    constructor checks their parameters (`_check`)."""

    _validate: bool = field(default=True, repr=False, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        if self._validate:
            self._check()

    @abc.abstractmethod
    def _check(self) -> None:
        """Check (and normalise) the parameters; raise TypeError or ValueError naming the bad one."""

    @abc.abstractmethod
    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        """f as a function of θ (and c, for margins defined on c directly)."""

    @abc.abstractmethod
    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        """f′(c) with θ strictly inside (0, π)."""

    @classmethod
    def unchecked(cls, **parameters: Parameter):
        """The margin with these parameters taken as valid: no range checks, so no host
        synchronisation on per-row tensors, and traceable by torch.compile. For values built valid
        by construction (an adaptive margin's own); users' values go through the constructor."""
        return cls(**parameters, _validate=False)

    def __call__(self, cos: Tensor) -> Tensor:
        """f(c), differentiable (in c and in tensor parameters), in the dtype of `cos`."""
        c = cos.to(working_dtype(cos.dtype))
        return self._value(_theta(cos), c).to(cos.dtype)

    def derivative(self, cos: Tensor) -> Tensor:
        """f′(c), in the dtype of `cos`; finite at c = ±1 (θ clamped inside (0, π))."""
        c = cos.to(working_dtype(cos.dtype))
        return self._slope(_theta_inside(cos), c).to(cos.dtype)


@dataclass(frozen=True)
class CosFace(Margin):
    """CosFace / AM-Softmax, the additive cosine margin: f(c) = c − m, f′(c) = 1.

    Literature: m = 0.35 with s = 64 (CosFace), s = 30 (AM-Softmax); InsightFace configs use m = 0.4.
    """

    m: Parameter = 0.35

    def _check(self) -> None:
        object.__setattr__(self, "m", _check_parameter("CosFace", "m", self.m, 0.0))

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return cos - _per_row(self.m, cos)

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        return torch.ones_like(cos)


@dataclass(frozen=True)
class ArcFace(Margin):
    """ArcFace, the additive angular margin: f(c) = cos(θ + m), f′(c) = sin(θ + m) / sin θ.

    cos(θ + m) stops decreasing past θ > π − m. `fallback` says what happens there:

    - None: nothing (current InsightFace).
    - "linear": f(c) = c − m·sin m where c ≤ cos(π − m), f′ = 1 there (older InsightFace code,
      pytorch-metric-learning).
    - "easy": f(c) = c where c ≤ 0, f′ = 1 there ("easy margin").

    Literature: m = 0.5, s = 64.
    """

    m: Parameter = 0.5
    fallback: Optional[str] = None

    def _check(self) -> None:
        object.__setattr__(self, "m", _check_parameter("ArcFace", "m", self.m, 0.0, math.pi, high_open=True))
        if self.fallback not in (None, "linear", "easy"):
            raise ValueError(f'ArcFace: fallback must be None, "linear" or "easy", got {self.fallback!r}')

    def _outside(self, cos: Tensor, m: Union[float, Tensor]) -> Optional[Tensor]:
        """Where the fallback replaces cos(θ + m), or None without a fallback."""
        if self.fallback == "linear":
            return cos <= torch.cos(math.pi - torch.as_tensor(m, dtype=cos.dtype, device=cos.device))
        if self.fallback == "easy":
            return cos <= 0
        return None

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        m = _per_row(self.m, cos)
        arc = torch.cos(theta + m)
        outside = self._outside(cos, m)
        if outside is None:
            return arc
        replacement = cos - m * torch.sin(torch.as_tensor(m, dtype=cos.dtype, device=cos.device)) if self.fallback == "linear" else cos
        return torch.where(outside, replacement, arc)

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        m = _per_row(self.m, cos)
        arc = torch.sin(theta + m) / torch.sin(theta)
        outside = self._outside(cos, m)
        if outside is None:
            return arc
        return torch.where(outside, torch.ones_like(arc), arc)


@dataclass(frozen=True)
class SphereFace(Margin):
    """SphereFace, the multiplicative angular margin, made monotonic in θ:

    f(c) = (−1)^k cos(mθ) − 2k with k = ⌊mθ/π⌋,   f′(c) = (−1)^k m sin(mθ) / sin θ.

    Literature: m = 1.7 with s = 30 or 64 (SphereFace-R); the original paper used m = 4.
    """

    m: Parameter = 1.7

    def _check(self) -> None:
        object.__setattr__(self, "m", _check_parameter("SphereFace", "m", self.m, 1.0))

    def _k_and_sign(self, theta: Tensor, m) -> tuple[Tensor, Tensor]:
        k = torch.floor(m * theta.detach() / math.pi)
        if isinstance(m, Tensor):
            k = k.detach()
        return k, 1.0 - 2.0 * torch.remainder(k, 2.0)

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        m = _per_row(self.m, cos)
        k, sign = self._k_and_sign(theta, m)
        return sign * torch.cos(m * theta) - 2.0 * k

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        m = _per_row(self.m, cos)
        _, sign = self._k_and_sign(theta, m)
        return sign * m * torch.sin(m * theta) / torch.sin(theta)


@dataclass(frozen=True)
class ExpFace(Margin):
    """ExpFace, the exponential angular margin:

    f(c) = cos(π (θ/π)^m),   f′(c) = m (θ/π)^(m−1) sin(π (θ/π)^m) / sin θ.

    For m < 1, f′ is unbounded as θ → 0 (≈ 88 at θ = 1e-3 for m = 0.7), which is why the
    published training code uses margin_grad="detached". Literature: m = 0.7, s = 64.
    """

    m: Parameter = 0.7

    def _check(self) -> None:
        object.__setattr__(self, "m", _check_parameter("ExpFace", "m", self.m, 0.0, low_open=True))

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return torch.cos(math.pi * (theta / math.pi) ** _per_row(self.m, cos))

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        m = _per_row(self.m, cos)
        ratio = theta / math.pi
        return m * ratio ** (m - 1) * torch.sin(math.pi * ratio**m) / torch.sin(theta)


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """InsightFace's combined margin: f(c) = cos(m1·θ + m2) − m3, f′(c) = m1 sin(m1·θ + m2) / sin θ.

    (1, 0.5, 0) is ArcFace, (1, 0, 0.4) is CosFace; the default (1, 0.3, 0.2) is InsightFace's
    combined configuration.
    """

    m1: Parameter = 1.0
    m2: Parameter = 0.3
    m3: Parameter = 0.2

    def _check(self) -> None:
        object.__setattr__(self, "m1", _check_parameter("CombinedMargin", "m1", self.m1, 0.0, low_open=True))
        object.__setattr__(self, "m2", _check_parameter("CombinedMargin", "m2", self.m2, 0.0, math.pi, high_open=True))
        object.__setattr__(self, "m3", _check_parameter("CombinedMargin", "m3", self.m3, 0.0))

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return torch.cos(_per_row(self.m1, cos) * theta + _per_row(self.m2, cos)) - _per_row(self.m3, cos)

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        m1 = _per_row(self.m1, cos)
        return m1 * torch.sin(m1 * theta + _per_row(self.m2, cos)) / torch.sin(theta)


MARGIN_NAMES: dict[str, type[Margin]] = {
    "cosface": CosFace,
    "additive": CosFace,
    "arcface": ArcFace,
    "angular": ArcFace,
    "sphereface": SphereFace,
    "multiplicative": SphereFace,
    "expface": ExpFace,
    "exponential": ExpFace,
    "combined": CombinedMargin,
}
"""String names and aliases; each builds its class with the literature defaults."""

MarginFunction = Callable[[Tensor], Tensor]
"""What the loss applies to the (B,) target cosines: a built-in `Margin` or any callable."""

MarginLike = Union[str, MarginFunction]


def per_row_parameters(margin: MarginFunction) -> dict[str, Tensor]:
    """The margin's parameters given as tensors of per-row values, by name (none for callables).
    Read through the dataclass's fields, which torch.compile traces (not `vars`, whose `__dict__` of
    a frozen dataclass it cannot)."""
    if not isinstance(margin, Margin):
        return {}
    values = {f.name: getattr(margin, f.name) for f in fields(margin)}
    return {name: value for name, value in values.items() if isinstance(value, Tensor) and value.dim() == 1}
