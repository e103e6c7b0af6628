// Input checks and the one dtype dispatch macro, shared by the CPU and CUDA translation units.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "margin_math.h"

// Dispatch over the input dtypes the fused backends compute from: float, half, bfloat16.
// Inside, `scalar_t` is the C++ type of the embeddings and weight; everything else is fp32.
#define MF_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace marginfused {

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

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but embeddings are on ",
              x.device());
}

// An argument that must live beside the embeddings x: check_tensor on x's device type, and the
// very device of x (the index too).
inline void check_beside(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  check_tensor(op, name, t, x.device().type(), dtype, sizes);
  check_same_device(op, name, t, x);
}

// The six (B,) outputs of forward_partials.
inline void check_partials_outputs(const char* op, const at::Tensor& x, const at::Tensor& out_max,
                                   const at::Tensor& out_sumexp, const at::Tensor& out_target,
                                   const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                                   const at::Tensor& out_best_class) {
  const int64_t B = x.size(0);
  check_beside(op, "out_max", out_max, x, at::kFloat, {B});
  check_beside(op, "out_sumexp", out_sumexp, x, at::kFloat, {B});
  check_beside(op, "out_target", out_target, x, at::kFloat, {B});
  check_beside(op, "out_logit_sum", out_logit_sum, x, at::kFloat, {B});
  check_beside(op, "out_best_cos", out_best_cos, x, at::kFloat, {B});
  check_beside(op, "out_best_class", out_best_class, x, at::kLong, {B});
}

inline LossParams make_params(const char* op, int64_t kind, int64_t fallback, double p1, double p2, double p3,
                              double scale, bool exact_grad, double label_smoothing, int64_t ignore_index) {
  TORCH_CHECK(kind >= kCosFace && kind <= kCombined, op, ": unknown margin kind ", kind);
  TORCH_CHECK(fallback >= kFallbackNone && fallback <= kFallbackEasy, op, ": unknown ArcFace fallback ", fallback);
  TORCH_CHECK(scale > 0.0, op, ": scale must be > 0, got ", scale);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0, op, ": label_smoothing must be in [0, 1), got ",
              label_smoothing);
  LossParams p;
  p.kind = static_cast<int32_t>(kind);
  p.fallback = static_cast<int32_t>(fallback);
  p.p1 = static_cast<float>(p1);
  p.p2 = static_cast<float>(p2);
  p.p3 = static_cast<float>(p3);
  p.scale = static_cast<float>(scale);
  p.exact_grad = exact_grad ? 1 : 0;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.ignore_index = ignore_index;
  return p;
}

inline void check_ranges(const char* op, int64_t class_start, int64_t local_classes, int64_t num_classes,
                         int64_t chunk) {
  TORCH_CHECK(class_start >= 0, op, ": class_start must be >= 0, got ", class_start);
  TORCH_CHECK(num_classes >= class_start + local_classes, op, ": num_classes (", num_classes,
              ") must cover the weight's classes [", class_start, ", ", class_start + local_classes, ")");
  TORCH_CHECK(chunk > 0, op, ": chunk must be > 0, got ", chunk);
}

}  // namespace marginfused
