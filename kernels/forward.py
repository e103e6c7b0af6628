"""Forward kernel: per-row partials of the logits over a range of classes and, when the embeddings
need a gradient, the weighted centres O from which that gradient is assembled in O(B·D) —
flash-attention's forward with K = V = W.

**The logits** (x̂, ŵ the L2-normalised rows, r = 1/max(‖·‖, 1e-12) the inverse norms, s the scale;
y_i a global class id; z_iy and σ_i = ∂z_iy/∂c_iy the target logit and slope the caller supplies,
s·f(c_iy) and s or s·f′(c_iy) for a margin f evaluated in PyTorch):

    c_ij = clamp(x_i·w_j·r_xi·r_wj, −1, 1)
    z_ij = s·c_ij  (j ≠ y_i),   z_iy = target_logit_i
    (NEGATIVES_RULE: z_ij = s·c_ij·(a_i + q·c_ij) where c_ij > τ_i, j ≠ y_i, slope s·(a_i + 2q·c_ij);
     the inter-class filter is the rule a = q = 0: z = 0, slope 0; tiles.py)
    (SUBCENTERS = K > 1: c_ij = max_k clamp(x_i·w_{jK+k}·r_xi·r_{w,jK+k}, −1, 1), the gradient to the
     first arg-max sub-centre k*_ij, whose row w_{jK+k*} then stands for w_j below)
    slope_ij = ∂z_ij/∂c_ij:  σ_i (j = y_i),  s·(a_i + 2q·c_ij) (hard negatives),  s (other negatives)

over the classes j of one split but each row's target column, per row i, online (rescaled as the
running max m_i grows):

    max_i       = m_i = max_j z_ij
    sumexp_i    = Σ_j exp(z_ij − m_i)
    logit_sum_i = Σ_j z_ij                      (label smoothing)
    O_i         = Σ_j P̃_ij w_j,   P̃_ij = exp(z_ij − m_i)·(slope_ij/s)·r_wj        (CENTRES)
and over all its classes, the target's included,
    best_cos_i  = max_j c_ij,  best_class_i = argmax_j c_ij (global id, first on ties)

O starts at 0 and, when a tile raises the max from m to m′, is multiplied by exp(m − m′) before the
tile's P̃·W is added, as sumexp is; the W tile goes from memory to the dot untouched (r_w sits in
P̃). A split whose every column is a target has max −inf and sums 0. The target column is a range of
its own, which the host appends to the splits (marginfused/backends/triton.py): max z_iy, sumexp 1,
logit sum z_iy and O = (σ_i/s)·ŵ_{y_i} for a row whose target is in the shard, nothing otherwise;
all merge with the partials (`marginfused.partials.merge`): O = Σ_k O_k·exp(m_k − M). So no kernel
reads a target logit or slope.

**The embeddings' gradient from O.** With u_i the upstream gradient, ε the smoothing, C all classes,
M_i and log S_i the log-sum-exp over all classes (lse_i = M_i + log S_i, p_ij = exp(z_ij − lse_i)),
the gradient of Σ_i u_i·ℓ_i, ℓ_i = lse_i − (1−ε)·z_iy − (ε/C)·Σ_j z_ij, in the cosines is

    G_ij = ∂/∂c_ij = u_i·slope_ij·(p_ij − (1−ε)·[j = y_i] − ε/C)
    i.e. G_iy = u_i·σ_i·(p_iy − (1−ε) − ε/C),   G_ij = u_i·slope_ij·(p_ij − ε/C)  (j ≠ y_i)

(the clamp of c bounds the value only; the gradient passes through it), and in x̂_i

    dX̂_i = Σ_j G_ij ŵ_j
         = u_i·Σ_j slope_ij·p_ij·ŵ_j − u_i·σ_i·(1−ε)·ŵ_{y_i} − u_i·(ε/C)·Σ_j slope_ij·ŵ_j.

The first sum is O's (the target's range included): slope_ij·p_ij·ŵ_j =
s·exp(M_i − lse_i)·exp(z_ij − M_i)·(slope_ij/s)·r_wj·w_j, so

    u_i·Σ_j slope_ij·p_ij·ŵ_j = u_i·s·exp(−log S_i)·O_i          (O taken relative to M_i)

The upstream gradient is a per-row factor, so O does not depend on it: the forward makes O, the
backward scales it. The second term is the target's own, exact (ŵ_{y_i} gathered: one row per
row). The third, the smoothing term Q_i = Σ_j slope_ij·ŵ_j (only for ε > 0):

- without a negatives rule and sub-centres, slope_ij = s but on the target column, so
  Q_i = s·Σ_j ŵ_j + (σ_i − s)·ŵ_{y_i}: one D-vector per shard, Σ_j ŵ_j, which a second pass of this
  kernel makes over one row (SOFTMAX off: P̃_0j = r_wj, every column but row 0's target, whose
  ŵ the host adds back; launched as the rule variant with τ = +∞, which changes no slope);
- with a rule or sub-centres slope_ij and the row standing for w_j depend on i: a second pass of
  this kernel over every row computes Σ_{j≠y_i} (slope_ij/s)·r_wj·w_j (SOFTMAX off: P̃_ij =
  (slope_ij/s)·r_wj, no exponential, no max; the target column left out as in the first pass), and
  Q_i = s·(that) + σ_i·ŵ_{y_i}.

Ignored rows have u_i = 0 (no term at all); a row whose target lies in another shard has no target
term in this shard's sums. Then, through the normalisation (x̂ = x·r_x formed first, so nothing
overflows for huge rows; the projection dropped where ‖x_i‖ < 1e-12, F.normalize's clamp),

    dx_i = (dX̂_i − x̂_i (x̂_i·dX̂_i))·r_xi                         (marginfused/backends/triton.py)

Sharded (a rank holds the classes [class_start, + C_local)): each rank's O is relative to its own
max; it is rescaled by exp(m_local − M) with the global M before the backward, whose dx the ranks
sum (marginfused/distributed/loss.py).

**Precision.** P̃ ≤ max(1, |σ_i|/s, |a_i| + 2|q|)·r_wj. The dot takes P̃ in the input dtype; for
float16, P̃·2^k with 2^k the host's lift (marginfused/backends/lift.py: a power of two that brings
the largest possible entry to 2^15), so that small entries survive the cast — exp(z − m) at
initialisation is ~e^-13 of the row max, and a small entry of float16 loses its bits — and O is
multiplied by 2^-k (exact). A zero row's r_w = 1/1e-12: its entries of P̃·2^k are clamped to
float16's range, and multiply the row's zeros to exactly 0.

**Grid**: (cdiv(B, BLOCK_B), n_splits, slices). Program (b, k, g) owns rows [b·BLOCK_B, …), the
classes [k·classes_per_split, min((k+1)·classes_per_split, C_local)) of this shard of W, walked in
BLOCK_C tiles (a tile past the split's end repeats its last class, kept out of every sum:
tiles.clamped_rows), and the columns [g·BLOCK_G, …) of O. With PARTS = 1 or 2 its batch tile of x stays
resident, as PARTS parts of BLOCK_G columns, while W's tiles stream (tiles.py): D ≤ PARTS·BLOCK_G,
one slice per part, and each W tile's own part feeds the cosines' dot and O's; with two parts the
host launches each slice on its own (grid (cdiv(B, BLOCK_B), n_splits, 1), OWN its part as a
constant, so that both sum D's parts in one order: tiles.pair_dot). With PARTS = 0 the cosines' dot
streams D in BLOCK_D chunks and O's slice of each W tile is loaded for O's dot; the slices are
cdiv(D, BLOCK_G). Every slice computes the same cosines, bit for bit, and slice 0 writes the partials: one per row into row k of each (n_splits, B) output, O into
(n_splits, B, D) float32. The host merges the splits; the loss is
ℓ_i = lse_i − (1−ε)·z_iy − (ε/C)·logit_sum_i (`marginfused.partials.row_loss`).

Cost: 2·B·C·D FLOP for the cosines per slice, 2·B·C·D for O: 4·B·C·D with one slice, 2·B·C·D more
per further slice (D = 512 on Hopper: x resident in two slices of 256, 6·B·C·D; kernels/configs.py),
2·B·C·D without O. Sub-centres: K cosine dots and K
masked O dots per class tile.

Sharding: columns are local indices j_local ∈ [0, C_local); the global class id is
class_start + j_local, labels are global, so a shard of W is just (W_shard, class_start).
All offsets are int64.
"""

