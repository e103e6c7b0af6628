// What the CPU and CUDA translation units share: the entry points' signatures and argument checks,
// the per-element gradient, the norm floor, and the one dtype dispatch macro.
//
// Both backends are margin-agnostic: the caller supplies each row's target logit z_iy = s f(c_iy)
// and its slope σ_i = ∂z_iy/∂c_iy, whatever the margin f; the kernels compute the cosines, every
// other logit z_ij = s c_ij (or the negative-logit rule's, below), and the gradient through the
// normalisations.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MF_HOST_DEVICE inline
#endif

// Dispatch over the input dtypes the fused backends compute from: float, half, bfloat16.
// Inside, `scalar_t` is the C++ type of the embeddings and weight; everything else is fp32.
#define MF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace marginfused {

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

// The scalars of one call, plain data passed by value to kernels.
struct LossParams {
  float scale;            // s: z_ij = s c_ij off the target
  float label_smoothing;  // ε
  int64_t ignore_index;   // rows with this label have no loss and no gradient
};

// The target's column in the chunk of classes [chunk_start, chunk_start + n), or -1 when the row
// is ignored (label == ignore_index) or its label lies outside the chunk.
MF_HOST_DEVICE int64_t target_column(int64_t label, int64_t chunk_start, int64_t n, int64_t ignore_index) {
  const int64_t local = label - chunk_start;
  return label != ignore_index && local >= 0 && local < n ? local : -1;
}

// The negative-logit rule (marginfused/negatives.py), given by the caller per row: a non-target
// entry with c > τ_i takes z = s c (a_i + q c), ∂z/∂c = s (a_i + 2 q c); every other one s c, s.
// (CurricularFace: τ_i = cos(θ_iy + m), a_i = t, q = 1; inter-class filtering: τ, 0, 0.)
struct HardNegatives {
  const float* threshold;  // (B,) τ_i, or nullptr: no rule
  const float* offset;     // (B,) a_i
  float quadratic;         // q
};

// A row's negatives without a rule.
struct PlainNegatives {
  float scale;
  MF_HOST_DEVICE float logit(float c) const { return scale * c; }
  MF_HOST_DEVICE float slope(float) const { return scale; }
};

// A row's negatives under the rule (τ_i = +inf where there is none: every entry plain).
struct RuledNegatives {
  float scale, threshold, offset, quadratic;
  MF_HOST_DEVICE float logit(float c) const { return c > threshold ? scale * c * (offset + quadratic * c) : scale * c; }
  MF_HOST_DEVICE float slope(float c) const {
    return c > threshold ? scale * (offset + 2.0f * quadratic * c) : scale;
  }
};

MF_HOST_DEVICE RuledNegatives ruled_negatives(const HardNegatives& rule, float scale, int64_t i) {
  return rule.threshold ? RuledNegatives{scale, rule.threshold[i], rule.offset[i], rule.quadratic}
                        : RuledNegatives{scale, INFINITY, 0.0f, 0.0f};
}

// lse_i (float64) as fp32 hi + lo: z - hi is exact where p_ij matters (z near lse), so
// p_ij = exp((z - hi) - lo) keeps fp32 relative accuracy instead of losing ulp(lse) ~ 4e-6 at s = 64
// to the rounding of lse itself.
struct SplitLse {
  float hi, lo;
};

MF_HOST_DEVICE SplitLse split_lse(double lse) {
  const float hi = static_cast<float>(lse);
  return SplitLse{hi, static_cast<float>(lse - static_cast<double>(hi))};
}

// ∂ℓ_i/∂c_ij of one element, before the row's gradient grad_rows_i and the normalisations:
//   slope · (p_ij − (1−ε)[j = y_i] − ε/C),   p_ij = exp(z_ij − lse_i),
// with slope = ∂z_ij/∂c_ij: s off the target, σ_i on it; smoothing_per_class = ε/C.
MF_HOST_DEVICE float logit_grad(float prob, float slope, bool is_target, float label_smoothing,
                                float smoothing_per_class) {
  const float g = prob - smoothing_per_class;
  return slope * (is_target ? g - (1.0f - label_smoothing) : g);
}

// The entry points of both extensions (cpu.cpp, cuda.cu), bound to Python by bindings.h.
//
// forward_partials: per-row partials over this weight shard's classes [class_start, class_start + C),
// into the five (B,) outputs: max_j z_ij, Σ_j exp(z_ij − max), Σ_j z_ij, max_j c_ij and its global
// class (the first on ties). target_logit (B,) fp32 is z_iy, read only where y_i is in this shard.
// hard_threshold, hard_offset ((B,) fp32, both or neither) and hard_quadratic: the negative-logit rule.
// subcenters K: w holds C·K rows, class j's sub-centres at rows jK..jK+K−1, and c_ij is the largest
// of their cosines (see sub-centres below). chunk: rows of w per chunk (rounded down to whole classes).
using ForwardPartialsFn = void(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                               const at::Tensor& target_logit, const std::optional<at::Tensor>& hard_threshold,
                               const std::optional<at::Tensor>& hard_offset, double hard_quadratic,
                               int64_t class_start, int64_t subcenters, int64_t chunk, double scale,
                               int64_t ignore_index, const at::Tensor& out_max, const at::Tensor& out_sumexp,
                               const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                               const at::Tensor& out_best_class);

