"""The margins: the function f(c) that replaces the target cosine c = cos θ.

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

A margin object called on a tensor of cosines returns f(c), exact and differentiable,
in the tensor's dtype (the trigonometry runs in at least float32). `derivative` returns f′(c).
The fused backends read `kind` and `params` to pick their compiled variant.
"""

from __future__ import annotations

import abc
import enum
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor

from .constants import DERIVATIVE_EPS



class MarginKind(enum.IntEnum):
    """The compile-time variant of a margin, as the fused kernels see it."""

    COSFACE = 0
    ARCFACE = 1
    SPHEREFACE = 2
    EXPFACE = 3
    COMBINED = 4


class ArcFaceFallback(enum.IntEnum):
    """What ArcFace does where cos(θ + m) stops decreasing in θ (see `ArcFace`)."""

    NONE = 0
    LINEAR = 1
    EASY = 2


def _working_dtype(cos: Tensor) -> torch.dtype:
    return torch.float64 if cos.dtype == torch.float64 else torch.float32


def _theta(cos: Tensor) -> Tensor:
    """θ = arccos(c) for f: c clamped to [−1, 1]."""
    return torch.acos(cos.to(_working_dtype(cos)).clamp(-1.0, 1.0))


def _theta_inside(cos: Tensor) -> Tensor:
    """θ = arccos(c) for f′: c clamped a hair inside ±1, so sin θ > 0."""
    c = cos.to(_working_dtype(cos))
    return torch.acos(c.clamp(-1.0 + DERIVATIVE_EPS, 1.0 - DERIVATIVE_EPS))


