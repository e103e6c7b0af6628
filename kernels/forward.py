"""Forward kernel: per-row partials of the logits over a range of classes.

Math (x̂, ŵ the L2-normalised rows, eps 1e-12; s the scale; y_i a global class id; z_iy the
target logit the caller supplies, s·f(c_iy) for a margin f evaluated in PyTorch):

    c_ij = clamp(x̂_i · ŵ_j, −1, 1)
    z_ij = s·c_ij  (j ≠ y_i),   z_iy = target_logit_i
    (NEGATIVES_RULE: z_ij = s·c_ij·(a_i + q·c_ij) where c_ij > τ_i, j ≠ y_i; tiles.py)
    (SUBCENTERS = K > 1: c_ij = max_k clamp(x̂_i · ŵ_{jK+k}, −1, 1); tiles.class_cos_tile)
    over the classes j of one split, per row i:
        max_i       = max_j z_ij
        sumexp_i    = Σ_j exp(z_ij − max_i)        (online: rescaled as the max grows)
        logit_sum_i = Σ_j z_ij                      (label smoothing)
        best_cos_i  = max_j c_ij,  best_class_i = argmax_j c_ij (global id, first on ties)

Grid: (cdiv(B, BLOCK_B), n_splits). Program (b, k) owns rows [b·BLOCK_B, …) and the classes
[k·classes_per_split, min((k+1)·classes_per_split, C_local)) of this shard of W, which it walks in
BLOCK_C tiles; each tile's D loop loads x and W chunks for the dot product alone, scaled in the
epilogue by the inverse norms 1/max(‖x_i‖, 1e-12), 1/max(‖w_j‖, 1e-12) of a pre-pass
(`tiles.cos_tile`). It writes one partial per row into row k of each (n_splits, B) output; the host
merges the splits (`marginfused.partials.merge`) and the loss is
ℓ_i = lse_i − (1−ε)·z_iy − (ε/C)·logit_sum_i (`marginfused.partials.row_loss`).

Saved for the backward pass: max_i and sumexp_i of the merged partials (lse_i = max_i +
log sumexp_i) beside the target logits and slopes (4·B floats). The backward kernel recomputes
each cosine tile (see backward.py).

Sharding: columns are local indices j_local ∈ [0, C_local); the global class id is
class_start + j_local, labels are global, so a shard of W is just (W_shard, class_start).
All offsets are int64.
"""

import triton
import triton.language as tl

from .tiles import class_cos_tile, negative_logits, row_rule, target_offsets


@triton.jit
def row_partials_kernel(
    x_ptr, w_ptr, y_ptr, inv_x_ptr, inv_w_ptr, target_logit_ptr, rule_threshold_ptr, rule_offset_ptr,
    max_ptr, sumexp_ptr, logit_sum_ptr, best_cos_ptr, best_class_ptr,
    B, C_local, D, stride_x, stride_w, class_start, classes_per_split, batch_bucket,
    scale, ignore_index, quadratic,
    DOT_PRECISION: tl.constexpr, NEGATIVES_RULE: tl.constexpr, SUBCENTERS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # C_local counts classes; W has C_local·SUBCENTERS rows
    # batch_bucket: unused in the body; the autotuning key (B rounded up to a power of two).
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    labels = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    local = labels - class_start
    has_target = row_ok & (labels != ignore_index) & (local >= 0) & (local < C_local)
    target_col = tl.where(has_target, local, -1)
    target_logit = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    inv_x = tl.load(inv_x_ptr + rows, mask=row_ok, other=0.0)
    threshold, offset = row_rule(rule_threshold_ptr, rule_offset_ptr, rows, row_ok, NEGATIVES_RULE)

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    logit_sum = tl.zeros((BLOCK_B,), tl.float32)
    best_cos = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_class = tl.zeros((BLOCK_B,), tl.int64) + class_start

    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C_local)
    tile = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tile
        col_ok = cols < c_end
        cos, _ = class_cos_tile(x_ptr, w_ptr, rows, cols, row_ok, col_ok, inv_x, inv_w_ptr, D, stride_x, stride_w,
                                BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION, SUBCENTERS, False)
        is_target = tl.arange(0, BLOCK_C)[None, :] == target_offsets(target_col, c0, BLOCK_C)[:, None]
        negatives = negative_logits(cos, threshold[:, None], offset[:, None], quadratic, scale, NEGATIVES_RULE)
        z = tl.where(is_target, target_logit[:, None], negatives)
        z = tl.where(col_ok[None, :], z, float("-inf"))

        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        logit_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)

        cos = tl.where(col_ok[None, :], cos, float("-inf"))
        tile_best = tl.max(cos, axis=1)
        tile_arg = tl.argmax(cos, axis=1).to(tl.int64)
        better = tile_best > best_cos  # strict: an earlier class wins ties
        best_cos = tl.where(better, tile_best, best_cos)
        best_class = tl.where(better, class_start + c0 + tile_arg, best_class)

    out = split * B + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sumexp_ptr + out, run_sum, mask=row_ok)
    tl.store(logit_sum_ptr + out, logit_sum, mask=row_ok)
    tl.store(best_cos_ptr + out, best_cos, mask=row_ok)
    tl.store(best_class_ptr + out, best_class, mask=row_ok)