// backward: the gradients of Σ_i u_i ℓ_i w.r.t. x and this weight shard, given lse_i (B,) float64 over
// all num_classes classes, u = grad_rows (B,) fp32, z_iy = target_logit and σ_i = target_slope (B,)
// fp32, the negative-logit rule and sub-centres as in forward_partials (each class's gradient goes
// to its arg-max sub-centre alone). grad_lift: (2^k, 2^-k) fp32, the fp16 lift of the gradient tile
// (marginfused/backends/lift.py), for float16 inputs of the cuda backend only; None elsewhere.
// grad_x (B×D) and grad_w (CK×D), in the input dtype, are written whole; either may be None.
using BackwardFn = void(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                        const at::Tensor& target_logit, const at::Tensor& target_slope,
                        const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_offset,
                        double hard_quadratic, const at::Tensor& lse,
                        const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_lift,
                        int64_t class_start, int64_t subcenters, int64_t num_classes,
                        int64_t chunk,
                        double scale, double label_smoothing, int64_t ignore_index,
                        const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_w);

// A contiguous (rows, cols) view of the front of a flat buffer.
inline at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Every tensor argument of an entry point: on `device_type`, contiguous, of `dtype`, with `sizes`
// (a size of -1 matches anything). The message names the entry point and the argument.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device_type,
                         at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), op, ": ", name, " must be ", sizes.size(),
              "-D, got shape ", t.sizes());
  int64_t d = 0;
  for (int64_t expected : sizes) {
    TORCH_CHECK(expected < 0 || t.size(d) == expected, op, ": ", name, " must have size ", expected,
                " in dim ", d, ", got shape ", t.sizes());
    ++d;
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

// The embeddings and weight: same device type, floating dtype of the dispatch macro, 2-D, equal D.
inline void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                         c10::DeviceType device_type) {
  TORCH_CHECK(x.defined() && w.defined() && y.defined(), op, ": embeddings, weight and labels must be defined");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": embeddings must be float32, float16 or bfloat16, got ", dtype);
  check_tensor(op, "embeddings", x, device_type, dtype, {-1, -1});
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, op, ": embeddings must be non-empty, got shape ", x.sizes());
  check_tensor(op, "weight", w, device_type, dtype, {-1, x.size(1)});
  TORCH_CHECK(w.size(0) > 0, op, ": weight must have at least one class, got shape ", w.sizes());
  check_tensor(op, "labels", y, device_type, at::kLong, {x.size(0)});
  TORCH_CHECK(w.device() == x.device(), op, ": weight is on ", w.device(), " but embeddings are on ", x.device());
  TORCH_CHECK(y.device() == x.device(), op, ": labels are on ", y.device(), " but embeddings are on ", x.device());
}

// An argument that must live beside the embeddings x: check_tensor on x's device type, and the
// very device of x (the index too).
inline void check_beside(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  check_tensor(op, name, t, x.device().type(), dtype, sizes);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but embeddings are on ",
              x.device());
}

// The negative-logit rule's arguments: τ and a both (B,) fp32 beside x, or both absent.
inline HardNegatives check_rule(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& threshold,
                                const std::optional<at::Tensor>& offset, double quadratic) {
  const bool has_threshold = threshold.has_value() && threshold->defined();
  const bool has_offset = offset.has_value() && offset->defined();
  TORCH_CHECK(has_threshold == has_offset, op, ": hard_threshold and hard_offset must be given together");
  if (!has_threshold) return HardNegatives{nullptr, nullptr, 0.0f};
  check_beside(op, "hard_threshold", *threshold, x, at::kFloat, {x.size(0)});
  check_beside(op, "hard_offset", *offset, x, at::kFloat, {x.size(0)});
  return HardNegatives{threshold->data_ptr<float>(), offset->data_ptr<float>(), static_cast<float>(quadratic)};
}

// The number of sub-centres K: at least 1, and the weight's rows whole classes of K. The weight's classes.
inline int64_t check_subcenters(const char* op, const at::Tensor& w, int64_t subcenters) {
  TORCH_CHECK(subcenters >= 1, op, ": subcenters must be >= 1, got ", subcenters);
  TORCH_CHECK(w.size(0) % subcenters == 0, op, ": weight's ", w.size(0), " rows are not whole classes of ",
              subcenters, " sub-centres");
  return w.size(0) / subcenters;
}

// Rows of W per chunk: the caller's `chunk`, at most all of them, rounded down to whole classes of
// K sub-centres (at least one class).
inline int64_t chunk_rows(int64_t chunk, int64_t rows, int64_t subcenters) {
  return std::max<int64_t>(subcenters, std::min(chunk, rows) / subcenters * subcenters);
}

