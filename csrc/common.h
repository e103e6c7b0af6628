// What every translation unit of both extensions shares: the one argument of their entry points
// (Call) and the entry points' signatures; what a row pass reads (Rows, Chunk) and writes
// (SplitPartials); the negatives rule, the per-element gradient and the norm floor (host and
// device); the one dtype dispatch macro.
//
// Both backends are margin-agnostic: the caller supplies each row's target logit z_iy = s f(c_iy)
// and its slope σ_i = ∂z_iy/∂c_iy, whatever the margin f; the kernels compute the cosines, every
// other logit z_ij = s c_ij (or the negatives rule's, below), and the gradient through the
// normalisations. The algorithm is written out in driver.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

// Per-element helpers, inlined always: a call left in a loop over a tile row (GCC's inliner stops
// at its growth limit in a translation unit as large as a pybind module) keeps the loop scalar.
#define MF_INLINE inline __attribute__((always_inline))
#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MF_HOST_DEVICE MF_INLINE
#endif

// Dispatch over the input dtypes the fused backends compute from: float, half, bfloat16.
// Inside, `scalar_t` is the C++ type of the embeddings and weight; everything else is fp32.
#define MF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace marginfused {

// Every argument of both entry points, by name: built once per call from a KernelSettings and the
// tensors by marginfused/backends/extension.py, bound to Python by bindings.h (one field each,
// set by keyword). A forward call leaves the backward's fields undefined. Every (B,) tensor is
// fp32 on x's device.
struct Call {
  at::Tensor x;             // (B, D) embeddings: float32, float16 or bfloat16
  at::Tensor w;             // (C·K, D) this shard's class centres, x's dtype: K sub-centres per class
  at::Tensor y;             // (B,) int64 global labels, or ignore_index
  at::Tensor target_logit;  // (B,) z_iy, read only where y_i lies in this shard
  std::optional<at::Tensor> rule_threshold;  // (B,) τ_i of the negatives rule (NegativesRule), or None
  std::optional<at::Tensor> rule_offset;     // (B,) a_i, given with rule_threshold
  at::Tensor target_slope;  // (B,) σ_i                                                  (backward)
  at::Tensor row_max;       // (B,) m_i, and log s_i: the log-sum-exp over all classes,  (backward)
  at::Tensor log_sumexp;    //   lse_i = m_i + log s_i (marginfused/partials.py, LogSumExp)
  at::Tensor upstream;      // (B,) u_i, the upstream gradient of ℓ_i                   (backward)
  std::optional<at::Tensor> lift;  // (2,) (2^k, 2^-k), the fp16 lift (backends/lift.py), or None (backward)
  std::optional<at::Tensor> inv_x;  // (B,) q_i = 1/max(|x_i|, 1e-12) as the forward returned them, or None: (backward)
  std::optional<at::Tensor> inv_w;  // (C·K,) r_j of this shard's rows, likewise; given together     (backward)
  double scale = 1.0;            // s, the logit scale
  int64_t ignore_index = -100;   // the label of rows with no loss and no gradient
  double label_smoothing = 0.0;  // ε                                                    (backward)
  double rule_quadratic = 0.0;   // q of the negatives rule
  int64_t subcenters = 1;        // K
  int64_t num_classes = 1;       // C over every shard, for ε/C                          (backward)
  int64_t class_start = 0;       // the first global class of this shard
  int64_t chunk = 1024;          // rows of W per chunk (rounded down to whole classes)
  int64_t dx_splits = 1;         // ways the dX GEMM of a chunk splits its depth, at most    (backward)
};

// forward_partials: per-row partials over this shard's classes [class_start, class_start + C),
// unmerged: (max, sumexp, logit_sum, best_cos, best_class), each (splits, B), one row per split
// (a run of consecutive chunks, in class order), merged by marginfused/partials.py alone; then the
// inverse norms it computed, inv_x (B,) and inv_w (C·K,) fp32, for the backward's Call to take
// (it recomputes them where not given).
// backward: the gradients (grad_x, grad_w) of Σ_i u_i ℓ_i w.r.t. x and this shard, in the inputs'
// dtype; each is computed only where asked (need_x, need_w), else undefined (None).
using Partials = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Gradients = std::tuple<at::Tensor, at::Tensor>;
using ForwardPartialsFn = ForwardResult(const Call& call);
using BackwardFn = Gradients(const Call& call, bool need_x, bool need_w);

// x̂ = x / max(|x|, kNormEps): a copy of marginfused/constants.py's NORM_EPS = 1e-12 (F.normalize's
// default eps); tests/test_constants.py reads this header and fails when the copy drifts.
constexpr float kNormEps = 1e-12f;

MF_HOST_DEVICE float clamp_unit(float c) { return fminf(fmaxf(c, -1.0f), 1.0f); }

// Row norms that cannot overflow (marginfused/normalize.py): 1/max(|v|, 1e-12) from the row's sum of
// squares Σ v² where that is finite; where it overflows (an entry past ~1.8e19), from the row
// scaled by s, the power of two at or below its largest entry (exact):
//   1/max(|v|, ε) = (1/s) / max(|v/s|, ε/s).
// Underflow of the squares needs no care: it happens only far below ε, where the norm is clamped.
MF_HOST_DEVICE float inverse_norm(float sum_of_squares) { return 1.0f / fmaxf(sqrtf(sum_of_squares), kNormEps); }
MF_HOST_DEVICE bool squares_overflowed(float sum_of_squares) { return !(sum_of_squares <= 3.40282347e38f); }
MF_HOST_DEVICE float row_scale(float largest_entry) { return exp2f(floorf(log2f(largest_entry))); }
MF_HOST_DEVICE float scaled_inverse_norm(float scale, float scaled_sum_of_squares) {
  return (1.0f / scale) / fmaxf(sqrtf(scaled_sum_of_squares), kNormEps / scale);
}
// Whether a row's norm is at least 1e-12, from its inverse norm (1/1e-12 exactly where it is not).
MF_HOST_DEVICE bool above_norm_floor(float inverse) { return inverse < 1.0f / kNormEps; }

