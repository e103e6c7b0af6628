// The margin f(c), its derivative f'(c), and the scalar pieces of the loss, written once for the
// CPU (C++) and CUDA (.cu) translation units: every function is `__host__ __device__` under nvcc
// and plain `inline` otherwise.
//
//   CosFace        f(c) = c - m                              f'(c) = 1
//   ArcFace        f(c) = cos(theta + m)                     f'(c) = sin(theta + m) / sin(theta)
//                  fallback LINEAR: c - m sin m where c <= cos(pi - m), f' = 1 there
//                  fallback EASY:   c where c <= 0, f' = 1 there
//   SphereFace     f(c) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi)
//                                                            f'(c) = (-1)^k m sin(m theta) / sin(theta)
//   ExpFace        f(c) = cos(pi (theta/pi)^m)               f'(c) = m (theta/pi)^(m-1) sin(pi (theta/pi)^m) / sin(theta)
//   Combined       f(c) = cos(m1 theta + m2) - m3            f'(c) = m1 sin(m1 theta + m2) / sin(theta)
//
// theta = arccos(c). The caller passes c already clamped to [-1, 1]; for f' theta is taken from c
// clamped to [-1 + kDerivativeEps, 1 - kDerivativeEps] so sin(theta) > 0 (marginfused/margins.py).
//
// f is evaluated once per row (on the target column only), so the margin kind is a runtime
// switch rather than a compile-time variant: it is off the hot loops.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MF_HOST_DEVICE inline
#endif

namespace marginfused {

// Copies of marginfused/margins.py's MarginKind and ArcFaceFallback and of
// marginfused/constants.py's DERIVATIVE_EPS (2^-23) and NORM_EPS; tests/test_constants.py reads
// this header and fails when a copy drifts.
enum MarginKind : int32_t { kCosFace = 0, kArcFace = 1, kSphereFace = 2, kExpFace = 3, kCombined = 4 };
enum ArcFaceFallback : int32_t { kFallbackNone = 0, kFallbackLinear = 1, kFallbackEasy = 2 };
constexpr float kDerivativeEps = 1.1920928955078125e-07f;
constexpr float kNormEps = 1e-12f;
constexpr float kPi = 3.14159265358979323846f;

// Everything that defines the per-element math of one call: margin, scale, gradient mode,
// label smoothing, ignored label. Plain data, passed by value to kernels.
struct LossParams {
  int32_t kind;            // MarginKind
  int32_t fallback;        // ArcFaceFallback (ArcFace only)
  float p1, p2, p3;        // the margin's parameters (m, or m1, m2, m3)
  float scale;             // s
  int32_t exact_grad;      // 1: dz_iy/dc_iy = s f'(c_iy); 0: = s (detached)
  float label_smoothing;   // epsilon
  int64_t ignore_index;
};

MF_HOST_DEVICE float clamp_unit(float c) { return fminf(fmaxf(c, -1.0f), 1.0f); }

// Whether ArcFace's fallback replaces cos(theta + m) at this (clamped) cosine.
MF_HOST_DEVICE bool arcface_outside(const LossParams& p, float c) {
  if (p.fallback == kFallbackLinear) return c <= cosf(kPi - p.p1);
  if (p.fallback == kFallbackEasy) return c <= 0.0f;
  return false;
}

// f(c) for c in [-1, 1].
MF_HOST_DEVICE float margin_value(const LossParams& p, float c) {
  const float theta = acosf(c);
  switch (p.kind) {
    case kCosFace:
      return c - p.p1;
    case kArcFace:
      if (arcface_outside(p, c)) return p.fallback == kFallbackLinear ? c - p.p1 * sinf(p.p1) : c;
      return cosf(theta + p.p1);
    case kSphereFace: {
      const float k = floorf(p.p1 * theta / kPi);
      const float sign = 1.0f - 2.0f * (k - 2.0f * floorf(0.5f * k));
      return sign * cosf(p.p1 * theta) - 2.0f * k;
    }
    case kExpFace:
      return cosf(kPi * powf(theta / kPi, p.p1));
    case kCombined:
      return cosf(p.p1 * theta + p.p2) - p.p3;
    default:
      return c;
  }
}

// f'(c) for c in [-1, 1]; finite at c = +-1.
MF_HOST_DEVICE float margin_slope(const LossParams& p, float c) {
  const float inside = fminf(fmaxf(c, -1.0f + kDerivativeEps), 1.0f - kDerivativeEps);
  const float theta = acosf(inside);
  const float sin_theta = sinf(theta);
  switch (p.kind) {
    case kCosFace:
      return 1.0f;
    case kArcFace:
      if (arcface_outside(p, c)) return 1.0f;
      return sinf(theta + p.p1) / sin_theta;
    case kSphereFace: {
      const float k = floorf(p.p1 * theta / kPi);
      const float sign = 1.0f - 2.0f * (k - 2.0f * floorf(0.5f * k));
      return sign * p.p1 * sinf(p.p1 * theta) / sin_theta;
    }
    case kExpFace: {
      const float ratio = theta / kPi;
      return p.p1 * powf(ratio, p.p1 - 1.0f) * sinf(kPi * powf(ratio, p.p1)) / sin_theta;
    }
    case kCombined:
      return p.p1 * sinf(p.p1 * theta + p.p2) / sin_theta;
    default:
      return 1.0f;
  }
}

// dl_i/dc_ij for one element, before the column scale 1/|w_j| and row upstream gradient:
//   s * (p_ij - (1 - eps)[j = y_i] - eps / C) * (f'(c_iy) on the target column in exact mode),
// with p_ij = exp(z_ij - lse_i). `c` is the clamped cosine, `z` the logit (margin applied on the
// target column).
MF_HOST_DEVICE float logit_grad(const LossParams& p, float prob, bool is_target, float c,
                                float smooth_per_class) {
  float g = prob - smooth_per_class;
  if (is_target) {
    g -= 1.0f - p.label_smoothing;
    if (p.exact_grad) g *= margin_slope(p, c);
  }
  return p.scale * g;
}

}  // namespace marginfused