inline void check_ranges(const char* op, int64_t class_start, int64_t local_classes, int64_t num_classes,
                         int64_t chunk) {
  TORCH_CHECK(class_start >= 0, op, ": class_start must be >= 0, got ", class_start);
  TORCH_CHECK(num_classes >= class_start + local_classes, op, ": num_classes (", num_classes,
              ") must cover the weight's classes [", class_start, ", ", class_start + local_classes, ")");
  TORCH_CHECK(chunk > 0, op, ": chunk must be > 0, got ", chunk);
}

inline LossParams make_params(const char* op, double scale, double label_smoothing, int64_t ignore_index) {
  TORCH_CHECK(scale > 0.0, op, ": scale must be > 0, got ", scale);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0, op, ": label_smoothing must be in [0, 1), got ",
              label_smoothing);
  return LossParams{static_cast<float>(scale), static_cast<float>(label_smoothing), ignore_index};
}

// forward_partials' scalars and negative-logit rule.
struct ForwardPlan {
  LossParams params;
  HardNegatives rule;
};

// Every check of forward_partials' arguments on `device_type`.
inline ForwardPlan check_forward_partials(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                          const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
                                          const std::optional<at::Tensor>& hard_threshold,
                                          const std::optional<at::Tensor>& hard_offset, double hard_quadratic,
                                          int64_t class_start, int64_t subcenters, int64_t chunk, double scale,
                                          int64_t ignore_index,
                                          const at::Tensor& out_max, const at::Tensor& out_sumexp,
                                          const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                                          const at::Tensor& out_best_class) {
  check_inputs(op, x, w, y, device_type);
  const int64_t B = x.size(0), C = check_subcenters(op, w, subcenters);
  check_ranges(op, class_start, C, class_start + C, chunk);
  check_beside(op, "target_logit", target_logit, x, at::kFloat, {B});
  check_beside(op, "out_max", out_max, x, at::kFloat, {B});
  check_beside(op, "out_sumexp", out_sumexp, x, at::kFloat, {B});
  check_beside(op, "out_logit_sum", out_logit_sum, x, at::kFloat, {B});
  check_beside(op, "out_best_cos", out_best_cos, x, at::kFloat, {B});
  check_beside(op, "out_best_class", out_best_class, x, at::kLong, {B});
  const HardNegatives rule = check_rule(op, x, hard_threshold, hard_offset, hard_quadratic);
  return ForwardPlan{make_params(op, scale, 0.0, ignore_index), rule};
}

// backward's scalars, negative-logit rule, fp16 lift ((2^k, 2^-k), or nullptr: none), and which of
// grad_x, grad_w are wanted (given, not None).
struct BackwardPlan {
  LossParams params;
  HardNegatives rule;
  const float* lift;
  bool need_x;
  bool need_w;
};

// Every check of backward's arguments on `device_type`.
inline BackwardPlan check_backward(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                                   const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
                                   const at::Tensor& target_slope, const std::optional<at::Tensor>& hard_threshold,
                                   const std::optional<at::Tensor>& hard_offset, double hard_quadratic,
                                   const at::Tensor& lse, const at::Tensor& grad_rows,
                                   const std::optional<at::Tensor>& grad_lift,
                                   int64_t class_start, int64_t subcenters, int64_t num_classes, int64_t chunk,
                                   double scale,
                                   double label_smoothing, int64_t ignore_index,
                                   const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_w) {
  check_inputs(op, x, w, y, device_type);
  const int64_t B = x.size(0), D = x.size(1), C = check_subcenters(op, w, subcenters);
  check_ranges(op, class_start, C, num_classes, chunk);
  check_beside(op, "target_logit", target_logit, x, at::kFloat, {B});
  check_beside(op, "target_slope", target_slope, x, at::kFloat, {B});
  check_beside(op, "lse", lse, x, at::kDouble, {B});
  check_beside(op, "grad_rows", grad_rows, x, at::kFloat, {B});
  const bool need_x = grad_x.has_value() && grad_x->defined();
  const bool need_w = grad_w.has_value() && grad_w->defined();
  if (need_x) check_beside(op, "grad_x", *grad_x, x, x.scalar_type(), {B, D});
  if (need_w) check_beside(op, "grad_w", *grad_w, x, x.scalar_type(), {w.size(0), D});
  const bool lifted = grad_lift.has_value() && grad_lift->defined();
  if (lifted) check_beside(op, "grad_lift", *grad_lift, x, at::kFloat, {2});
  const HardNegatives rule = check_rule(op, x, hard_threshold, hard_offset, hard_quadratic);
  return BackwardPlan{make_params(op, scale, label_smoothing, ignore_index), rule,
                      lifted ? grad_lift->data_ptr<float>() : nullptr, need_x, need_w};
}

}  // namespace marginfused
