"""Backward kernels: every gradient element written once, by the program that owns it.

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
    dX̂_i = Σ_j G_ij ŵ_j = Σ_j (G_ij r_wj) w_j          dŴ_j = Σ_i G_ij x̂_i = Σ_i (G_ij r_xi) x_i

Ignored rows have G = 0. The inverse norms r (a pre-pass's, kernels/norms.py) scale G, not the
operands, so the x and W tiles go from memory to `tl.dot` untouched. Both kernels recompute the
cosine tiles (`tiles.cos_tile`) and form G (`tiles.logit_gradient`); neither uses an atomic, and
every sum runs in a fixed order, so the gradients are bit-identical run to run.

`row_grad_kernel` — dX̂. Grid (cdiv(B, BLOCK_B), n_splits, cdiv(D, BLOCK_G)): program (b, k, g)
owns rows [b·BLOCK_B, …), the classes of split k (the forward's splits) and the columns
[g·BLOCK_G, …) of D. It accumulates Σ_j G_ij r_wj w_j[cols] over its split in a (BLOCK_B × BLOCK_G)
float32 register tile and stores it once, as partial k of an (n_splits, B, D) float32 buffer;
`project.py` sums the partials in split order and maps them through the normalisation.

`class_grad_kernel` — dW. Grid (cdiv(C_local, BLOCK_C), cdiv(D, BLOCK_G), K): program (c, g) owns a
class tile and the columns [g·BLOCK_G, …) of D and loops over every batch tile, in order, with
its cosine tiles class-major (BLOCK_C × BLOCK_B), accumulating Σ_i G_ij r_xi x_i[cols] in a
(BLOCK_C × BLOCK_G) float32 register tile. The projection through the normalisation needs
ŵ_j·dŴ_j, a sum over all of D; it is accumulated beside, with no second pass over D:

    ŵ_j·dŴ_j = Σ_i G_ij (ŵ_j·x̂_i) = Σ_i G_ij c_ij          (c unclamped; the clamp moves c only
                                                          by rounding, |Δc| ≤ the cosine's error)

so each program's epilogue maps its slice through the normalisation and stores dW once, in W's
dtype. No (C, D) float32 buffer exists, and no slice waits for another.

The two dots take G·r cast to the input dtype, and for float16 inputs G·r·2^k with 2^k (the
host's `lift`, per kernel) the power of two lifting the largest entry of G·r into float16's
range; the accumulators are multiplied by 2^-k (exact). At B = 1024, s = 64 a negative class's
G ≈ s·p/B ≈ 6e-8 is float16's smallest subnormal: unscaled, the negative classes' gradient (O(1)
in all) would be lost to the cast. A zero row's r is 1/1e-12; its entries of G·r·2^k may pass
float16's range and are clamped to it, so they multiply the row's zeros to exactly 0 (never inf·0).

Sub-centres (SUBCENTERS = K > 1; C counts classes, W has C·K rows): both kernels take each class's
cosine as the largest of its K (`tiles.class_cos_tile`) and send its G_ij to the first sub-centre
holding it. `row_grad_kernel` makes K gradient dots per class tile, each with G masked to the
classes whose choice is k; `class_grad_kernel` gains a third grid axis over k: program (c, g, k)
owns sub-centre k of its classes, recomputes all K cosine tiles to know each class's choice, and
accumulates the G of the classes that chose k (K·(2K + 2)·B·C·D FLOP at BLOCK_G ≥ D, against
4·B·C·K·D for K plain classes: the recomputed cosines are the price of owning each output).

Cost: 4·B·C·D FLOP per kernel (the recomputed cosines and the gradient dot) when BLOCK_G ≥ D,
2·B·C·D more for each further slice of D (each recomputes the cosines). Memory: the
(n_splits, B, D) partials (n_splits does not grow with C) and dW itself.
Sharding: as in forward.py (class_start, global labels); M, log S and the 1/C of smoothing are
global (over every shard).
"""

import triton
import triton.language as tl

from .norms import inverse_norm
from .tiles import class_cos_tile, logit_gradient, row_rule, target_offsets

FLOAT16_MAX = tl.constexpr(65504.0)


@triton.jit
def _dot_operand(g, dtype: tl.constexpr):
    """G·r·2^k in the input dtype, clamped to float16's range for float16 (see the module)."""
    if dtype == tl.float16:
        g = tl.minimum(tl.maximum(g, -FLOAT16_MAX), FLOAT16_MAX)
    return g.to(dtype)


@triton.jit
def _row_statistics(
    y_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, inv_x_ptr,
    rows, B, C_local, class_start, scale, ignore_index,
):
    """For a block of rows: (the target's local column or −1, target logit, M, log S, σ/s,
    u·s (0 for ignored rows and rows past B), r_x)."""
    row_ok = rows < B
    labels = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    local = labels - class_start
    target_col = tl.where(valid & (local >= 0) & (local < C_local), local, -1)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sumexp = tl.load(log_sumexp_ptr + rows, mask=row_ok, other=0.0)
    slope_ratio = tl.load(target_slope_ptr + rows, mask=row_ok, other=0.0) / scale
    upstream = tl.load(upstream_ptr + rows, mask=row_ok, other=0.0)
    upstream_scaled = tl.where(valid, upstream * scale, 0.0)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    return target_col, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, inv_x


