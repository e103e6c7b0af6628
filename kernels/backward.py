"""Backward kernel: recompute the cosine tiles, form ∂ℓ/∂c, accumulate dX̂ and dŴ.

Math, for a valid row i (label ≠ ignore_index) with upstream gradient u_i, smoothing ε and the
saved row statistics over all C classes, M_i = max_j z_ij and log S_i = log Σ_j exp(z_ij − M_i):

    p_ij = exp((z_ij − M_i) − log S_i)      (= exp(z_ij − lse_i); kept in two parts because
                                             lse_i ≈ s rounds to ~4e-6 in float32, and p_iy − 1
                                             for a confident row would inherit that error)

    ∂ℓ_i/∂z_ij = p_ij − (1−ε)·[j = y_i] − ε/C
    G_ij = ∂(u·ℓ)/∂c_ij = u_i · s · (p_ij − ε/C)                         j ≠ y_i
    G_iy = u_i · σ_i · (p_iy − (1−ε) − ε/C)        σ_i = ∂z_iy/∂c_iy, the caller's target slope
                                                   (s, or s·f′(c_iy) for margin_grad="exact")
    with z_iy the caller's target logit (the kernel never evaluates a margin)
    (the clamp of c to [−1, 1] bounds the value only; the gradient passes through it)
    dX̂_i = Σ_j G_ij ŵ_j            dŴ_j = Σ_i G_ij x̂_i

Ignored rows have G = 0. The kernel writes dX̂ and dŴ in float32; `project.py` then maps them
through the normalisation (∂ℓ/∂x = (g − x̂(x̂·g))/‖x‖) and casts to the input dtype.

Grid: (cdiv(B, BLOCK_B), n_splits), the forward's. Program (b, k) walks the class tiles of split
k; per tile it recomputes the cosines (`tiles.cos_tile`, with the pre-pass's inverse norms),
builds G (BLOCK_B × BLOCK_C, float32), and casts G·2^k to the input dtype for the tensor-core
dots, whose float32 results it multiplies by 2^-k (exact). 2^k (the host's `grad_scale`) is 1 but
for float16 inputs, where it lifts G into float16's range: at B = 1024, s = 64 a negative class's
G ≈ s·p/B ≈ 6e-8 is float16's smallest subnormal, and the negative classes' gradient (O(1) in
all) would otherwise be lost to the cast. Then per D chunk:
    dX̂ partial: dx_part[k, rows, d] (+)= G · ŵ[cols, d]       — program-exclusive, no atomics: the
                 split's first tile stores, later tiles load-add-store; the host's projection sums
                 the n_splits partials (an (n_splits, B, D) float32 buffer).
    dŴ:          dw_acc[cols, d] += Gᵀ · x̂[rows, d]           — float32 atomic add (relaxed: no
                 memory fences, which the default acq_rel adds around every add) into a zeroed
                 (C_local, D) buffer; cdiv(B, BLOCK_B) programs add to each element (summation
                 order not deterministic).
ŵ and x̂ chunks are normalised in registers, never in memory.
Sharding: as in forward.py (class_start, global labels); M, log S and the 1/C of smoothing are
global (over every shard).
"""

import triton
import triton.language as tl

from .tiles import cos_tile, target_in_tile, target_logits


@triton.jit
def grad_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr,
    grad_rows_ptr, grad_scale_ptr, dx_part_ptr, dw_acc_ptr,
    B, C_local, D, stride_x, stride_w, class_start, classes_per_split, batch_bucket,
    scale, ignore_index, target_weight, smoothing_per_class,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # target_weight = 1 − ε, smoothing_per_class = ε / C (C the global class count).
    # batch_bucket: unused in the body; the autotuning key (B rounded up to a power of two).
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    labels = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    local = labels - class_start
    target_col = tl.where(valid & (local >= 0) & (local < C_local), local, -1)
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sumexp = tl.load(log_sumexp_ptr + rows, mask=row_ok, other=0.0)
    grad_rows = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0)
    grad_rows = tl.where(valid, grad_rows, 0.0)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    slope_ratio = tl.load(target_slope_ptr + rows, mask=row_ok, other=0.0) / scale  # σ_i / s
    row_factor = grad_rows * scale
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    grad_scale = tl.load(grad_scale_ptr)  # 2^k: G·2^k fits the input dtype; the dots are unscaled

    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C_local)
    tile = tl.arange(0, BLOCK_C).to(tl.int64)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tile
        col_ok = cols < c_end
        inv_w = tl.load(inv_w_ptr + cols, mask=col_ok, other=0.0)
        cos = cos_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, inv_x, inv_w, D, stride_x, stride_w,
                       BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION)
        is_target = target_in_tile(target_col, c0, BLOCK_C)
        z = target_logits(cos, is_target, target_logit, scale)
        p = tl.exp((z - row_max[:, None]) - log_sumexp[:, None])
        dz = p - tl.where(is_target, target_weight, 0.0) - smoothing_per_class
        dz = tl.where(is_target, dz * slope_ratio[:, None], dz)
        g = dz * row_factor[:, None]
        g = tl.where(col_ok[None, :] & valid[:, None], g, 0.0)
        g_in = (g * grad_scale).to(x_ptr.dtype.element_ty)
        later_tile = (dims * 0 + c0) != c_begin  # a vector: the interpreter rejects scalar masks

        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            d_ok = d < D
            if NEED_DX:
                w = tl.load(w_ptr + cols[:, None] * stride_w + d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                w_hat = (w.to(tl.float32) * inv_w[:, None]).to(w.dtype)
                part = tl.dot(g_in, w_hat, input_precision=DOT_PRECISION) / grad_scale
                dx_ptrs = dx_part_ptr + (split * B + rows[:, None]) * D + d[None, :]
                dx_mask = row_ok[:, None] & d_ok[None, :]
                part += tl.load(dx_ptrs, mask=dx_mask & later_tile[None, :], other=0.0)
                tl.store(dx_ptrs, part, mask=dx_mask)
            if NEED_DW:
                x = tl.load(x_ptr + rows[:, None] * stride_x + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                x_hat = (x.to(tl.float32) * inv_x[:, None]).to(x.dtype)
                part = tl.dot(tl.trans(g_in), x_hat, input_precision=DOT_PRECISION) / grad_scale
                tl.atomic_add(dw_acc_ptr + cols[:, None] * D + d[None, :], part,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
