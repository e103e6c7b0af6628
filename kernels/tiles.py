"""Shared `@triton.jit` helpers: the cosine tile and the logits with each row's target.

Both the forward and the backward kernel walk the same (BLOCK_B × BLOCK_C) tiles of
c_ij = clamp(x_i·w_j / (max(‖x_i‖, 1e-12)·max(‖w_j‖, 1e-12)), −1, 1): `cos_tile` accumulates
the raw dot products over D in float32 and scales them by the inverse norms, which a pre-pass
computes (B + C floats; no normalised copy of x or W exists anywhere). `target_logits` returns the
logits z = s·c with each row's supplied target logit z_iy on its target column: the kernels never
evaluate a margin (docs/design.md §3.1).
"""

import triton
import triton.language as tl


@triton.jit
def cos_tile(
    x_ptr, w_ptr, rows, cols, row_ok, col_ok, inv_x, inv_w, D, stride_x, stride_w,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """cos for rows × cols (int64 index vectors), clamped to [−1, 1], from the raw dot products
    scaled in the epilogue by the rows' inverse norms (a pre-pass's: docs/design.md §3.2).

    The x and W tiles feed `tl.dot` and nothing else: a tile a pipelined dot reads from shared
    memory and register math also uses gets one shared-memory buffer too few on Hopper (an
    in-flight wgmma then reads a buffer the next copy overwrites; triton-lang/triton #6691)."""
    dot = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_w + d[:, None],
                      mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_C)
        dot = tl.dot(x, w_t, dot, input_precision=DOT_PRECISION)
    cos = dot * inv_x[:, None] * inv_w[None, :]
    return tl.minimum(tl.maximum(cos, -1.0), 1.0)


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
