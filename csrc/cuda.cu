// The `cuda` backend: the chunked softmax loss for CUDA tensors, where Triton cannot run;
// margin-agnostic like the `cpu` backend.
//
// The algorithm and notation are those of csrc/cpu.cpp (read its header first):
//   q_i = 1/max(|x_i|, 1e-12), r_j = 1/max(|w_j|, 1e-12), c_ij = clamp(q_i r_j (x_i·w_j), -1, 1),
//   z_ij = s c_ij (j ≠ y_i), z_iy = t_i, the caller's target logit, with slope σ_i = ∂t_i/∂c_iy;
//   ∂ℓ_i/∂c_ij = s (p_ij - ε/C) off the target, σ_i (p_iy - (1-ε) - ε/C) on it (logit_grad); under a
//   negative-logit rule a hard negative's z and s are the rule's (common.h, RuledNegatives).
// Per chunk of n classes (the B×n fp32 tile is bounded by the caller's chunk size):
//   forward:  r for the chunk (inverse_norms_kernel), S = X W_chunkᵀ with ATen (cuBLAS; fp32 output
//             also for half/bf16 inputs), then forward_chunk_kernel: one block per row folds the
//             chunk's logits into the row's running (max, sumexp), logit sum and best cosine.
//   backward: recompute S, backward_chunk_kernel forms U_ij = u_i q_i r_j ∂ℓ_i/∂c_ij elementwise
//             (in the input dtype for the GEMMs; for float16 lifted by the caller's power of two 2^k
//             before the cast, marginfused/backends/lift.py, clamped to float16's range, and brought
//             back by 2^-k in fp32 after the GEMMs), A += U W_chunk and H = Uᵀ X with ATen, and
//             project_rows_kernel turns H into dW rows: dw_j = H_j - ŵ_j (ŵ_j·H_j). After the
//             last chunk the same projection turns A into dx.
// Sub-centres as in cpu.cpp: chunks of whole classes; a class's cosine is the largest of its K rows'
// (pick_subcenter) and its entry of U sits at its arg-max row, 0 at the others.
// Everything after the GEMMs is fp32; the logit sum is accumulated in double.
//
// Only ATen/c10 headers are used (no cuBLAS headers), so this file compiles with nvcc against the
// headers of any torch build, which is what `make check-cuda` does on machines without a GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "common.h"

namespace marginfused {
namespace cuda {
namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;
constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

int grid_for(int64_t work, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, 65535)));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// A running (max, sum of exp(z - max)) pair; merging two is the logaddexp of their sums.
struct OnlineSum {
  float m;
  float s;
};

__device__ __forceinline__ OnlineSum merge(OnlineSum a, OnlineSum b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// The best cosine and its (chunk-local) class; ties go to the smaller class, like argmax.
struct Best {
  float c;
  int64_t j;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.c > a.c || (b.c == a.c && b.j < a.j)) ? b : a;
}

// Calls f(d, float(v[d])) for the elements of a row that a lane owns: every kWarp-th element, or,
// where `vectorised` (the row length a multiple of 16 bytes and every row 16-byte aligned: the
// host's `vector_rows`), every kWarp-th 16-byte group, read with one load.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_lane_elements(const scalar_t* __restrict__ v, int64_t dim, int lane, bool vectorised,
                                                  F&& f) {
  constexpr int kWidth = 16 / sizeof(scalar_t);
  if (vectorised) {
    for (int64_t d = static_cast<int64_t>(lane) * kWidth; d < dim; d += kWarp * kWidth) {
      const uint4 raw = *reinterpret_cast<const uint4*>(v + d);
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int k = 0; k < kWidth; ++k) f(d + k, static_cast<float>(e[k]));
    }
  } else {
    for (int64_t d = lane; d < dim; d += kWarp) f(d, static_cast<float>(v[d]));
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// 1/max(|row|, 1e-12) for `count` rows of length `dim`: one warp per row; a row whose sum of squares
// overflows is summed again scaled (common.h, inverse_norm).
template <typename scalar_t>
__global__ void inverse_norms_kernel(const scalar_t* __restrict__ rows, int64_t count, int64_t dim, bool vectorised,
                                     float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < count;
       row += warps) {
    float sq = 0.0f, largest = 0.0f;
    for_lane_elements(rows + row * dim, dim, lane, vectorised, [&](int64_t, float e) {
      sq += e * e;
      largest = fmaxf(largest, fabsf(e));
    });
    sq = warp_sum(sq);
    float inverse = inverse_norm(sq);
    if (squares_overflowed(sq)) {  // the same for every lane of the warp
      const float scale = row_scale(warp_max(largest)), down = 1.0f / scale;
      float scaled = 0.0f;
      for_lane_elements(rows + row * dim, dim, lane, vectorised, [&](int64_t, float e) { scaled += (e * down) * (e * down); });
      inverse = scaled_inverse_norm(scale, warp_sum(scaled));
    }
    if (lane == 0) out[row] = inverse;
  }
}

