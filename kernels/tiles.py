"""Shared `@triton.jit` helpers: the cosine tile and the logits with each row's target.

Both the forward and the backward kernel walk the same (BLOCK_B × BLOCK_C) tiles of
c_ij = clamp(x_i·w_j / (max(‖x_i‖, 1e-12)·max(‖w_j‖, 1e-12)), −1, 1): `cos_tile` accumulates
the raw dot products over D in float32 and, from the very x and W chunks the matmul loads,
‖x_i‖² and ‖w_j‖² (no normalised copy of x or W exists anywhere). `target_logits` returns the
logits z = s·c with each row's supplied target logit z_iy on its target column: the kernels never
evaluate a margin (docs/design.md §3.1).
"""

import triton
import triton.language as tl

from .. import constants

NORM_EPS = tl.constexpr(constants.NORM_EPS)


@triton.jit
def cos_tile(
    x_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_x, stride_w,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(cos, 1/‖x‖, 1/‖w‖) for rows × cols (int64 index vectors); cos clamped to [−1, 1]."""
    dot = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    x_sq = tl.zeros((BLOCK_B,), tl.float32)
    w_sq = tl.zeros((BLOCK_C,), tl.float32)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_w + d[:, None],
                      mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_C)
        dot = tl.dot(x, w_t, dot, input_precision=DOT_PRECISION)
        xf = x.to(tl.float32)
        wf = w_t.to(tl.float32)
        x_sq += tl.sum(xf * xf, axis=1)
        w_sq += tl.sum(wf * wf, axis=0)
    inv_x = 1.0 / tl.maximum(tl.sqrt(x_sq), NORM_EPS)
    inv_w = 1.0 / tl.maximum(tl.sqrt(w_sq), NORM_EPS)
    cos = dot * inv_x[:, None] * inv_w[None, :]
    cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
    return cos, inv_x, inv_w


@triton.jit
def target_in_tile(target_col, c0, BLOCK_C: tl.constexpr):
    """(BLOCK_B × BLOCK_C) mask of each row's target column in the tile starting at c0; the
    comparison runs in int32 on tile-relative indices (an int64 tile costs twice the registers)."""
    rel = target_col - c0
    rel = tl.where((rel >= 0) & (rel < BLOCK_C), rel, -1).to(tl.int32)
    return tl.arange(0, BLOCK_C)[None, :] == rel[:, None]


@triton.jit
def target_logits(cos, is_target, target_logit, scale):
    """z = s·c, with the row's target logit z_iy where `is_target`."""
    return tl.where(is_target, target_logit[:, None], scale * cos)
