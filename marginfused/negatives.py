"""The negatives rule: how the logits of hard negatives change (docs/design.md §6).

Two margins change the logits of negative classes, not only the target's: CurricularFace, which
weights the negatives harder than the target's margined cosine, and InsightFace's inter-class
filtering, which drops negatives too close to be trusted (likely label noise). Both are one rule:
for a row i, every class j ≠ y_i with c_ij > τ_i (a hard negative) takes

    z_ij = s · c_ij · (a_i + q·c_ij)        ∂z_ij/∂c_ij = s · (a_i + 2q·c_ij)

and every other negative z_ij = s·c_ij, with

    CurricularFace          τ_i = cos(θ_iy + m),  a_i = t (its running statistic),  q = 1
    inter-class filtering   τ_i = τ,              a_i = 0,                          q = 0  (z = 0, no gradient)

The rule is per-row data: τ and a as (B,) tensors (float32 for the fused kernels), q a number.
Rows without a rule (ignored rows) hold τ_i = +inf.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class NegativesRule(NamedTuple):
    """Per row: the threshold τ_i above which a negative is hard, and the offset a_i; and the
    quadratic coefficient q of the rule z = s·c·(a + q·c), the same for every row."""

    threshold: Tensor
    offset: Tensor
    quadratic: float

    def for_kernels(self) -> "NegativesRule":
        """The rule as the fused kernels read it: τ and a detached, contiguous float32."""
        return NegativesRule(self.threshold.detach().float().contiguous(), self.offset.detach().float().contiguous(),
                             float(self.quadratic))


def interclass_filtering(threshold: float, cos: Tensor, valid: Tensor) -> NegativesRule:
    """InsightFace's inter-class filtering on the `valid` rows: negatives with c_ij > `threshold`
    take logit 0 and no gradient (τ and a in the dtype of the target cosines `cos`)."""
    tau = torch.where(valid, torch.full_like(cos, threshold), torch.full_like(cos, float("inf")))
    return NegativesRule(tau, torch.zeros_like(tau), 0.0)


def negative_logits(cos: Tensor, rule: Optional[NegativesRule], scale: float) -> tuple[Tensor, Tensor]:
    """(z, ∂z/∂c) of a (B, n) tile of cosines if every entry were a negative: s·c and s, except
    the rule's hard negatives. The caller puts the target column's own logit in afterwards."""
    plain = scale * cos
    if rule is None:
        return plain, torch.full_like(cos, scale)
    threshold = rule.threshold.to(cos.dtype).unsqueeze(1)
    offset = rule.offset.to(cos.dtype).unsqueeze(1)
    hard = cos > threshold
    logit = torch.where(hard, scale * cos * (offset + rule.quadratic * cos), plain)
    slope = torch.where(hard, scale * (offset + 2.0 * rule.quadratic * cos), torch.full_like(cos, scale))
    return logit, slope
