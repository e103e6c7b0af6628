"""Shared `@triton.jit` helpers: tiles of rows, the raw dot products of a cosine tile, and the
logits' rules.

Every kernel walks tiles of c_ij = clamp(x_i·w_j·r_xi·r_wj, −1, 1), r = 1/max(‖·‖, 1e-12) the
inverse norms of the forward's pre-pass (kernels/norms.py; B + C floats, no normalised copy of x
or W anywhere): the raw dot products come from the tensor cores, the inverse norms scale them in
the epilogue. A raw dot product over D is taken one of two ways (a kernel's constexpr PARTS):

- **resident** (PARTS = 1 or 2): the operand that stays (the forward's batch tile of x, the dW
  kernel's class tile of W) is loaded once, before the loop over the other's tiles, as PARTS
  parts of BLOCK_G columns (D ≤ PARTS·BLOCK_G); each streamed tile is loaded as the same parts,
  and `pair_dot` sums the parts' products. A program owns the slice of D of one part (its own,
  part d_slice), and that part of the streamed tile feeds its gradient dot too, so each tile goes
  from memory to the tensor cores once. With two parts each slice is a launch of its own, OWN the
  part it owns as a constant, so `pair_dot` sums the parts in D's order, part 0 then part 1, in
  every slice: the same dots in the same order, so both slices compute bit-identical cosines. (A
  sum of two float32 tiles would not: Triton folds the addition into the second dot's
  accumulator, so each slice would sum its own part first.)
- **streamed** (PARTS = 0, any D): `streamed_dot` loops over D in BLOCK_D chunks of both operands,
  for D too large to keep resident.

A streamed tile's rows past the end of its range are its last row again (`clamped_rows`), so its
loads need no row mask (only D's, which is the same for every tile) and are pipelined as whole
rows; the kernels keep those columns out of every sum. Batch-major tiles (BLOCK_B × BLOCK_C: rows
of x down, classes across) are the forward's; the dW kernel holds its tiles class-major (BLOCK_C ×
BLOCK_B), so each kernel's weight tile is already the left operand of its next dot.

**No tile that feeds `tl.dot` is also used by other register math**: on Hopper, Triton 3.x then
allocates one shared-memory buffer too few and an in-flight wgmma reads a buffer the next copy
overwrites (triton-lang/triton #6691). A tile feeding two dots (the own part: the cosines' dot and
the gradient's) is sound under Triton 3.6 and 3.9: the compile check reads its ring
(kernels/rings.py).

The kernels never evaluate a margin, and no kernel sees a target logit: the forward leaves each
row's target column out of its sums (the host adds it: marginfused/backends/triton.py), the dW
kernel takes the target column's gradient from the host. Under a negatives rule (NEGATIVES_RULE;
`marginfused.negatives`) a negative with c_ij > τ_i takes z = s·c·(a_i + q·c), with ∂z/∂c =
s·(a_i + 2q·c), τ_i and a_i per row from the caller, q a scalar; without one the rule's arguments
are never read.
"""

import triton
import triton.language as tl

FLOAT16_MAX = tl.constexpr(65504.0)


@triton.jit
def clamped_rows(ids, count):
    """In-tile row ids (int32) limited to the `count` rows the range has left: past it, its last
    row again."""
    return tl.minimum(ids, count - 1)


@triton.jit
def load_rows(ptr, first, rows, dims, D, stride):
    """Rows first + rows (`first` an int64 scalar, `rows` in-tile int32 ids) of a matrix at columns
    `dims` (zeros past D)."""
    return tl.load(ptr + first * stride + (rows[:, None] * stride + dims[None, :]), mask=(dims < D)[None, :],
                   other=0.0)