// Start of the forward pass: the partials of an empty class range.
__global__ void init_partials_kernel(int64_t batch, int64_t class_start, float* max, float* sumexp, double* logit_sum,
                                     float* best_cos, int64_t* best_class) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < batch;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    max[i] = -INFINITY;
    sumexp[i] = 0.0f;
    logit_sum[i] = 0.0;
    best_cos[i] = -INFINITY;
    best_class[i] = class_start;
  }
}

__global__ void finish_partials_kernel(int64_t batch, const double* logit_sum, float* out_logit_sum) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < batch;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out_logit_sum[i] = static_cast<float>(logit_sum[i]);
}

// Sub-centres: a class's cosine is the largest of its K sub-centres' and its gradient goes to the
// first sub-centre holding it: pick_subcenter gives both, c_ij = max_k clamp(q_i r_k S_k, -1, 1) over
// the class's K raw dot products `dots` (fp32) and inverse norms `r`.
struct SubcenterPick {
  float cosine;
  int64_t k;
};

__device__ __forceinline__ SubcenterPick pick_subcenter(const float* dots, const float* r, float qi,
                                                        int64_t subcenters) {
  SubcenterPick best{clamp_unit(dots[0] * qi * r[0]), 0};
  for (int64_t k = 1; k < subcenters; ++k) {
    const float c = clamp_unit(dots[k] * qi * r[k]);
    if (c > best.cosine) best = SubcenterPick{c, k};
  }
  return best;
}