@triton.jit
def row_grad_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, target_logit_ptr, target_slope_ptr, rule_threshold_ptr,
    rule_offset_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, lift_ptr, dx_part_ptr,
    B, C_local, D, stride_x, stride_w, class_start, classes_per_split, batch_bucket,
    scale, ignore_index, target_weight, smoothing_per_class, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # target_weight = 1 − ε, smoothing_per_class = ε / C (C the global class count).
    # batch_bucket: unused in the body; the autotuning key (B rounded up to a power of two).
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    d_slice = tl.program_id(2).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    target_col, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, inv_x = _row_statistics(
        y_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, inv_x_ptr,
        rows, B, C_local, class_start, scale, ignore_index)
    threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)
    lift = tl.load(lift_ptr)
    g_dims = d_slice * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    g_ok = g_dims < D

    acc = tl.zeros((BLOCK_B, BLOCK_G), tl.float32)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C_local)
    tile = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tile
        col_ok = cols < c_end
        cos, choice = class_cos_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, inv_x, inv_w_ptr, D, stride_x,
                                     stride_w, BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION, SUBCENTERS, False)
        is_target = tl.arange(0, BLOCK_C)[None, :] == target_offsets(target_col, c0, BLOCK_C)[:, None]
        g = logit_gradient(cos, is_target, target_logit[:, None], row_max[:, None], log_sumexp[:, None],
                           slope_ratio[:, None], upstream_scaled[:, None], threshold[:, None], offset[:, None], quadratic,
                           scale, target_weight, smoothing_per_class, NEGATIVES_RULE)
        for k in tl.static_range(SUBCENTERS):
            w_rows = cols * SUBCENTERS + k
            inv_w = tl.load(inv_w_ptr + w_rows, mask=col_ok, other=0.0)
            g_k = g
            if SUBCENTERS > 1:
                g_k = tl.where(choice == k, g, 0.0)  # the classes whose gradient goes to sub-centre k
            g_k = g_k * (inv_w * lift)[None, :]  # columns past the split: r_w = 0 and w = 0
            w = tl.load(w_ptr + w_rows[:, None] * stride_w + g_dims[None, :],
                        mask=col_ok[:, None] & g_ok[None, :], other=0.0)
            acc = tl.dot(_dot_operand(g_k, w_ptr.dtype.element_ty), w, acc, input_precision=DOT_PRECISION)

    out = dx_part_ptr + (split * B + rows[:, None]) * D + g_dims[None, :]
    tl.store(out, acc / lift, mask=row_ok[:, None] & g_ok[None, :])


@triton.jit
def class_grad_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, target_logit_ptr, target_slope_ptr, rule_threshold_ptr,
    rule_offset_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, lift_ptr, dw_ptr,
    B, C_local, D, stride_x, stride_w, class_start, batch_bucket,
    scale, ignore_index, target_weight, smoothing_per_class, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_c = tl.program_id(0).to(tl.int64)
    d_slice = tl.program_id(1).to(tl.int64)
    sub = tl.program_id(2)  # the sub-centre of its classes this program owns (0 without sub-centres)
    c0 = pid_c * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < C_local
    w_rows = cols * SUBCENTERS + sub
    inv_w = tl.load(inv_w_ptr + w_rows, mask=col_ok, other=0.0)
    lift = tl.load(lift_ptr)
    g_dims = d_slice * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    g_ok = g_dims < D
    batch = tl.arange(0, BLOCK_B).to(tl.int64)

    acc = tl.zeros((BLOCK_C, BLOCK_G), tl.float32)
    w_hat_dot_g = tl.zeros((BLOCK_C,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + batch
        row_ok = rows < B
        target_col, target_logit, row_max, log_sumexp, slope_ratio, upstream_scaled, inv_x = _row_statistics(
            y_ptr, target_logit_ptr, target_slope_ptr, row_max_ptr, log_sumexp_ptr, upstream_ptr, inv_x_ptr,
            rows, B, C_local, class_start, scale, ignore_index)
        threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)
        cos, choice = class_cos_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, inv_x, inv_w_ptr, D, stride_x,
                                     stride_w, BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION, SUBCENTERS, True)
        is_target = tl.arange(0, BLOCK_C)[:, None] == target_offsets(target_col, c0, BLOCK_C)[None, :]
        g = logit_gradient(cos, is_target, target_logit[None, :], row_max[None, :], log_sumexp[None, :],
                           slope_ratio[None, :], upstream_scaled[None, :], threshold[None, :], offset[None, :], quadratic,
                           scale, target_weight, smoothing_per_class, NEGATIVES_RULE)
        if SUBCENTERS > 1:
            g = tl.where(choice == sub, g, 0.0)  # the classes whose gradient goes to this sub-centre
        w_hat_dot_g += tl.sum(g * cos, axis=1)
        x = tl.load(x_ptr + rows[:, None] * stride_x + g_dims[None, :],
                    mask=row_ok[:, None] & g_ok[None, :], other=0.0)
        operand = _dot_operand(g * (inv_x * lift)[None, :], x_ptr.dtype.element_ty)
        acc = tl.dot(operand, x, acc, input_precision=DOT_PRECISION)

    # dW_j = (dŴ_j − ŵ_j (ŵ_j·dŴ_j))·r_wj with ŵ_j = w_j·r_wj formed first (no product of a huge row
    # with r_wj² underflows), the projection term dropped where ‖w_j‖ < 1e-12 (r_wj = 1/1e-12:
    # F.normalize's clamp holds the norm constant)
    mask = col_ok[:, None] & g_ok[None, :]
    w = tl.load(w_ptr + w_rows[:, None] * stride_w + g_dims[None, :], mask=mask, other=0.0)
    along_w = tl.where(inv_w < inverse_norm(0.0), w_hat_dot_g, 0.0)
    out = (acc / lift - (w.to(tl.float32) * inv_w[:, None]) * along_w[:, None]) * inv_w[:, None]
    tl.store(dw_ptr + w_rows[:, None] * D + g_dims[None, :], out.to(dw_ptr.dtype.element_ty), mask=mask)
