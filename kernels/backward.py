"""The class centres' gradient: every element written once, by the program that owns it —
flash-attention's dK/dV kernel with K = V = W (the embeddings' gradient needs no kernel of its own:
kernels/forward.py assembles it from the forward's O).

Math, for a valid row i (label ≠ ignore_index) with upstream gradient u_i, smoothing ε and the
saved row statistics over all C classes, M_i = max_j z_ij and log S_i = log Σ_j exp(z_ij − M_i):

    p_ij = exp((z_ij − M_i) − log S_i)      (= exp(z_ij − lse_i); kept in two parts because
                                             lse_i ≈ s rounds to ~4e-6 in float32, and p_iy − 1
                                             for a confident row would inherit that error)

    ∂ℓ_i/∂z_ij = p_ij − (1−ε)·[j = y_i] − ε/C
    G_ij = ∂(u·ℓ)/∂c_ij = u_i · s · (p_ij − ε/C)                         j ≠ y_i
    G_iy = u_i · σ_i · (p_iy − (1−ε) − ε/C)        σ_i = ∂z_iy/∂c_iy, the caller's target slope
                                                   (s, or s·f′(c_iy) for margin_grad="exact")
    with z_iy the caller's target logit (the kernels never evaluate a margin); under a
    negatives rule (NEGATIVES_RULE) a hard negative's z_ij = s·c_ij·(a_i + q·c_ij) and its
    s in G_ij becomes s·(a_i + 2q·c_ij) (tiles.py)
    (the clamp of c to [−1, 1] bounds the value only; the gradient passes through it)
    dŴ_j = Σ_i G_ij x̂_i = Σ_i (G_ij r_xi) x_i

Ignored rows have G = 0. The inverse norms r are the forward's (kernels/norms.py, saved for the
backward); they scale G, not the operands, so the x and W tiles go from memory to `tl.dot`
untouched. Every sum runs in a fixed order and no atomic is used, so the gradient is bit-identical
run to run.

`weight_grad_kernel` — dW. One-dimensional grid of cdiv(C_local, BLOCK_C)·K·slices programs,
program (c, k, g) at c·K·slices + k·slices + g: the programs of one class tile are adjacent, so the
tile's rows of W are read from memory once, by programs running together. Program (c, k, g) owns
sub-centre k of the class tile c (its W rows jK + k) and the columns [g·BLOCK_G, …) of D, and loops
over every batch tile, in order, with its cosine tiles class-major (BLOCK_C × BLOCK_B),
accumulating Σ_i G_ij r_xi x_i[cols] in a (BLOCK_C × BLOCK_G) float32 register tile. With PARTS = 1
or 2 (one row per class) its class tile of W stays resident, as PARTS parts of BLOCK_G columns,
while x's tiles stream (tiles.py), and each x tile's own part feeds both dots; with PARTS = 0 the
cosines' dot streams D in BLOCK_D chunks and the x tile's slice is loaded for the gradient's dot.
The projection through the normalisation needs ŵ_j·dŴ_j, a sum over all of D; it is accumulated
beside, with no second pass over D:

    ŵ_j·dŴ_j = Σ_i G_ij (ŵ_j·x̂_i) = Σ_i G_ij c_ij          (c unclamped; the clamp moves c only
                                                          by rounding, |Δc| ≤ the cosine's error)

so each program's epilogue maps its slice through the normalisation and stores dW once, in W's
dtype. No (C, D) float32 buffer exists, and no slice waits for another.

The dot takes G·r_x cast to the input dtype, and for float16 inputs G·r_x·2^k with 2^k (the
host's `lift`) the power of two lifting the largest entry of G·r_x into float16's range; the
accumulator is multiplied by 2^-k (exact). At B = 1024, s = 64 a negative class's G ≈ s·p/B ≈
6e-8 is float16's smallest subnormal: unscaled, the negative classes' gradient (O(1) in all) would
be lost to the cast. A zero row's r is 1/1e-12; its entries of G·r·2^k may pass float16's range and
are clamped to it, so they multiply the row's zeros to exactly 0 (never inf·0).

Sub-centres (SUBCENTERS = K > 1; C counts classes, W has C·K rows): program (c, k, g) recomputes
all K cosine tiles to know each class's choice (the first arg-max) and accumulates the G of the
classes that chose k (K·(2K + 2)·B·C·D FLOP at one slice, against 4·B·C·K·D for K plain classes:
the recomputed cosines are the price of owning each output).

Cost: 4·B·C·D FLOP (the recomputed cosines and the gradient dot) at one slice of D, 2·B·C·D more
for each further slice (each recomputes the cosines): 6·B·C·D at D = 512 in two slices.
Sharding: as in forward.py (class_start, global labels); M, log S and the 1/C of smoothing are
global (over every shard).
"""

import triton
import triton.language as tl

from .norms import inverse_norm
from .tiles import (
    clamped, dot_operand, load_part, logit_gradient, pair_dot, row_rule, streamed_dot, subcentre_cosines,
    target_columns, target_offsets,
)