// One block per row: fold the row's logits of this chunk's n classes (its `subcenters` · n rows of
// W) into its partials; the target's is t_i (target_logit, read only where the target is in the
// chunk).
__global__ void __launch_bounds__(kThreads)
    forward_chunk_kernel(const float* __restrict__ s_tile, int64_t n, int64_t subcenters, const float* __restrict__ q,
                         const float* __restrict__ r, const int64_t* __restrict__ labels,
                         const float* __restrict__ target_logit, HardNegatives rule, int64_t chunk_start,
                         LossParams p, float* max, float* sumexp, double* logit_sum, float* best_cos,
                         int64_t* best_class) {
  const int64_t i = blockIdx.x;
  const float* row = s_tile + i * n * subcenters;
  const float qi = q[i];
  const int64_t target = target_column(labels[i], chunk_start, n, p.ignore_index);
  const RuledNegatives neg = ruled_negatives(rule, p.scale, i);

  OnlineSum acc{-INFINITY, 0.0f};
  Best best{-INFINITY, n};
  float zsum = 0.0f;  // Σ z over this thread's elements other than the target
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float c = subcenters == 1 ? clamp_unit(row[j] * qi * r[j])
                                    : pick_subcenter(row + j * subcenters, r + j * subcenters, qi, subcenters).cosine;
    best = better(best, Best{c, j});
    float z;
    if (j == target) {
      z = target_logit[i];
    } else {
      z = neg.logit(c);
      zsum += z;
    }
    if (z > acc.m) {
      acc.s = acc.s * expf(acc.m - z) + 1.0f;
      acc.m = z;
    } else {
      acc.s += expf(z - acc.m);
    }
  }

  // Reduce within each warp, then across the block's warps through shared memory.
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const OnlineSum other{__shfl_xor_sync(kFullMask, acc.m, offset), __shfl_xor_sync(kFullMask, acc.s, offset)};
    acc = merge(acc, other);
    const Best other_best{__shfl_xor_sync(kFullMask, best.c, offset), __shfl_xor_sync(kFullMask, best.j, offset)};
    best = better(best, other_best);
    zsum += __shfl_xor_sync(kFullMask, zsum, offset);
  }
  __shared__ OnlineSum warp_acc[kThreads / kWarp];
  __shared__ Best warp_best[kThreads / kWarp];
  __shared__ float warp_zsum[kThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    warp_acc[warp] = acc;
    warp_best[warp] = best;
    warp_zsum[warp] = zsum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = blockDim.x / kWarp;
    for (int k = 1; k < warps; ++k) {
      acc = merge(acc, warp_acc[k]);
      best = better(best, warp_best[k]);
      zsum += warp_zsum[k];
    }
    const OnlineSum total = merge(OnlineSum{max[i], sumexp[i]}, acc);
    max[i] = total.m;
    sumexp[i] = total.s;
    double logits = static_cast<double>(zsum);  // Σ_j z_ij over the chunk
    if (target >= 0) logits += static_cast<double>(target_logit[i]);
    logit_sum[i] += logits;
    if (best.c > best_cos[i]) {  // strictly: an earlier chunk keeps a tie
      best_cos[i] = best.c;
      best_class[i] = chunk_start + best.j;
    }
  }
}

// A lifted gradient entry in the GEMMs' dtype: for float16 clamped to its range first, so that the
// entries of a zero row (q or r = 1e12, left out of the lift's bound: lift.py) stay finite and
// multiply that row's zeros to exactly 0.
template <typename grad_t>
__device__ __forceinline__ grad_t to_gradient_tile(float value) {
  if constexpr (std::is_same_v<grad_t, c10::Half>) value = fminf(fmaxf(value, -65504.0f), 65504.0f);
  return static_cast<grad_t>(value);
}

// Elementwise over the B×n tile (n rows of W): U_ij = u_i q_i r_j ∂ℓ_i/∂c_ij from S_ij (zero on
// ignored rows), written as grad_t (the input dtype, for the GEMMs; in place when that is float).
// t_i and σ_i (target_logit, target_slope) are read only on the target. lse_i = lse_hi + lse_lo
// (split_lse). With K sub-centres per class, element jK + k holds class j's entry if k is its
// arg-max sub-centre, else 0 (each thread reads its class's K dot products; none is written in
// place then: the tile is fp32 only when the inputs are, and K > 1 uses a separate output).
template <typename grad_t>
__global__ void backward_chunk_kernel(const float* s_tile, grad_t* u_tile, int64_t batch, int64_t n,
                                      int64_t subcenters,
                                      const float* __restrict__ q, const float* __restrict__ r,
                                      const int64_t* __restrict__ labels, const float* __restrict__ target_logit,
                                      const float* __restrict__ target_slope, HardNegatives rule, int64_t chunk_start,
                                      const float* __restrict__ lse_hi, const float* __restrict__ lse_lo,
                                      const float* __restrict__ grad_rows, const float* __restrict__ grad_lift,
                                      float smoothing_per_class, LossParams p) {
  // 2-D grid: x over the chunk's columns, y over rows (strided), so no index is divided (but the
  // column's class, once per thread, with sub-centres).
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const int64_t klass = subcenters == 1 ? j : j / subcenters;  // this column's (chunk-local) class
  const int64_t group = klass * subcenters;                      // and its first row
  const float lift = *grad_lift;
  for (int64_t i = blockIdx.y; i < batch; i += gridDim.y) {
    const int64_t idx = i * n + j;
    const int64_t label = labels[i];
    const float u = grad_rows[i];
    float value = 0.0f;
    float c;
    int64_t chosen = j;  // the row the class's gradient goes to
    if (subcenters == 1) {
      c = clamp_unit(s_tile[idx] * q[i] * r[j]);
    } else {
      const SubcenterPick pick = pick_subcenter(s_tile + i * n + group, r + group, q[i], subcenters);
      c = pick.cosine;
      chosen = group + pick.k;
    }
    if (label != p.ignore_index && u != 0.0f && chosen == j) {
      const bool is_target = label - chunk_start == klass;
      const RuledNegatives neg = ruled_negatives(rule, p.scale, i);
      const float z = is_target ? target_logit[i] : neg.logit(c);
      const float slope = is_target ? target_slope[i] : neg.slope(c);
      const float prob = expf((z - lse_hi[i]) - lse_lo[i]);
      value = lift * u * q[i] * r[j] * logit_grad(prob, slope, is_target, p.label_smoothing, smoothing_per_class);
    }
    u_tile[idx] = to_gradient_tile<grad_t>(value);
  }
}

