"""Shared `@triton.jit` helpers: the cosine tile, each row's target column in it, and the
gradient of the loss with respect to the tile's cosines.

Every kernel walks tiles of c_ij = clamp(x_i·w_j / (max(‖x_i‖, 1e-12)·max(‖w_j‖, 1e-12)), −1, 1):
`cos_tile` accumulates the raw dot products over D in float32 and scales them by the inverse
norms, which a pre-pass computes (B + C floats; no normalised copy of x or W exists anywhere).
The forward and the embeddings' backward hold tiles batch-major (BLOCK_B × BLOCK_C: rows of x
down, classes across); the class centres' backward holds them class-major (BLOCK_C × BLOCK_B), so
each kernel's gradient tile is already the left operand of its next dot. The per-row arguments of
`logit_gradient` are shaped to broadcast against the tile either way: (BLOCK_B, 1) or (1, BLOCK_B).
The kernels never evaluate a margin: each row's target logit z_iy comes from the caller
(docs/design.md §3.1). Under a negatives rule (NEGATIVES_RULE; `marginfused.negatives`) a
negative with c_ij > τ_i takes z = s·c·(a_i + q·c), with ∂z/∂c = s·(a_i + 2q·c), τ_i and a_i per
row from the caller, q a scalar; without one the rule's arguments are never read.
"""

import triton
import triton.language as tl


@triton.jit
def cos_tile(
    p_ptr, q_ptr, p_idx, q_idx, p_ok, q_ok, inv_p, inv_q, D, stride_p, stride_q,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The (BLOCK_P × BLOCK_Q) cosines between rows p_idx of one matrix and rows q_idx of the
    other (int64 index vectors; x and W in either order), clamped to [−1, 1], from the raw dot
    products scaled in the epilogue by the rows' inverse norms (docs/design.md §3.2).

    The two tiles feed `tl.dot` and nothing else: a tile a pipelined dot reads from shared
    memory and register math also uses gets one shared-memory buffer too few on Hopper (an
    in-flight wgmma then reads a buffer the next copy overwrites; triton-lang/triton #6691)."""
    dot = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dims
        d_ok = d < D
        p = tl.load(p_ptr + p_idx[:, None] * stride_p + d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        q_t = tl.load(q_ptr + q_idx[None, :] * stride_q + d[:, None],
                      mask=q_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_Q)
        dot = tl.dot(p, q_t, dot, input_precision=DOT_PRECISION)
    cos = dot * inv_p[:, None] * inv_q[None, :]
    return tl.minimum(tl.maximum(cos, -1.0), 1.0)


@triton.jit
def class_cos_tile(
    x_ptr, w_ptr, rows, classes, row_ok, class_ok, inv_x, inv_w_ptr, D, stride_x, stride_w,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SUBCENTERS: tl.constexpr, CLASS_MAJOR: tl.constexpr,
):
    """The class cosines c_ij of a tile, batch-major (BLOCK_B × BLOCK_C) or CLASS_MAJOR (BLOCK_C ×
    BLOCK_B), and which sub-centre k gives each (int32, the first on ties; all 0 for one row per
    class, unused there and compiled away): with SUBCENTERS = K > 1 the largest of the K cosine
    tiles `cos_tile` gives for rows jK + k, the rows' inverse norms loaded per k."""
    shape: tl.constexpr = (BLOCK_C, BLOCK_B) if CLASS_MAJOR else (BLOCK_B, BLOCK_C)
    best = tl.full(shape, -2.0, tl.float32)  # below every clamped cosine
    choice = tl.zeros(shape, tl.int32)
    for k in tl.static_range(SUBCENTERS):
        w_rows = classes * SUBCENTERS + k
        inv_w = tl.load(inv_w_ptr + w_rows, mask=class_ok, other=0.0)
        if CLASS_MAJOR:
            cos = cos_tile(w_ptr, x_ptr, w_rows, rows, class_ok, row_ok, inv_w, inv_x, D, stride_w, stride_x,
                           BLOCK_C, BLOCK_B, BLOCK_D, DOT_PRECISION)
        else:
            cos = cos_tile(x_ptr, w_ptr, rows, w_rows, row_ok, class_ok, inv_x, inv_w, D, stride_x, stride_w,
                           BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION)
        if SUBCENTERS == 1:
            best = cos
        else:
            better = cos > best
            choice = tl.where(better, k, choice)
            best = tl.where(better, cos, best)
    return best, choice


@triton.jit
def target_offsets(target_col, c0, BLOCK_C: tl.constexpr):
    """Each row's target column relative to the class tile starting at c0, or −1 where the target
    is not in the tile (int32: an int64 comparison tile costs twice the registers)."""
    rel = target_col - c0
    return tl.where((rel >= 0) & (rel < BLOCK_C), rel, -1).to(tl.int32)


@triton.jit
def row_rule(threshold_ptr, offset_ptr, rows, row_ok, NEGATIVES_RULE: tl.constexpr):
    """(τ_i, a_i) of a block of rows under a negatives rule (τ = +inf past B), or constant
    (+inf, 0) without one (nothing loaded)."""
    if NEGATIVES_RULE:
        threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=float("inf"))
        offset = tl.load(offset_ptr + rows, mask=row_ok, other=0.0)
    else:
        threshold = tl.full(rows.shape, float("inf"), tl.float32)
        offset = tl.zeros(rows.shape, tl.float32)
    return threshold, offset


@triton.jit
def negative_logits(cos, threshold, offset, quadratic, scale, NEGATIVES_RULE: tl.constexpr):
    """z of a tile's entries as negatives: s·c, hard negatives under the rule s·c·(a + q·c)."""
    if NEGATIVES_RULE:
        return scale * cos * tl.where(cos > threshold, offset + quadratic * cos, 1.0)
    return scale * cos


@triton.jit
def logit_gradient(
    cos, is_target, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, threshold, offset,
    quadratic, scale, target_weight, smoothing_per_class, NEGATIVES_RULE: tl.constexpr,
):
    """G = ∂(Σ_i u_i·ℓ_i)/∂c on a tile (float32; the math is in kernels/backward.py), with
    upstream_scaled = u_i·s (0 for ignored rows), slope_ratio = σ_i/s, and a hard negative's ratio
    a_i + 2q·c under the rule."""
    z = tl.where(is_target, target_logit, negative_logits(cos, threshold, offset, quadratic, scale, NEGATIVES_RULE))
    p = tl.exp((z - row_max) - log_sumexp)
    dz = p - tl.where(is_target, target_weight, 0.0) - smoothing_per_class
    ratio = slope_ratio
    if NEGATIVES_RULE:
        ratio = tl.where(is_target, slope_ratio, tl.where(cos > threshold, offset + 2.0 * quadratic * cos, 1.0))
        return dz * ratio * upstream_scaled
    return tl.where(is_target, dz * ratio, dz) * upstream_scaled
