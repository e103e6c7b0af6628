"""Adaptive margins: nn.Modules that decide each call's margin from the call itself (docs/design.md §6).

An `AdaptiveMargin` is handed the call (`MarginCall`: the (B,) target cosines, the embeddings'
norms, which rows count, and a sum over the global batch) by the target pre-pass
(`marginfused.target.target_logits`) and returns what the margin is for this call (`CallMargin`):
the margin function, which the pre-pass then evaluates and differentiates, so the value and the
slope come from the same decision (a margin drawn at random is drawn once per call); optionally a
rule for the hard negatives' logits (`marginfused.negatives`), and a per-row term added to the
loss. Their running statistics are buffers: they advance on calls in training mode only, and
live in the loss head's state_dict. Statistics over the batch use `MarginCall.batch_sum`, which
sums over the global batch when the classes are sharded, so a sharded run equals the
single-process one.

Compared with the authors' code (each class's docstring says where the fused version differs):
the kernels compute every negative's cosine as clamp(x̂·ŵ, −1, 1), and the margin changes the
target's logit only (and, with a negatives rule, the hard negatives' logits).
"""

from __future__ import annotations

import abc
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .margins import ArcFace, CosFace, MarginFunction, _check_parameter, working_dtype
from .negatives import NegativesRule

ELASTIC_DEFAULT_MARGIN = {"arc": 0.5, "cos": 0.35}
"""ElasticFace's mean margins: ArcFace's and CosFace's literature values."""


class MarginCall(NamedTuple):
    """What an adaptive margin sees of one call, per row of this process's batch.

    cos: the target cosines c_iy, detached, in the working dtype (0 on ignored rows).
    norms: ‖x_i‖ in the working dtype, differentiable in the embeddings.
    valid: the rows not ignored.
    batch_sum: (B,) or (B, k) values → their sum over the valid rows of the global batch
        (every rank's rows when the classes are sharded), detached.
    """

    cos: Tensor
    norms: Tensor
    valid: Tensor
    batch_sum: Callable[[Tensor], Tensor]


class CallMargin(NamedTuple):
    """An adaptive margin's decision for one call: the margin function f of the target cosines;
    the rule for the hard negatives' logits, or None; a (B,) term added to each row's loss (already
    weighted, differentiable), or None; and the running statistics' new values, (buffer, value)
    pairs the loss writes once the call's inputs have passed their checks (a call refused for its
    inputs changes nothing)."""

    margin: MarginFunction
    negatives_rule: Optional[NegativesRule] = None
    regulariser: Optional[Tensor] = None
    statistics: tuple[tuple[Tensor, Tensor], ...] = ()


def local_batch_sum(valid: Tensor) -> Callable[[Tensor], Tensor]:
    """`MarginCall.batch_sum` of a single process: the sum over the rows `valid`."""

    def batch_sum(values: Tensor) -> Tensor:
        keep = valid.reshape(-1, *([1] * (values.dim() - 1)))
        return torch.where(keep, values.detach(), torch.zeros_like(values)).sum(dim=0)

    return batch_sum


class AdaptiveMargin(nn.Module, abc.ABC):
    """A margin decided per call: `for_call(call)` returns this call's `CallMargin`."""

    has_negatives_rule: bool = False
    """Whether its calls come with a negatives rule (which excludes inter-class filtering)."""

    @abc.abstractmethod
    def for_call(self, call: MarginCall) -> CallMargin:
        """The margin of the call `call`, and in training mode the running statistics' new values
        (used for this call; written to the buffers by the loss)."""

    def forward(self, cos: Tensor) -> Tensor:
        """f(cos) in eval mode (no statistic advances), for unit-norm embeddings: a look at the
        margin's current target curve. The loss calls `for_call`."""
        if self.training:
            raise RuntimeError(f"{type(self).__name__}: call the margin directly in eval mode only; "
                               "the loss calls for_call, which advances its statistics in training")
        valid = torch.ones_like(cos, dtype=torch.bool)
        call = MarginCall(cos, torch.ones_like(cos), valid, local_batch_sum(valid))
        return self.for_call(call).margin(cos)


def _counted_mean(call: MarginCall, values: Tensor) -> tuple[Tensor, Tensor]:
    """(number of valid rows in the global batch, mean of `values` over them; 0 where none)."""
    count, total = call.batch_sum(torch.stack([torch.ones_like(values), values], dim=1)).unbind()
    return count, total / count.clamp_min(1.0)


