"""Inverse norms: the light pre-pass of docs/design.md §3.2.

    out_r = 1 / max(‖v_r‖, 1e-12)        for each of R rows v_r of length D, in float32

One program per BLOCK_R rows, one pass over D. The forward and backward kernels scale their raw
dot products by these (B + C floats), so no tile that feeds `tl.dot` is used for anything else.

Norms that cannot overflow (marginfused/normalize.py): where a row's sum of squares overflows
float32 (an entry past ~1.8e19), the row is summed again scaled by s, the power of two at or below
its largest entry (exact): 1/max(‖v‖, ε) = (1/s) / max(‖v/s‖, ε/s). That second pass runs only for
blocks holding such a row.
"""

import triton
import triton.language as tl

from .. import constants

NORM_EPS = tl.constexpr(constants.NORM_EPS)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def inverse_norm(norm):
    """1 / max(norm, 1e-12): the one place it is computed, so that a kernel comparing against
    inverse_norm(0.0) recognises the clamped norms exactly."""
    return 1.0 / tl.maximum(norm, NORM_EPS)


@triton.jit
def _row_tile(v_ptr, rows, row_ok, d, D, stride_v):
    return tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=row_ok[:, None] & (d < D)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def inverse_norms_kernel(v_ptr, out_ptr, R, D, stride_v, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    squares = tl.zeros((BLOCK_R,), tl.float32)
    largest = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        v = _row_tile(v_ptr, rows, row_ok, d0 + dims, D, stride_v)
        squares += tl.sum(v * v, axis=1)
        largest = tl.maximum(largest, tl.max(tl.abs(v), axis=1))
    inverse = inverse_norm(tl.sqrt(squares))
    overflowed = squares > FLOAT32_MAX
    if tl.max(overflowed.to(tl.int32), axis=0) > 0:
        scale = tl.where(overflowed, tl.exp2(tl.floor(tl.log2(tl.maximum(largest, 1.0)))), 1.0)
        scaled = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            v = _row_tile(v_ptr, rows, row_ok, d0 + dims, D, stride_v) / scale[:, None]
            scaled += tl.sum(v * v, axis=1)
        inverse = tl.where(overflowed, (1.0 / scale) / tl.maximum(tl.sqrt(scaled), NORM_EPS / scale), inverse)
    tl.store(out_ptr + rows, inverse, mask=row_ok)