@triton.jit
def pair_dot(a_own, b_own, a_other, b_other, PARTS: tl.constexpr, OWN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a·bᵀ over D from the parts of two tiles (module docstring): a_own·b_ownᵀ, and with PARTS = 2
    the other part's product accumulated in D's order (OWN: the part a_own is, 0 or 1; a_other,
    b_other unused with one part)."""
    first_a, first_b, second_a, second_b = a_own, b_own, a_other, b_other
    if OWN == 1:
        first_a, first_b, second_a, second_b = a_other, b_other, a_own, b_own
    dot = tl.dot(first_a, tl.trans(first_b), input_precision=DOT_PRECISION)
    if PARTS == 2:
        dot = tl.dot(second_a, tl.trans(second_b), dot, input_precision=DOT_PRECISION)
    return dot


@triton.jit
def streamed_dot(
    p_ptr, q_ptr, p_first, p_rows, q_first, q_rows, D, stride_p, stride_q,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The raw (BLOCK_P × BLOCK_Q) dot products between rows p_first + p_rows of one matrix and
    rows q_first + q_rows of the other (x and W in either order), over D in chunks of BLOCK_D."""
    dot = tl.zeros((BLOCK_P, BLOCK_Q), tl.float32)
    dims = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        p = load_rows(p_ptr + d0, p_first, p_rows, dims, D - d0, stride_p)
        q = load_rows(q_ptr + d0, q_first, q_rows, dims, D - d0, stride_q)
        dot = tl.dot(p, tl.trans(q), dot, input_precision=DOT_PRECISION)
    return dot


@triton.jit
def clamped(dot, inv_p, inv_q):
    """The cosines of raw dot products, by the rows' inverse norms (inv_p down, inv_q across),
    clamped to [−1, 1]."""
    cos = dot * inv_p[:, None] * inv_q[None, :]
    return tl.minimum(tl.maximum(cos, -1.0), 1.0)


@triton.jit
def subcentre_cosines(
    x_ptr, w_ptr, x_first, x_rows, inv_x, c0, classes, inv_w_ptr, D, stride_x, stride_w, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SUBCENTERS: tl.constexpr,
    CLASS_MAJOR: tl.constexpr,
):
    """With K = SUBCENTERS > 1 rows of W per class (rows jK + k): the cosines of the classes
    c0 + classes (in-tile ids), each the largest of its K, batch-major (BLOCK_B × BLOCK_C) or
    CLASS_MAJOR (BLOCK_C × BLOCK_B), and which k gives it (int32, the first on ties), D streamed
    from x's rows x_first + x_rows (sub-centres never keep a tile resident: K of them would not
    fit)."""
    shape: tl.constexpr = (BLOCK_C, BLOCK_B) if CLASS_MAJOR else (BLOCK_B, BLOCK_C)
    best = tl.full(shape, -2.0, tl.float32)  # below every clamped cosine
    choice = tl.zeros(shape, tl.int32)
    for k in tl.static_range(SUBCENTERS):
        w_rows = classes * SUBCENTERS + k
        inv_w = tl.load(inv_w_ptr + c0 * SUBCENTERS + w_rows)
        if CLASS_MAJOR:
            cos = clamped(streamed_dot(w_ptr, x_ptr, c0 * SUBCENTERS, w_rows, x_first, x_rows, D, stride_w, stride_x,
                                       BLOCK_C, BLOCK_B, BLOCK_D, DOT_PRECISION), inv_w, inv_x)
        else:
            cos = clamped(streamed_dot(x_ptr, w_ptr, x_first, x_rows, c0 * SUBCENTERS, w_rows, D, stride_x, stride_w,
                                       BLOCK_B, BLOCK_C, BLOCK_D, DOT_PRECISION), inv_x, inv_w)
        better = cos > best
        choice = tl.where(better, k, choice)
        best = tl.where(better, cos, best)
    return best, choice


@triton.jit
def target_columns(y_ptr, rows, row_ok, C_local, class_start, ignore_index):
    """Each row's target as a local column of the shard (int32), or −1 (ignored rows, rows past B,
    targets in another shard)."""
    labels = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    local = labels - class_start
    return tl.where(row_ok & (labels != ignore_index) & (local >= 0) & (local < C_local), local, -1).to(tl.int32)


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
def hard_slopes(cos, threshold, offset, quadratic):
    """(∂z/∂c)/s of a tile's entries as negatives under the rule: a + 2q·c for hard negatives, 1
    for the others."""
    return tl.where(cos > threshold, offset + 2.0 * quadratic * cos, 1.0)


@triton.jit
def dot_operand(g, dtype: tl.constexpr):
    """A weight tile (its fp16 lift applied) in the input dtype, clamped to float16's range for
    float16: a zero row's entries (r = 1/1e-12) then multiply its zeros to exactly 0, never inf·0
    (marginfused/backends/lift.py)."""
    if dtype == tl.float16:
        g = tl.minimum(tl.maximum(g, -FLOAT16_MAX), FLOAT16_MAX)
    return g.to(dtype)
