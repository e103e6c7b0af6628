"""Projection kernel: the gradient through the L2 normalisation, summed over partials.

With v a row of the input (an embedding or a class centre), n = ‖v‖, r = 1/max(n, 1e-12) (the
pre-pass's, kernels/norms.py), v̂ = v·r and g = Σ_k g_k the gradient w.r.t. v̂ summed over the
n_parts partial buffers:

    ∂ℓ/∂v = (g − v̂ (v̂·g)) · r        where n ≥ 1e-12
    ∂ℓ/∂v = g · r                    where n < 1e-12 (F.normalize's clamp: the norm is constant)

v̂ is formed before any product, so nothing overflows for huge rows. Grid: (cdiv(R, BLOCK_R),). Two
passes over D per row block: the first accumulates v̂·g, the second writes the result in the
output's dtype. `out` may alias the (single) float32 partial buffer: every element is read before
it is written, by the same program.
"""

import triton
import triton.language as tl

from .norms import inverse_norm


@triton.jit
def _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, n_parts, part_stride, stride_v, D):
    """The gradient summed over its n_parts buffers, and the input rows, at columns d (float32)."""
    g = tl.zeros(mask.shape, tl.float32)
    for k in range(0, n_parts):
        g += tl.load(g_ptr + k * part_stride + rows[:, None] * D + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return g, v


@triton.jit
def project_kernel(
    g_ptr, v_ptr, inv_ptr, out_ptr, R, D, stride_v, n_parts,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    part_stride = tl.cast(R, tl.int64) * D  # R·D passes 2³¹ at C = 4M, D = 512
    inv = tl.load(inv_ptr + rows, mask=row_ok, other=0.0)

    v_hat_dot_g = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        mask = row_ok[:, None] & (d < D)[None, :]
        g, v = _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, n_parts, part_stride, stride_v, D)
        v_hat_dot_g += tl.sum((v * inv[:, None]) * g, axis=1)

    coef = tl.where(inv < inverse_norm(0.0), v_hat_dot_g, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        mask = row_ok[:, None] & (d < D)[None, :]
        g, v = _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, n_parts, part_stride, stride_v, D)
        out = (g - (v * inv[:, None]) * coef[:, None]) * inv[:, None]
        tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