import triton
import triton.language as tl

from .tiles import (
    clamped, clamped_rows, dot_operand, hard_slopes, load_rows, negative_logits, pair_dot, row_rule, streamed_dot,
    subcentre_cosines, target_columns,
)


@triton.jit
def forward_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, rule_threshold_ptr, rule_offset_ptr, lift_ptr,
    max_ptr, sumexp_ptr, logit_sum_ptr, best_cos_ptr, best_class_ptr, centres_ptr,
    B, C_local, D, stride_x, stride_w, class_start, classes_per_split, scale, ignore_index, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr,
    SOFTMAX: tl.constexpr, CENTRES: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, OWN: tl.constexpr,
):
    # SOFTMAX: the partials, and P̃ = exp(z − m)·(slope/s)·r_w; without it (the smoothing term's pass)
    # no partials and P̃ = (slope/s)·r_w. CENTRES: O. C_local counts classes; W has C_local·SUBCENTERS
    # rows.
    tl.static_assert(PARTS == 0 or SUBCENTERS == 1)  # K resident tiles would not fit
    RESIDENT: tl.constexpr = PARTS > 0
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    d_slice = tl.program_id(2)
    if PARTS == 2:
        d_slice = OWN  # one launch per slice
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    target_col = target_columns(y_ptr, rows, row_ok, C_local, class_start, ignore_index)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)
    g_dims = d_slice * BLOCK_G + tl.arange(0, BLOCK_G)  # O's columns; x's own part
    other_dims = g_dims
    x_rows = tl.arange(0, BLOCK_B)  # in-tile rows of x for a streamed dot: past B, row B − 1 again
    if not RESIDENT:
        x_rows = clamped_rows(x_rows, (B - pid_b * BLOCK_B).to(tl.int32))
    x_own = inv_x  # stand-ins where x is not resident (never read)
    x_other = inv_x
    if RESIDENT:
        x_own = tl.load(x_ptr + rows[:, None] * stride_x + g_dims[None, :], mask=row_ok[:, None] & (g_dims < D)[None, :],
                        other=0.0)
        x_other = x_own
        if PARTS == 2:
            other_dims = (1 - d_slice) * BLOCK_G + tl.arange(0, BLOCK_G)
            x_other = tl.load(x_ptr + rows[:, None] * stride_x + other_dims[None, :],
                              mask=row_ok[:, None] & (other_dims < D)[None, :], other=0.0)
    if CENTRES:
        lift = tl.load(lift_ptr)
        acc = tl.zeros((BLOCK_B, BLOCK_G), tl.float32)

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    logit_sum = tl.zeros((BLOCK_B,), tl.float32)
    best_cos = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_col = tl.zeros((BLOCK_B,), tl.int32)  # relative to the split's first class

    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C_local)
    tile = tl.arange(0, BLOCK_C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        left = (c_end - c0).to(tl.int32)  # classes of the split from c0 on
        classes = clamped_rows(tile, left)
        inv_w = tl.load(inv_w_ptr + c0 * SUBCENTERS + classes * SUBCENTERS)  # sub-centre 0's
        if SUBCENTERS > 1:
            cos, choice = subcentre_cosines(x_ptr, w_ptr, pid_b * BLOCK_B, x_rows, inv_x, c0, classes, inv_w_ptr, D,
                                            stride_x, stride_w, BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION, SUBCENTERS,
                                            False)
        elif PARTS > 0:
            w_own = load_rows(w_ptr, c0, classes, g_dims, D, stride_w)
            w_other = w_own
            if PARTS == 2:
                w_other = load_rows(w_ptr, c0, classes, other_dims, D, stride_w)
            cos = clamped(pair_dot(x_own, w_own, x_other, w_other, PARTS, OWN, DOT_PRECISION), inv_x, inv_w)
        else:
            cos = clamped(streamed_dot(x_ptr, w_ptr, pid_b * BLOCK_B, x_rows, c0, classes, D, stride_x, stride_w,
                                       BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION), inv_x, inv_w)
        # out of the sums: each row's target column, and the columns past the split
        excluded = (tile[None, :] == (target_col - c0).to(tl.int32)[:, None]) | (tile >= left)[None, :]

        if SOFTMAX:
            tile_best, tile_arg = tl.max(tl.where((tile < left)[None, :], cos, float("-inf")), axis=1,
                                         return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best_cos  # strict: an earlier class wins ties
            best_cos = tl.where(better, tile_best, best_cos)
            best_col = tl.where(better, (c0 - c_begin).to(tl.int32) + tile_arg, best_col)

            z = tl.where(excluded, float("-inf"),
                         negative_logits(cos, threshold[:, None], offset[:, None], quadratic, scale, NEGATIVES_RULE))
            logit_sum += tl.sum(tl.where(excluded, 0.0, z), axis=1)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with every column out so far
            rescale = tl.exp(run_max - shift)
            p = tl.exp(z - shift[:, None])
            run_sum = run_sum * rescale + tl.sum(p, axis=1)
            run_max = new_max

        if CENTRES:
            if SOFTMAX:
                weights = p
                acc = acc * rescale[:, None]
            else:
                weights = tl.where(excluded, 0.0, 1.0)
            if NEGATIVES_RULE:
                weights = weights * hard_slopes(cos, threshold[:, None], offset[:, None], quadratic)
            for k in tl.static_range(SUBCENTERS):
                if SUBCENTERS == 1:
                    w_rows = classes
                    inv_w_k = inv_w
                else:
                    w_rows = classes * SUBCENTERS + k
                    inv_w_k = tl.load(inv_w_ptr + c0 * SUBCENTERS + w_rows)
                p_k = weights * (inv_w_k * lift)[None, :]
                if SUBCENTERS > 1:
                    p_k = tl.where(choice == k, p_k, 0.0)  # the classes whose gradient goes to sub-centre k
                if RESIDENT and SUBCENTERS == 1:
                    w_g = w_own  # the own part, already on its way to the cosines' dot
                else:
                    w_g = load_rows(w_ptr, c0 * SUBCENTERS, w_rows, g_dims, D, stride_w)
                acc = tl.dot(dot_operand(p_k, w_ptr.dtype.element_ty), w_g, acc, input_precision=DOT_PRECISION)

    if SOFTMAX:
        if d_slice == 0:  # every slice holds the same partials: the first writes them
            out = split * B + rows
            tl.store(max_ptr + out, run_max, mask=row_ok)
            tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
            tl.store(logit_sum_ptr + out, logit_sum, mask=row_ok)
            tl.store(best_cos_ptr + out, best_cos, mask=row_ok)
            tl.store(best_class_ptr + out, class_start + c_begin + best_col.to(tl.int64), mask=row_ok)
    if CENTRES:
        out = centres_ptr + (split * B + rows[:, None]) * D + g_dims[None, :]
        tl.store(out, acc / lift, mask=row_ok[:, None] & (g_dims < D)[None, :])