__global__ void split_lse_kernel(int64_t batch, const double* lse, float* hi, float* lo) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < batch;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const SplitLse l = split_lse(lse[i]);
    hi[i] = l.hi;
    lo[i] = l.lo;
  }
}

// out_i = (h_i - v̂_i (v̂_i·h_i))·unlift, v̂_i = inv_i v_i (or h_i·unlift where |v_i| < 1e-12): one
// warp per row; `unlift` undoes the float16 gradient tile's scaling (1 otherwise); v̂ is formed
// before any product, so no sum overflows for huge rows; rows of v read 16 bytes at a time where
// `vectorised`. `out` may alias `h` (each lane reads its elements before writing them).
template <typename scalar_t, typename out_t>
__global__ void project_rows_kernel(const float* h, const scalar_t* __restrict__ v, const float* __restrict__ inv,
                                    int64_t count, int64_t dim, bool vectorised, const float* __restrict__ unlift,
                                    out_t* out) {
  const float back = *unlift;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < count;
       row += warps) {
    const float* hi = h + row * dim;
    const scalar_t* vi = v + row * dim;
    const float r = inv[row];
    float vh = 0.0f;
    for_lane_elements(vi, dim, lane, vectorised, [&](int64_t d, float e) { vh += (e * r) * hi[d]; });
    vh = warp_sum(vh);
    const float coef = above_norm_floor(r) ? vh : 0.0f;
    out_t* oi = out + row * dim;
    for_lane_elements(vi, dim, lane, vectorised,
                      [&](int64_t d, float e) { oi[d] = static_cast<out_t>((hi[d] - (e * r) * coef) * back); });
  }
}

// True when every row of a contiguous (rows × dim) tensor starts 16-byte aligned and holds whole
// 16-byte groups: the kernels may then read its rows 16 bytes at a time.
bool vector_rows(const at::Tensor& t) {
  const int64_t width = 16 / t.element_size();
  return t.size(-1) % width == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// S (B×n fp32, contiguous) = X W_chunkᵀ; fp32 output also for half/bf16 inputs.
void cosine_gemm(at::Tensor& s_tile, const at::Tensor& x, const at::Tensor& wc) {
  if (x.scalar_type() == at::kFloat) {
    at::mm_out(s_tile, x, wc.t());
  } else {
    at::mm_out(s_tile, x, wc.t(), at::kFloat);
  }
}

}  // namespace

