"""The class centres' gradient: every element written once, by the program that owns it —
flash-attention's dK/dV kernel with K = V = W (the embeddings' gradient needs no kernel of its own:
kernels/forward.py assembles it from the forward's O).

Math, for a valid row i (label ≠ ignore_index) with upstream gradient u_i, smoothing ε and the
saved row statistics over all C classes, M_i = max_j z_ij and log S_i = log Σ_j exp(z_ij − M_i):

    p_ij = exp(z_ij − lse_i),  lse_i = M_i + log S_i

    ∂ℓ_i/∂z_ij = p_ij − (1−ε)·[j = y_i] − ε/C
    G_ij = ∂(u·ℓ)/∂c_ij = u_i · s · (p_ij − ε/C)                         j ≠ y_i
    G_iy = u_i · σ_i · (p_iy − (1−ε) − ε/C)        σ_i = ∂z_iy/∂c_iy, the caller's target slope
                                                   (s, or s·f′(c_iy) for margin_grad="exact")
    with z_iy the caller's target logit (the kernels never evaluate a margin); under a
    negatives rule (NEGATIVES_RULE) a hard negative's z_ij = s·c_ij·(a_i + q·c_ij) and its
    s in G_ij becomes s·(a_i + 2q·c_ij) (tiles.py)
    (the clamp of c to [−1, 1] bounds the value only; the gradient passes through it)
    dŴ_j = Σ_i G_ij x̂_i = Σ_i (G_ij r_xi) x_i

Ignored rows have G = 0. The kernel computes G_ij of the negatives, from lse_i in one float32
(rounded to ~4e-6 at s = 64: a relative error of p_ij that small beside the cosines' own); the
target column's G_iy, where p_iy − 1 for a confident row would inherit that error, comes from the
host per row (`target_grad`, from M_i and log S_i in two parts: marginfused/backends/triton.py),
with u_i·s per row (`row_grad`, 0 for ignored rows and rows past B) and each row's target as a
local column (`target`, −1 where none). The inverse norms r are the forward's (kernels/norms.py,
saved for the backward); they scale G, not the operands, so the x and W tiles go from memory to
`tl.dot` untouched. Every sum runs in a fixed order and no atomic is used, so the gradient is
bit-identical run to run.

`weight_grad_kernel` — dW. One-dimensional grid of cdiv(C_local, BLOCK_C)·K·slices programs,
program (c, k, g) at c·K·slices + k·slices + g: the programs of one class tile are adjacent, so the
tile's rows of W can come from L2 for all but the first. With two resident parts the host launches
each slice on its own (cdiv(C_local, BLOCK_C) programs, OWN its part as a constant, so that both sum
D's parts in one order: tiles.pair_dot), and W is read once per launch. Program (c, k, g) owns
sub-centre k of the class tile c (its W rows jK + k) and the columns [g·BLOCK_G, …) of D, and loops
over every batch tile, in order, with its cosine tiles class-major (BLOCK_C × BLOCK_B),
accumulating Σ_i G_ij r_xi x_i[cols] in a (BLOCK_C × BLOCK_G) float32 register tile. With PARTS = 1
or 2 (one row per class) its class tile of W stays resident, as PARTS parts of BLOCK_G columns,
while x's tiles stream (tiles.py), and each x tile's own part feeds both dots; with PARTS = 0 the
cosines' dot streams D in BLOCK_D chunks and the x tile's slice is loaded for the gradient's dot.
The last batch tile's rows past B repeat row B − 1 with G = 0 (tiles.clamped_rows).
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
for each further slice (each recomputes the cosines): 6·B·C·D at D = 512 in two slices of 256 (Hopper's
16-bit configuration: kernels/configs.py).
Sharding: as in forward.py (the host passes each row's target as a local column); lse and the 1/C
of smoothing are global (over every shard).
"""

import triton
import triton.language as tl

from .norms import inverse_norm
from .tiles import (
    clamped, clamped_rows, dot_operand, hard_slopes, load_rows, negative_logits, pair_dot, row_rule, streamed_dot,
    subcentre_cosines,
)


