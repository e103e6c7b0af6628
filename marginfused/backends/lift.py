"""The fp16 lift: the power of two by which a float16 gradient tile is scaled before its cast.

The fused backends' backward multiplies a gradient tile with x or W in the inputs' dtype. For
float16 that cast loses the small entries: at B = 1024, s = 64 a negative class's entry
u_i·s·p_ij ≈ 6e-8 is float16's smallest subnormal, and the negative classes' gradient (O(1) in
all) would vanish. So the tile is multiplied by 2^k before the cast and the GEMM results by 2^-k
after it, in float32 (exact: powers of two). 2^k lifts the tile's largest possible entry to at most
2^15, so no entry overflows float16 (max 65504) and the small ones keep their bits.

The bound on a tile entry, for row i and class j (|p − t − ε/C| ≤ 2, |c| ≤ 1, p ≤ 1):

    |∂z_ij/∂c_ij| / s ≤ max(1, |σ_i|/s, |a_i| + 2|q|)                   (`slope_ratio_bounds`)
    |u_i·∂ℓ_i/∂c_ij| ≤ 2·|u_i|·s·max(1, |σ_i|/s, |a_i| + 2|q|)          (`row_bounds`)

(σ_i the target's slope, a_i and q a negatives rule's), times the inverse norms the tile
carries: the triton backend's forward takes P̃ = exp(z − m)·(∂z/∂c)/s·r_w (its first bound times
r_wj), its dW kernel G·r_x (the second times r_xi), and the cuda backend's one tile U = G·q·r both
q_i·r_wj. A zero row's inverse norm
(1/1e-12) is left out of the maximum: its entries are clamped to float16's range before the cast and
multiply the row's zeros, so they contribute exactly 0 whatever 2^k is.

Everything here is computed on the device, with no host synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..constants import NORM_EPS
from ..negatives import NegativesRule

FLOAT16_GRADIENT_CEILING = 2.0**15
"""The largest entry a lifted tile may hold: below float16's 65504, a power of two."""
LIFT_EXPONENTS = (-24, 24)
"""The range of k: 2^24 lifts float16's smallest subnormal to 1; beyond it nothing is gained."""


def slope_ratio_bounds(target_slope: Tensor, scale: float, rule: Optional[NegativesRule]) -> Tensor:
    """(B,) float32: the bound on |∂z_ij/∂c_ij|/s over the classes j of row i (module docstring)."""
    ratio = torch.clamp(target_slope.abs().float() / scale, min=1.0)
    if rule is not None:
        ratio = torch.maximum(ratio, rule.offset.abs().float() + 2 * abs(rule.quadratic))
    return ratio


def row_bounds(upstream: Tensor, target_slope: Tensor, scale: float, rule: Optional[NegativesRule]) -> Tensor:
    """(B,) float32: the bound on |u_i·∂ℓ_i/∂c_ij| over the classes j of row i (module docstring)."""
    return 2 * scale * upstream.abs().float() * slope_ratio_bounds(target_slope, scale, rule)


def nonzero_rows(inverse_norms: Tensor) -> Tensor:
    """The inverse norms of the rows that are not zero rows (whose 1/max(‖v‖, 1e-12) is 1e12), 0 for
    those: a zero row's entries multiply its zeros, whatever their size."""
    return inverse_norms.where(inverse_norms * NORM_EPS < 0.5, torch.zeros_like(inverse_norms))


def largest(values: Tensor) -> Tensor:
    """The largest entry (0-dim), 0 for an empty tensor."""
    return values.amax() if values.numel() else values.new_zeros(())


def lift(largest_entry: Tensor) -> Tensor:
    """2^k (a 1-element float32 tensor) for a tile whose entries are at most `largest_entry`:
    k = ⌊log2(2^15 / largest_entry)⌋ within LIFT_EXPONENTS (k = 24 for an all-zero tile)."""
    k = torch.floor(torch.log2(FLOAT16_GRADIENT_CEILING / largest_entry.float())).clamp(*LIFT_EXPONENTS)
    return torch.exp2(k).reshape(1)