def _check_finite(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


class Margin(abc.ABC):
    """A margin f applied to the target cosine. Subclasses are frozen dataclasses."""

    kind: ClassVar[MarginKind]

    @abc.abstractmethod
    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        """f as a function of θ (and c, for margins defined on c directly)."""

    @abc.abstractmethod
    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        """f′(c) with θ strictly inside (0, π)."""

    @property
    @abc.abstractmethod
    def params(self) -> tuple[float, float, float]:
        """The margin's parameters as three floats, for the fused kernels."""

    @property
    def fallback_code(self) -> ArcFaceFallback:
        """ArcFace's fallback as the kernels see it; NONE for every other margin."""
        return ArcFaceFallback.NONE

    def __call__(self, cos: Tensor) -> Tensor:
        """f(c), exact and differentiable, in the dtype of `cos`."""
        c = cos.to(_working_dtype(cos))
        return self._value(_theta(cos), c).to(cos.dtype)

    def derivative(self, cos: Tensor) -> Tensor:
        """f′(c), in the dtype of `cos`; finite at c = ±1 (θ clamped inside (0, π))."""
        c = cos.to(_working_dtype(cos))
        return self._slope(_theta_inside(cos), c).to(cos.dtype)


@dataclass(frozen=True)
class CosFace(Margin):
    """CosFace / AM-Softmax, the additive cosine margin: f(c) = c − m, f′(c) = 1.

    Literature: m = 0.35 with s = 64 (CosFace), s = 30 (AM-Softmax); InsightFace configs use m = 0.4.
    """

    m: float = 0.35
    kind: ClassVar[MarginKind] = MarginKind.COSFACE

    def __post_init__(self) -> None:
        m = _check_finite("CosFace", "m", self.m)
        if m < 0:
            raise ValueError(f"CosFace: m must be >= 0, got {m}")
        object.__setattr__(self, "m", m)

    @property
    def params(self) -> tuple[float, float, float]:
        return (self.m, 0.0, 0.0)

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return cos - self.m

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

    m: float = 0.5
    fallback: Optional[str] = None
    kind: ClassVar[MarginKind] = MarginKind.ARCFACE

    def __post_init__(self) -> None:
        m = _check_finite("ArcFace", "m", self.m)
        if not 0 <= m < math.pi:
            raise ValueError(f"ArcFace: m must be in [0, π), got {m}")
        if self.fallback not in (None, "linear", "easy"):
            raise ValueError(
                f'ArcFace: fallback must be None, "linear" or "easy", got {self.fallback!r}'
            )
        object.__setattr__(self, "m", m)

    @property
    def params(self) -> tuple[float, float, float]:
        return (self.m, 0.0, 0.0)

    @property
    def fallback_code(self) -> ArcFaceFallback:
        return ArcFaceFallback[(self.fallback or "none").upper()]

    def _outside(self, cos: Tensor) -> Optional[Tensor]:
        """Where the fallback replaces cos(θ + m), or None without a fallback."""
        if self.fallback == "linear":
            return cos <= math.cos(math.pi - self.m)
        if self.fallback == "easy":
            return cos <= 0
        return None

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        arc = torch.cos(theta + self.m)
        outside = self._outside(cos)
        if outside is None:
            return arc
        replacement = cos - self.m * math.sin(self.m) if self.fallback == "linear" else cos
        return torch.where(outside, replacement, arc)

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        arc = torch.sin(theta + self.m) / torch.sin(theta)
        outside = self._outside(cos)
        if outside is None:
            return arc
        return torch.where(outside, torch.ones_like(arc), arc)


@dataclass(frozen=True)
class SphereFace(Margin):
    """SphereFace, the multiplicative angular margin, made monotonic in θ:

    f(c) = (−1)^k cos(mθ) − 2k with k = ⌊mθ/π⌋,   f′(c) = (−1)^k m sin(mθ) / sin θ.

    Literature: m = 1.7 with s = 30 or 64 (SphereFace-R); the original paper used m = 4.
    """

    m: float = 1.7
    kind: ClassVar[MarginKind] = MarginKind.SPHEREFACE

    def __post_init__(self) -> None:
        m = _check_finite("SphereFace", "m", self.m)
        if m < 1:
            raise ValueError(f"SphereFace: m must be >= 1, got {m}")
        object.__setattr__(self, "m", m)

    @property
    def params(self) -> tuple[float, float, float]:
        return (self.m, 0.0, 0.0)

    def _k_and_sign(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.floor(self.m * theta.detach() / math.pi)
        return k, 1.0 - 2.0 * torch.remainder(k, 2.0)

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        k, sign = self._k_and_sign(theta)
        return sign * torch.cos(self.m * theta) - 2.0 * k

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        _, sign = self._k_and_sign(theta)
        return sign * self.m * torch.sin(self.m * theta) / torch.sin(theta)


@dataclass(frozen=True)
class ExpFace(Margin):
    """ExpFace, the exponential angular margin:

    f(c) = cos(π (θ/π)^m),   f′(c) = m (θ/π)^(m−1) sin(π (θ/π)^m) / sin θ.

    For m < 1, f′ is unbounded as θ → 0 (≈ 88 at θ = 1e-3 for m = 0.7), which is why the
    published training code uses margin_grad="detached". Literature: m = 0.7, s = 64.
    """

    m: float = 0.7
    kind: ClassVar[MarginKind] = MarginKind.EXPFACE

    def __post_init__(self) -> None:
        m = _check_finite("ExpFace", "m", self.m)
        if m <= 0:
            raise ValueError(f"ExpFace: m must be > 0, got {m}")
        object.__setattr__(self, "m", m)

    @property
    def params(self) -> tuple[float, float, float]:
        return (self.m, 0.0, 0.0)

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return torch.cos(math.pi * (theta / math.pi) ** self.m)

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        ratio = theta / math.pi
        return (
            self.m
            * ratio ** (self.m - 1)
            * torch.sin(math.pi * ratio**self.m)
            / torch.sin(theta)
        )


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """InsightFace's combined margin: f(c) = cos(m1·θ + m2) − m3, f′(c) = m1 sin(m1·θ + m2) / sin θ.

    (1, 0.5, 0) is ArcFace, (1, 0, 0.4) is CosFace; the default (1, 0.3, 0.2) is InsightFace's
    combined configuration.
    """

    m1: float = 1.0
    m2: float = 0.3
    m3: float = 0.2
    kind: ClassVar[MarginKind] = MarginKind.COMBINED

    def __post_init__(self) -> None:
        m1 = _check_finite("CombinedMargin", "m1", self.m1)
        m2 = _check_finite("CombinedMargin", "m2", self.m2)
        m3 = _check_finite("CombinedMargin", "m3", self.m3)
        if m1 <= 0:
            raise ValueError(f"CombinedMargin: m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"CombinedMargin: m2 must be in [0, π), got {m2}")
        if m3 < 0:
            raise ValueError(f"CombinedMargin: m3 must be >= 0, got {m3}")
        object.__setattr__(self, "m1", m1)
        object.__setattr__(self, "m2", m2)
        object.__setattr__(self, "m3", m3)

    @property
    def params(self) -> tuple[float, float, float]:
        return (self.m1, self.m2, self.m3)

    def _value(self, theta: Tensor, cos: Tensor) -> Tensor:
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def _slope(self, theta: Tensor, cos: Tensor) -> Tensor:
        return self.m1 * torch.sin(self.m1 * theta + self.m2) / torch.sin(theta)


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

MarginLike = Union[str, Margin]


def resolve_margin(margin: MarginLike) -> Margin:
    """A margin object from a name or alias (literature defaults) or a margin object itself."""
    if isinstance(margin, Margin):
        return margin
    if isinstance(margin, str):
        cls = MARGIN_NAMES.get(margin.lower())
        if cls is None:
            known = ", ".join(sorted(MARGIN_NAMES))
            raise ValueError(f"margin: unknown name {margin!r}; known names: {known}")
        return cls()
    raise TypeError(
        f"margin must be a name or a Margin object (CosFace, ArcFace, ...), "
        f"got {type(margin).__name__}"
    )


def margin_from_spec(kind: int, params: tuple[float, float, float], fallback: int) -> Margin:
    """The margin whose `kind`, `params` and `fallback_code` these are (what crosses into a
    custom operator, which takes numbers, not margin objects)."""
    m1, m2, m3 = params
    kind = MarginKind(kind)
    if kind == MarginKind.COSFACE:
        return CosFace(m1)
    if kind == MarginKind.ARCFACE:
        code = ArcFaceFallback(fallback)
        return ArcFace(m1, None if code == ArcFaceFallback.NONE else code.name.lower())
    if kind == MarginKind.SPHEREFACE:
        return SphereFace(m1)
    if kind == MarginKind.EXPFACE:
        return ExpFace(m1)
    return CombinedMargin(m1, m2, m3)