@triton.jit
def weight_grad_kernel(
    x_ptr, w_ptr, inv_x_ptr, inv_w_ptr, lse_ptr, row_grad_ptr, target_grad_ptr, target_ptr, rule_threshold_ptr,
    rule_offset_ptr, lift_ptr, dw_ptr,
    B, C_local, D, stride_x, stride_w, scale, smoothing_per_class, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, OWN: tl.constexpr,
):
    # smoothing_per_class = ε / C (C the global class count). PARTS > 0 (W resident) with one row per
    # class only: K resident tiles would not fit.
    tl.static_assert(PARTS == 0 or SUBCENTERS == 1)
    pid = tl.program_id(0).to(tl.int64)
    slices = tl.cdiv(D, BLOCK_G)
    if PARTS == 2:
        slices = 1  # one launch per slice (OWN)
    per_tile = slices * SUBCENTERS
    c0 = (pid // per_tile) * BLOCK_C
    sub = ((pid % per_tile) // slices).to(tl.int32)  # the sub-centre of its classes this program owns
    d_slice = (pid % slices).to(tl.int32)
    if PARTS == 2:
        d_slice = OWN
    tile = tl.arange(0, BLOCK_C)
    classes = clamped_rows(tile, (C_local - c0).to(tl.int32))
    w_rows = classes * SUBCENTERS + sub
    inv_w = tl.load(inv_w_ptr + c0 * SUBCENTERS + w_rows)
    lift = tl.load(lift_ptr)
    g_dims = d_slice * BLOCK_G + tl.arange(0, BLOCK_G)  # dW's columns; W's own part
    other_dims = g_dims
    if PARTS > 0:
        w_own = load_rows(w_ptr, c0, classes, g_dims, D, stride_w)
        w_other = w_own
        if PARTS == 2:
            other_dims = (1 - d_slice) * BLOCK_G + tl.arange(0, BLOCK_G)
            w_other = load_rows(w_ptr, c0, classes, other_dims, D, stride_w)

    acc = tl.zeros((BLOCK_C, BLOCK_G), tl.float32)
    w_hat_dot_g = tl.zeros((BLOCK_C,), tl.float32)
    batch = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + batch.to(tl.int64)
        row_ok = rows < B
        x_rows = clamped_rows(batch, (B - b0).to(tl.int32))
        inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
        x_g = load_rows(x_ptr, b0, x_rows, g_dims, D, stride_x)  # x's own part: both dots' operand
        if PARTS > 0:
            x_other = x_g
            if PARTS == 2:
                x_other = load_rows(x_ptr, b0, x_rows, other_dims, D, stride_x)
            cos = clamped(pair_dot(w_own, x_g, w_other, x_other, PARTS, OWN, DOT_PRECISION), inv_w, inv_x)
        elif SUBCENTERS > 1:
            cos, choice = subcentre_cosines(x_ptr, w_ptr, b0, x_rows, inv_x, c0, classes, inv_w_ptr, D, stride_x,
                                            stride_w, BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION, SUBCENTERS, True)
        else:
            cos = clamped(streamed_dot(w_ptr, x_ptr, c0, classes, b0, x_rows, D, stride_w, stride_x, BLOCK_C, BLOCK_B,
                                       BLOCK_D, DOT_PRECISION), inv_w, inv_x)
        threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        row_grad = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0)
        z = negative_logits(cos, threshold[None, :], offset[None, :], quadratic, scale, NEGATIVES_RULE)
        g = row_grad[None, :] * (tl.exp(z - lse[None, :]) - smoothing_per_class)
        if NEGATIVES_RULE:
            g = g * hard_slopes(cos, threshold[None, :], offset[None, :], quadratic)
        target = tl.load(target_ptr + rows, mask=row_ok, other=-1) - c0.to(tl.int32)
        target_grad = tl.load(target_grad_ptr + rows, mask=row_ok, other=0.0)
        g = tl.where(tile[:, None] == target[None, :], target_grad[None, :], g)
        if SUBCENTERS > 1:
            g = tl.where(choice == sub, g, 0.0)  # the classes whose gradient goes to this sub-centre
        w_hat_dot_g += tl.sum(g * cos, axis=1)
        operand = dot_operand(g * (inv_x * lift)[None, :], x_ptr.dtype.element_ty)
        acc = tl.dot(operand, x_g, acc, input_precision=DOT_PRECISION)

    # dW_j = (dŴ_j − ŵ_j (ŵ_j·dŴ_j))·r_wj with ŵ_j = w_j·r_wj formed first (no product of a huge row
    # with r_wj² underflows), the projection term dropped where ‖w_j‖ < 1e-12 (r_wj = 1/1e-12:
    # F.normalize's clamp holds the norm constant). One half of the slice's columns at a time: the
    # accumulator splits into its halves in registers, and only a half tile of W is live beside it
    # (a whole BLOCK_C × 256 one spills on sm_90).
    along_w = tl.where(inv_w < inverse_norm(0.0), w_hat_dot_g, 0.0)
    out_rows = c0 * SUBCENTERS + w_rows
    HALF: tl.constexpr = BLOCK_G // 2
    halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_C, 2, HALF)), (0, 2, 1)))
    for h in tl.static_range(2):
        dims = d_slice * BLOCK_G + h * HALF + tl.arange(0, HALF)
        w = load_rows(w_ptr, c0 * SUBCENTERS, w_rows, dims, D, stride_w).to(tl.float32)
        out = (halves[h] / lift - (w * inv_w[:, None]) * along_w[:, None]) * inv_w[:, None]
        mask = (tile < C_local - c0)[:, None] & (dims < D)[None, :]
        tl.store(dw_ptr + out_rows[:, None] * D + dims[None, :], out.to(dw_ptr.dtype.element_ty), mask=mask)