def _ema(state: Tensor, value: Tensor, momentum: float, seen: Tensor) -> Tensor:
    """momentum·value + (1 − momentum)·state where `seen` (a 0-dim bool) holds, else state."""
    return torch.where(seen, momentum * value + (1.0 - momentum) * state, state).to(state.dtype)


def _check_momentum(owner: str, momentum: float) -> float:
    return _check_parameter(owner, "momentum", momentum, 0.0, 1.0)


class AdaFace(AdaptiveMargin):
    """AdaFace (Kim et al., 2022): a margin that adapts to image quality, with the embedding norm
    as its proxy.

        a_i = clip(‖x_i‖, 1e-3, 100) (detached)
        μ ← α·mean(a) + (1 − α)·μ,   σ ← α·std(a) + (1 − α)·σ      (training calls, before use;
                                                                    start 20 and 100; std unbiased)
        ĝ_i = clip(h·(a_i − μ)/(σ + 1e-3), −1, 1)
        f(c) = cos(clip(θ − m·ĝ_i, 1e-3, π − 1e-3)) − m·(1 + ĝ_i)

    Defaults m = 0.4, h = 0.333, α = `momentum` = 0.01 (with s = 64). Statistics over the valid
    rows of the global batch; a batch of one valid row leaves σ as it is (its std is undefined).

    Where this differs from the authors' code: they clamp every cosine to [−1 + 1e-3, 1 − 1e-3]
    and clip θ of every column; here the negatives' cosines are clamped to [−1, 1] only (a
    difference where a negative's cosine passes 0.999) and the θ clip acts on the target alone (it
    never binds for the others, whose θ ≥ 0.045 after their clamp). Their code differentiates
    through f, i.e. margin_grad="exact".
    """

    NORM_RANGE = (1e-3, 100.0)
    EPS = 1e-3

    def __init__(self, m: float = 0.4, h: float = 0.333, momentum: float = 0.01) -> None:
        super().__init__()
        self.m = _check_parameter("AdaFace", "m", m, 0.0)
        self.h = _check_parameter("AdaFace", "h", h, 0.0)
        self.momentum = _check_momentum("AdaFace", momentum)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def for_call(self, call: MarginCall) -> CallMargin:
        norms = call.norms.detach().clamp(*self.NORM_RANGE)
        mean, std, statistics = self.batch_mean, self.batch_std, ()
        if self.training:
            with torch.no_grad():
                count, batch_mean = _counted_mean(call, norms)
                variance = call.batch_sum((norms - batch_mean) ** 2) / (count - 1.0).clamp_min(1.0)
                mean = _ema(self.batch_mean, batch_mean, self.momentum, count > 0)
                std = _ema(self.batch_std, variance.sqrt(), self.momentum, count > 1)
                statistics = ((self.batch_mean, mean), (self.batch_std, std))
        mean, std = mean.to(norms.dtype), std.to(norms.dtype)
        quality = (self.h * (norms - mean) / (std + self.EPS)).clamp(-1.0, 1.0)
        m, eps = self.m, self.EPS

        def margin(cos: Tensor) -> Tensor:
            c = cos.to(working_dtype(cos.dtype))
            theta = torch.acos(c.clamp(-1.0, 1.0))
            g = quality.to(c.dtype)
            return torch.cos((theta - m * g).clamp(eps, math.pi - eps)) - m * (1.0 + g)

        return CallMargin(margin, statistics=statistics)

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, momentum={self.momentum}"


class MagFace(AdaptiveMargin):
    """MagFace (Meng et al., 2021): an ArcFace margin that grows with the embedding norm, and a
    regulariser that rewards larger norms for confident samples.

        a_i = clamp(‖x_i‖, l_a, u_a)
        m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a)
        f(c) = cos(θ + m(a_i)), and f(c) = c where c ≤ 0 (easy margin)
        the loss gains λ_g·g(a_i) per row, g(a) = a/u_a² + 1/a, so a mean loss is
        loss + λ_g·mean(g(a))

    Defaults l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35 (with s = 64). Neither the margin
    nor the regulariser is detached: their gradients reach ‖x_i‖ (and through it the embeddings;
    none where the clamp binds). The returned loss includes the regulariser. No state.

    Where this differs from the authors' code: none in the loss's value; their code differentiates
    through f (margin_grad="exact") and returns the regulariser as a separate term that the
    training script adds with weight λ_g.
    """

    def __init__(self, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0) -> None:
        super().__init__()
        self.l_a = _check_parameter("MagFace", "l_a", l_a, 0.0, low_open=True)
        self.u_a = _check_parameter("MagFace", "u_a", u_a, self.l_a, low_open=True)
        self.l_m = _check_parameter("MagFace", "l_m", l_m, 0.0, math.pi, high_open=True)
        self.u_m = _check_parameter("MagFace", "u_m", u_m, self.l_m, math.pi, high_open=True)
        self.lambda_g = _check_parameter("MagFace", "lambda_g", lambda_g, 0.0)

    def for_call(self, call: MarginCall) -> CallMargin:
        a = call.norms.clamp(self.l_a, self.u_a)
        margins = self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)
        regulariser = self.lambda_g * (a / self.u_a**2 + 1.0 / a)
        return CallMargin(ArcFace.unchecked(m=margins, fallback="easy"), regulariser=regulariser)

    def extra_repr(self) -> str:
        return f"l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, lambda_g={self.lambda_g}"


