"""Projection kernel: the embeddings' gradient through the L2 normalisation.

With v a row of the input (an embedding), n = ‖v‖, r = 1/max(n, 1e-12) (the forward's pre-pass,
kernels/norms.py), v̂ = v·r and g the float32 gradient w.r.t. v̂ (kernels/forward.py assembles it):

    ∂ℓ/∂v = (g − v̂ (v̂·g)) · r        where n ≥ 1e-12
    ∂ℓ/∂v = g · r                    where n < 1e-12 (F.normalize's clamp: the norm is constant)

v̂ is formed before any product, so nothing overflows for huge rows; a zero row is recognised by
its clamped inverse norm, computed as the pre-pass computes it (norms.inverse_norm). Grid:
(cdiv(R, BLOCK_R),). Two passes over D per row block: the first accumulates v̂·g, the second writes
the result in the output's dtype.
"""

import triton
import triton.language as tl

from .norms import inverse_norm


@triton.jit
def _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, stride_v, D):
    """The gradient and the input rows at columns d (float32)."""
    g = tl.load(g_ptr + rows[:, None] * D + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return g, v


@triton.jit
def project_kernel(g_ptr, v_ptr, inv_ptr, out_ptr, R, D, stride_v, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    dims = tl.arange(0, BLOCK_D)
    inv = tl.load(inv_ptr + rows, mask=row_ok, other=0.0)

    v_hat_dot_g = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        mask = row_ok[:, None] & (d < D)[None, :]
        g, v = _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, stride_v, D)
        v_hat_dot_g += tl.sum((v * inv[:, None]) * g, axis=1)

    coef = tl.where(inv < inverse_norm(0.0), v_hat_dot_g, 0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        mask = row_ok[:, None] & (d < D)[None, :]
        g, v = _gradient_and_rows(g_ptr, v_ptr, rows, d, mask, stride_v, D)
        out = (g - (v * inv[:, None]) * coef[:, None]) * inv[:, None]
        tl.store(out_ptr + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