@triton.jit
def _row_statistics(
    y_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, inv_x_ptr,
    rows, B, C_local, class_start, scale, ignore_index,
):
    """For a block of rows: (the target's local column or −1, target logit, M, log S, σ/s,
    u·s (0 for ignored rows and rows past B), r_x)."""
    row_ok = rows < B
    target_col, valid = target_columns(y_ptr, rows, row_ok, C_local, class_start, ignore_index)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sumexp = tl.load(log_sumexp_ptr + rows, mask=row_ok, other=0.0)
    slope_ratio = tl.load(target_slope_ptr + rows, mask=row_ok, other=0.0) / scale
    upstream = tl.load(upstream_ptr + rows, mask=row_ok, other=0.0)
    upstream_scaled = tl.where(valid, upstream * scale, 0.0)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    return target_col, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, inv_x


@triton.jit
def weight_grad_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, target_logit_ptr, target_slope_ptr, rule_threshold_ptr,
    rule_offset_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, lift_ptr, dw_ptr,
    B, C_local, D, stride_x, stride_w, class_start, scale, ignore_index, target_weight, smoothing_per_class, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # target_weight = 1 − ε, smoothing_per_class = ε / C (C the global class count).
    # PARTS > 0 (W resident) with one row per class only: K resident tiles would not fit.
    tl.static_assert(PARTS == 0 or SUBCENTERS == 1)
    pid = tl.program_id(0).to(tl.int64)
    slices = tl.cdiv(D, BLOCK_G).to(tl.int64)
    per_tile = slices * SUBCENTERS
    pid_c = pid // per_tile
    sub = (pid % per_tile) // slices  # the sub-centre of its classes this program owns (0 without sub-centres)
    d_slice = pid % slices
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < C_local
    w_rows = cols * SUBCENTERS + sub
    inv_w = tl.load(inv_w_ptr + w_rows, mask=col_ok, other=0.0)
    lift = tl.load(lift_ptr)
    g_dims = d_slice * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)  # dW's columns; W's own part
    other_dims = g_dims
    batch = tl.arange(0, BLOCK_B).to(tl.int64)
    if PARTS > 0:
        w_own = load_part(w_ptr, w_rows, col_ok, g_dims, D, stride_w)
        w_other = w_own
        if PARTS == 2:
            other_dims = (1 - d_slice) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
            w_other = load_part(w_ptr, w_rows, col_ok, other_dims, D, stride_w)

    acc = tl.zeros((BLOCK_C, BLOCK_G), tl.float32)
    w_hat_dot_g = tl.zeros((BLOCK_C,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + batch
        row_ok = rows < B
        target_col, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, inv_x = _row_statistics(
            y_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, inv_x_ptr,
            rows, B, C_local, class_start, scale, ignore_index)
        threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)
        x_g = load_part(x_ptr, rows, row_ok, g_dims, D, stride_x)  # x's own part: both dots' operand
        if PARTS > 0:
            x_other = x_g
            if PARTS == 2:
                x_other = load_part(x_ptr, rows, row_ok, other_dims, D, stride_x)
            cos = clamped(pair_dot(w_own, x_g, w_other, x_other, PARTS, DOT_PRECISION), inv_w, inv_x)
        elif SUBCENTERS > 1:
            cos, choice = subcentre_cosines(x_ptr, w_ptr, inv_x, inv_x, rows, cols, row_ok, col_ok, inv_x, inv_w_ptr,
                                            g_dims, g_dims, D, stride_x, stride_w, BLOCK_B, BLOCK_C, BLOCK_D, 0,
                                            DOT_PRECISION, SUBCENTERS, True)
        else:
            cos = clamped(streamed_dot(w_ptr, x_ptr, w_rows, rows, col_ok, row_ok, D, stride_w, stride_x,
                                       BLOCK_C, BLOCK_B, BLOCK_D, DOT_PRECISION), inv_w, inv_x)
        is_target = tl.arange(0, BLOCK_C)[:, None] == target_offsets(target_col, c0, BLOCK_C)[None, :]
        g = logit_gradient(cos, is_target, target_logit[None, :], row_max[None, :], log_sumexp[None, :],
                           slope_ratio[None, :], upstream_scaled[None, :], threshold[None, :], offset[None, :], quadratic,
                           scale, target_weight, smoothing_per_class, NEGATIVES_RULE)
        if SUBCENTERS > 1:
            g = tl.where(choice == sub, g, 0.0)  # the classes whose gradient goes to this sub-centre
        w_hat_dot_g += tl.sum(g * cos, axis=1)
        operand = dot_operand(g * (inv_x * lift)[None, :], x_ptr.dtype.element_ty)
        acc = tl.dot(operand, x_g, acc, input_precision=DOT_PRECISION)

    # dW_j = (dŴ_j − ŵ_j (ŵ_j·dŴ_j))·r_wj with ŵ_j = w_j·r_wj formed first (no product of a huge row
    # with r_wj² underflows), the projection term dropped where ‖w_j‖ < 1e-12 (r_wj = 1/1e-12:
    # F.normalize's clamp holds the norm constant)
    mask = col_ok[:, None] & (g_dims < D)[None, :]
    w = tl.load(w_ptr + w_rows[:, None] * stride_w + g_dims[None, :], mask=mask, other=0.0)
    along_w = tl.where(inv_w < inverse_norm(0.0), w_hat_dot_g, 0.0)
    out = (acc / lift - (w.to(tl.float32) * inv_w[:, None]) * along_w[:, None]) * inv_w[:, None]
    tl.store(dw_ptr + w_rows[:, None] * D + g_dims[None, :], out.to(dw_ptr.dtype.element_ty), mask=mask)