// The negatives rule (marginfused/negatives.py), per row: a non-target entry with c > τ_i takes
// z = s c (a_i + q c), ∂z/∂c = s (a_i + 2 q c); every other one s c, s.
// (CurricularFace: τ_i = cos(θ_iy + m), a_i = t, q = 1; inter-class filtering: τ, 0, 0.)
struct NegativesRule {
  const float* threshold;  // (B,) τ_i, or nullptr: no rule
  const float* offset;     // (B,) a_i
  float quadratic;         // q
};

// A row's negatives where the call has no rule (the fast loops).
struct NoRule {
  float scale;
  MF_HOST_DEVICE float logit(float c) const { return scale * c; }
  MF_HOST_DEVICE float slope(float) const { return scale; }
};

// A row's negatives under the rule (τ_i = +inf where the call has none: every entry plain).
struct RowRule {
  float scale, threshold, offset, quadratic;
  MF_HOST_DEVICE float logit(float c) const { return c > threshold ? scale * c * (offset + quadratic * c) : scale * c; }
  MF_HOST_DEVICE float slope(float c) const {
    return c > threshold ? scale * (offset + 2.0f * quadratic * c) : scale;
  }
};

MF_HOST_DEVICE RowRule row_rule(const NegativesRule& rule, float scale, int64_t i) {
  return rule.threshold ? RowRule{scale, rule.threshold[i], rule.offset[i], rule.quadratic}
                        : RowRule{scale, INFINITY, 0.0f, 0.0f};
}

// What a row pass reads of the call besides its chunk: the per-row data (pointers to (B,) arrays
// on the tensors' device) and the scalars. Plain data, passed by value to CUDA kernels.
//
// The backward's probabilities come from the log-sum-exp as Python keeps it, in two float32 parts:
//   p_ij = exp((z_ij − m_i) − log s_i),
// whose first difference is exact where p matters (z near m), so p keeps float32's relative accuracy.
struct Rows {
  const float* q;             // 1/max(|x_i|, 1e-12)
  const int64_t* labels;      // y_i
  const float* target_logit;  // z_iy
  const float* target_slope;  // σ_i                                     (backward)
  const float* row_max;       // m_i                                     (backward)
  const float* log_sumexp;    // log s_i                                 (backward)
  const float* upstream;      // u_i                                     (backward)
  const float* lift;          // (2^k, 2^-k), or nullptr: no fp16 lift   (backward)
  NegativesRule rule;
  float scale;                // s
  float label_smoothing;      // ε
  float smoothing_per_class;  // ε/C
  int64_t ignore_index;
  int64_t subcenters;         // K
};

// A chunk: the weight's rows [row0, row0 + rows), whole classes of K sub-centres, so its `classes`
// = rows / K classes are the global ones [class0, class0 + classes).
struct Chunk {
  int64_t row0, rows, classes, class0;
};

// The target's column in a chunk of n classes from global class chunk_start, or -1 when the row
// is ignored (label == ignore_index) or its label lies outside the chunk.
MF_HOST_DEVICE int64_t target_column(int64_t label, int64_t chunk_start, int64_t n, int64_t ignore_index) {
  const int64_t local = label - chunk_start;
  return label != ignore_index && local >= 0 && local < n ? local : -1;
}

// ∂ℓ_i/∂c_ij of one element, before the upstream gradient u_i and the normalisations:
//   slope · (p_ij − (1−ε)[j = y_i] − ε/C),
// with slope = ∂z_ij/∂c_ij: s off the target (or the rule's), σ_i on it.
MF_HOST_DEVICE float logit_grad(float prob, float slope, bool is_target, float label_smoothing,
                                float smoothing_per_class) {
  const float g = prob - smoothing_per_class;
  return slope * (is_target ? g - (1.0f - label_smoothing) : g);
}

// The partials of one split, written in place by the row passes: row `split` of the five
// (splits, B) outputs of forward_partials. A split walks its chunks in class order, as the Triton
// forward walks its tiles, and folds each into every row's running partials:
//   m_i ← m' = max(m_i, max_j z_ij),  s_i ← s_i·exp(m_i − m') + Σ_j exp(z_ij − m'),  Σ_j z_ij added,
// and the chunk's best cosine taken where strictly larger (an earlier class keeps a tie, so the
// first maximal class wins, as argmax). Splits start as the empty range's partials
// (−inf, 0, 0, −inf, class_start).
struct SplitPartials {
  float* max;
  float* sumexp;
  float* logit_sum;
  float* best_cos;
  int64_t* best_class;
};

// The fold above for the logits of one chunk, given m' (`new_max`), Σ_j exp(z_ij − m') and Σ_j z_ij.
MF_HOST_DEVICE void fold_logits(const SplitPartials& out, int64_t i, float new_max, float chunk_sumexp,
                                float chunk_logit_sum) {
  out.sumexp[i] = out.sumexp[i] * expf(out.max[i] - new_max) + chunk_sumexp;
  out.max[i] = new_max;
  out.logit_sum[i] += chunk_logit_sum;
}

}  // namespace marginfused
