"""Adaptive margins: nn.Modules that decide each call's margin from the call itself (docs/design.md §6).

An `AdaptiveMargin` is handed the call's (B,) target cosines by the target pre-pass
(`marginfused.target.target_logits`) and returns the margin function of this call, which the
pre-pass then evaluates and differentiates, so the value and the slope come from the same margin
(a margin drawn at random is drawn once per call). Being modules, their state (running
statistics, once an adaptive margin has any) lives in the loss head's state_dict.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import Tensor, nn

from .margins import ArcFace, CosFace, MarginFunction, _check_parameter

ELASTIC_DEFAULT_MARGIN = {"arc": 0.5, "cos": 0.35}
"""ElasticFace's mean margins: ArcFace's and CosFace's literature values."""


class AdaptiveMargin(nn.Module, abc.ABC):
    """A margin decided per call: `for_call(cos)` returns the margin function of this call."""

    @abc.abstractmethod
    def for_call(self, cos: Tensor) -> MarginFunction:
        """The margin of the call whose (B,) target cosines are `cos`."""

    def forward(self, cos: Tensor) -> Tensor:
        """f(cos) with this call's margin (the loss calls `for_call` once and keeps its result)."""
        return self.for_call(cos)(cos)


class ElasticFace(AdaptiveMargin):
    """ElasticFace (Boutros et al., 2022): each row's margin drawn from N(m, std) on every call
    in training mode, f(c) = cos(θ + m_i) (kind "arc") or c − m_i (kind "cos"); in eval mode the
    mean margin m for every row. Draws with `generator` (on the cosines' device) when given.

    The authors' ElasticFace-Arc/Cos draw one margin per sample per step, as here; their "+"
    variants, which sort the draws by the target cosines, are not this class.
    """

    def __init__(self, kind: str = "arc", m: Optional[float] = None, std: float = 0.05,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if kind not in ELASTIC_DEFAULT_MARGIN:
            raise ValueError(f"ElasticFace: kind must be 'arc' or 'cos', got {kind!r}")
        self.kind = kind
        self.m = _check_parameter("ElasticFace", "m", ELASTIC_DEFAULT_MARGIN[kind] if m is None else m, 0.0)
        self.std = _check_parameter("ElasticFace", "std", std, 0.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"ElasticFace: generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def for_call(self, cos: Tensor) -> MarginFunction:
        if self.training:
            margins = torch.normal(self.m, self.std, size=cos.shape, generator=self.generator,
                                   device=cos.device, dtype=cos.dtype)
        else:
            margins = torch.full_like(cos, self.m)
        return ArcFace(m=margins) if self.kind == "arc" else CosFace(m=margins)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, m={self.m}, std={self.std}"