class CurricularFace(AdaptiveMargin):
    """CurricularFace (Huang et al., 2020): ArcFace on the target, and hard negatives weighted by
    how far training has come.

        target:     f(c) = cos(θ + m), and c − m·sin m where c ≤ cos(π − m) (ArcFace's linear fallback)
        t ← 0.01·mean(c_iy) + 0.99·t                 (`momentum` = 0.01; training calls, before use;
                                                      starts at 0; detached)
        negatives:  τ_i = cos(θ_iy + m); a negative with c_ij > τ_i takes c_ij·(t + c_ij)
                    (gradient factor t + 2c_ij), the others c_ij   (`marginfused.negatives`)

    Default m = 0.5 (with s = 64). The mean is over the valid rows of the global batch. Not
    combinable with inter-class filtering (both rule the negatives).

    Where this differs from the authors' code: none in the loss's value; their t also advances in
    eval mode, and their code differentiates through f (margin_grad="exact").
    """

    has_negatives_rule = True

    def __init__(self, m: float = 0.5, momentum: float = 0.01) -> None:
        super().__init__()
        self.m = _check_parameter("CurricularFace", "m", m, 0.0, math.pi, high_open=True)
        self.momentum = _check_momentum("CurricularFace", momentum)
        self.register_buffer("t", torch.tensor(0.0))

    def for_call(self, call: MarginCall) -> CallMargin:
        t, statistics = self.t, ()
        if self.training:
            with torch.no_grad():
                count, mean = _counted_mean(call, call.cos)
                t = _ema(self.t, mean, self.momentum, count > 0)
                statistics = ((self.t, t),)
        cos = call.cos.detach()
        threshold = torch.where(call.valid, ArcFace.unchecked(m=self.m)(cos), torch.full_like(cos, float("inf")))
        offset = t.to(cos.dtype).expand_as(cos).contiguous()
        return CallMargin(ArcFace.unchecked(m=self.m, fallback="linear"), NegativesRule(threshold, offset, 1.0),
                          statistics=statistics)

    def extra_repr(self) -> str:
        return f"m={self.m}, momentum={self.momentum}"


class ElasticFace(AdaptiveMargin):
    """ElasticFace (Boutros et al., 2022): each row's margin drawn from N(m, std) on every call
    in training mode, f(c) = cos(θ + m_i) (kind "arc") or c − m_i (kind "cos"); in eval mode the
    mean margin m for every row. Draws with `generator` (on the cosines' device) when given; under
    torch.compile, which cannot trace a torch.Generator, from torch's default generator only.

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

    def for_call(self, call: MarginCall) -> CallMargin:
        cos = call.cos
        if self.training:
            if self.generator is not None and torch.compiler.is_compiling():
                raise RuntimeError("ElasticFace(generator=...) cannot be traced by torch.compile (it cannot trace a "
                                   "torch.Generator): pass generator=None to draw from torch's default generator")
            margins = torch.normal(self.m, self.std, size=cos.shape, generator=self.generator,
                                   device=cos.device, dtype=cos.dtype)
        else:
            margins = torch.full_like(cos, self.m)
        return CallMargin(ArcFace.unchecked(m=margins) if self.kind == "arc" else CosFace.unchecked(m=margins))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, m={self.m}, std={self.std}"


ADAPTIVE_NAMES: dict[str, type[AdaptiveMargin]] = {
    "adaface": AdaFace,
    "magface": MagFace,
    "curricularface": CurricularFace,
    "elasticface": ElasticFace,
}
"""String names of the adaptive margins; each builds its class with the defaults."""