// forward_partials (common.h): every element of the five (B,) outputs.
void forward_partials(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
                      const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_offset,
                      double hard_quadratic, int64_t class_start, int64_t subcenters, int64_t chunk, double scale,
                      int64_t ignore_index, const at::Tensor& out_max, const at::Tensor& out_sumexp,
                      const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                      const at::Tensor& out_best_class) {
  constexpr const char* op = "marginfused cuda forward_partials";
  const ForwardPlan plan = check_forward_partials(op, kCUDA, x, w, y, target_logit, hard_threshold, hard_offset,
                                                  hard_quadratic, class_start, subcenters, chunk, scale, ignore_index,
                                                  out_max, out_sumexp, out_logit_sum, out_best_cos, out_best_class);
  const LossParams& p = plan.params;
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0), K = subcenters;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_max = chunk_rows(chunk, C, K);  // rows of W per chunk, whole classes
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor tile = at::empty({B * n_max}, f32);
  at::Tensor r = at::empty({n_max}, f32);
  at::Tensor q = at::empty({B}, f32);
  at::Tensor logit_sum = at::empty({B}, x.options().dtype(at::kDouble));

  MF_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const int norm_blocks_x = grid_for(B, kThreads / kWarp);
    inverse_norms_kernel<scalar_t><<<norm_blocks_x, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), B, D,
                                                                          vector_rows(x), q.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    init_partials_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(
        B, class_start, out_max.data_ptr<float>(), out_sumexp.data_ptr<float>(), logit_sum.data_ptr<double>(),
        out_best_cos.data_ptr<float>(), out_best_class.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t r0 = 0; r0 < C; r0 += n_max) {  // the chunk's rows [r0, r0 + n), classes from r0 / K
      const int64_t n = std::min(n_max, C - r0);
      const at::Tensor wc = w.narrow(0, r0, n);
      inverse_norms_kernel<scalar_t><<<grid_for(n, kThreads / kWarp), kThreads, 0, stream>>>(
          wc.data_ptr<scalar_t>(), n, D, vector_rows(wc), r.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor s_tile = front(tile, B, n);
      cosine_gemm(s_tile, x, wc);
      TORCH_CHECK(B <= std::numeric_limits<int>::max(), op, ": batch too large for one grid");
      forward_chunk_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          s_tile.data_ptr<float>(), n / K, K, q.data_ptr<float>(), r.data_ptr<float>(), y.data_ptr<int64_t>(),
          target_logit.data_ptr<float>(), plan.rule, class_start + r0 / K, p, out_max.data_ptr<float>(),
          out_sumexp.data_ptr<float>(), logit_sum.data_ptr<double>(), out_best_cos.data_ptr<float>(),
          out_best_class.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    finish_partials_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(B, logit_sum.data_ptr<double>(),
                                                                         out_logit_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// backward (common.h).
void backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
              const at::Tensor& target_slope, const std::optional<at::Tensor>& hard_threshold,
              const std::optional<at::Tensor>& hard_offset, double hard_quadratic, const at::Tensor& lse,
              const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_lift, int64_t class_start,
              int64_t subcenters, int64_t num_classes, int64_t chunk, double scale, double label_smoothing,
              int64_t ignore_index, const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_w) {
  constexpr const char* op = "marginfused cuda backward";
  const BackwardPlan plan = check_backward(op, kCUDA, x, w, y, target_logit, target_slope, hard_threshold,
                                           hard_offset, hard_quadratic, lse, grad_rows, grad_lift, class_start,
                                           subcenters, num_classes, chunk, scale, label_smoothing, ignore_index,
                                           grad_x, grad_w);
  TORCH_CHECK(plan.lift != nullptr || x.scalar_type() != at::kHalf, op,
              ": float16 inputs need grad_lift, the gradient tile's power of two (marginfused/backends/lift.py)");
  const bool need_x = plan.need_x, need_w = plan.need_w;
  if (!need_x && !need_w) return;
  const int64_t B = x.size(0), D = x.size(1), C = w.size(0), K = subcenters;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool is_float = x.scalar_type() == at::kFloat;
  const int64_t n_max = chunk_rows(chunk, C, K);  // rows of W per chunk, whole classes
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor tile = at::empty({B * n_max}, f32);
  // U in place of S only where each element reads its own S alone (fp32, one row per class)
  at::Tensor u_lowp = is_float && K == 1 ? tile : at::empty({B * n_max}, x.options());
  at::Tensor r = at::empty({n_max}, f32);
  at::Tensor q = at::empty({B}, f32);
  at::Tensor lse_hi = at::empty({B}, f32);
  at::Tensor lse_lo = at::empty({B}, f32);
  at::Tensor acc, a_chunk, h_buffer;
  if (need_x) {
    acc = is_float ? *grad_x : at::empty({B, D}, f32);
    acc.zero_();
    if (!is_float) a_chunk = at::empty({B, D}, f32);
  }
  if (need_w && !is_float) h_buffer = at::empty({n_max * D}, f32);
  const at::Tensor unit = at::ones({2}, f32);  // (2^0, 2^-0): no lift, and A is unlifted chunk by chunk
  const float* lift = plan.lift ? plan.lift : unit.data_ptr<float>();  // (2^k, 2^-k)
  const at::Tensor unlift = plan.lift ? grad_lift->narrow(0, 1, 1) : unit.narrow(0, 1, 1);
  const float smoothing_per_class = static_cast<float>(label_smoothing / static_cast<double>(num_classes));

  MF_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    inverse_norms_kernel<scalar_t><<<grid_for(B, kThreads / kWarp), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), B, D, vector_rows(x), q.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    split_lse_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(B, lse.data_ptr<double>(),
                                                                   lse_hi.data_ptr<float>(), lse_lo.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t r0 = 0; r0 < C; r0 += n_max) {  // the chunk's rows [r0, r0 + n), classes from r0 / K
      const int64_t n = std::min(n_max, C - r0);
      const at::Tensor wc = w.narrow(0, r0, n);
      inverse_norms_kernel<scalar_t><<<grid_for(n, kThreads / kWarp), kThreads, 0, stream>>>(
          wc.data_ptr<scalar_t>(), n, D, vector_rows(wc), r.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor s_tile = front(tile, B, n);
      cosine_gemm(s_tile, x, wc);
      at::Tensor u_tile = front(u_lowp, B, n);
      const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                      static_cast<unsigned>(std::min<int64_t>(B, 65535)));
      backward_chunk_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          s_tile.data_ptr<float>(), u_tile.data_ptr<scalar_t>(), B, n, K, q.data_ptr<float>(), r.data_ptr<float>(),
          y.data_ptr<int64_t>(), target_logit.data_ptr<float>(), target_slope.data_ptr<float>(), plan.rule,
          class_start + r0 / K,
          lse_hi.data_ptr<float>(), lse_lo.data_ptr<float>(), grad_rows.data_ptr<float>(), lift, smoothing_per_class,
          plan.params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_x) {
        if (is_float) {
          acc.addmm_(u_tile, wc);
        } else {
          at::mm_out(a_chunk, u_tile, wc, at::kFloat);
          acc.addcmul_(a_chunk, unlift);  // A += (U·2^k) W_chunk · 2^-k
        }
      }
      if (need_w) {
        at::Tensor h = is_float ? grad_w->narrow(0, r0, n) : front(h_buffer, n, D);
        if (is_float) {
          at::mm_out(h, u_tile.t(), x);
        } else {
          at::mm_out(h, u_tile.t(), x, at::kFloat);
        }
        project_rows_kernel<scalar_t, scalar_t><<<grid_for(n, kThreads / kWarp), kThreads, 0, stream>>>(
            h.data_ptr<float>(), wc.data_ptr<scalar_t>(), r.data_ptr<float>(), n, D, vector_rows(wc),
            unlift.data_ptr<float>(),
            grad_w->data_ptr<scalar_t>() + r0 * D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (need_x) {
      project_rows_kernel<scalar_t, scalar_t><<<grid_for(B, kThreads / kWarp), kThreads, 0, stream>>>(
          acc.data_ptr<float>(), x.data_ptr<scalar_t>(), q.data_ptr<float>(), B, D, vector_rows(x),
          unit.data_ptr<float>(), grad_x->data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// The definitions above are those cuda_bindings.cpp declares through these types.
static_assert(std::is_same_v<decltype(forward_partials), ForwardPartialsFn>);
static_assert(std::is_same_v<decltype(backward), BackwardFn>);

}  // namespace cuda
}  // namespace marginfused
