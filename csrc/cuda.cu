// The `cuda` extension, where Triton cannot run: the chunked driver (driver.h, where the algorithm is
// written out) on CUDA tensors, with this device's row passes, inverse norms and projection as
// CUDA kernels, every unit of work on the current stream in turn.
//
// GEMM dtypes: operands in the inputs' dtype; S in bfloat16 for bfloat16 inputs (cuBLAS accumulates
// in fp32 and rounds once, as the torch reference's bfloat16 matmul rounds its logits), else fp32
// (float16's range cannot hold every raw dot product); U W and Uᵀ X in fp32 (cuBLAS through ATen's
// out_dtype overload for half/bf16). The row passes read S and compute in fp32. The chunk size and
// the dX GEMM's depth splits come from Python (marginfused/backends/chunks.py: enough classes that
// the split dX GEMM's output tiles cover every SM, the chunk's working set within L2; sized from tile
// counts and bench/model's predictions, not yet timed on a GPU).
//
// Launches: once per forward, inverse_norms_kernel for x and for all of W (q and r, returned for the
// backward; once per backward too where its call is not given them); per chunk, forward:
// the S GEMM and
//   forward_rows_kernel    one block per row folds the chunk into its split's partials;
// backward: the S GEMM,
//   gradient_rows_kernel   U_ij = u_i q_i r_j G_ij elementwise, in the input dtype for the GEMMs (over
//                          S where both are bfloat16 or fp32): for float16 lifted by the caller's power
//                          of two 2^k before the cast (marginfused/backends/lift.py) and clamped to
//                          float16's range;
// the dX GEMM (one batched GEMM over its depth splits, adding into fp32 accumulators), the H GEMM and
//   project_rows_kernel    dW's rows from H (×2^-k where lifted), and after the last chunk dX from A.
// Sub-centres: a class's cosine is the largest of its K rows' (pick_subcenter), its entry of U sits
// at that row and 0 at the others.
//
// Only ATen/c10 headers are used (no cuBLAS headers), so this file compiles with nvcc against the
// headers of any torch build, which is what `make check-cuda` does on machines without a GPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "driver.h"

namespace marginfused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

int grid_for(int64_t work, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, 65535)));
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Min {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// op over one value of every thread of the block (kThreads), returned to every thread; `shared`
// holds a value per warp. Every thread of the block must call it.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
  v = warp_reduce(v, op);
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  T total = shared[0];
  for (int k = 1; k < kWarps; ++k) total = op(total, shared[k]);
  __syncthreads();  // every thread has read `shared` before it is written again
  return total;
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
    sq = warp_reduce(sq, Sum{});
    float inverse = inverse_norm(sq);
    if (squares_overflowed(sq)) {  // the same for every lane of the warp
      const float scale = row_scale(warp_reduce(largest, Max{})), down = 1.0f / scale;
      float scaled = 0.0f;
      for_lane_elements(rows + row * dim, dim, lane, vectorised, [&](int64_t, float e) { scaled += (e * down) * (e * down); });
      inverse = scaled_inverse_norm(scale, warp_reduce(scaled, Sum{}));
    }
    if (lane == 0) out[row] = inverse;
  }
}

// Sub-centres: a class's cosine is the largest of its K sub-centres' and its gradient goes to the
// first sub-centre holding it: pick_subcenter gives both, c_ij = max_k clamp(q_i r_k S_k, -1, 1) over
// the class's K raw dot products `dots` (fp32 or bfloat16) and inverse norms `r`.
struct SubcenterPick {
  float cosine;
  int64_t k;
};

template <typename dots_t>
__device__ __forceinline__ SubcenterPick pick_subcenter(const dots_t* dots, const float* r, float qi,
                                                        int64_t subcenters) {
  SubcenterPick best{clamp_unit(static_cast<float>(dots[0]) * qi * r[0]), 0};
  for (int64_t k = 1; k < subcenters; ++k) {
    const float c = clamp_unit(static_cast<float>(dots[k]) * qi * r[k]);
    if (c > best.cosine) best = SubcenterPick{c, k};
  }
  return best;
}

// c_ij of class j (chunk-local) from the row's dot products.
template <typename dots_t>
__device__ __forceinline__ float class_cosine(const dots_t* dots, const float* r, float qi, int64_t j,
                                              int64_t subcenters) {
  return subcenters == 1 ? clamp_unit(static_cast<float>(dots[j]) * qi * r[j])
                         : pick_subcenter(dots + j * subcenters, r + j * subcenters, qi, subcenters).cosine;
}

// One block per row of the tile: folds the row's logits over the chunk's classes into its split's
// partials (common.h, SplitPartials), in two passes over the row of S: the chunk's largest logit
// and cosine and its logit sum, then Σ exp(z − m') and, where the chunk's best cosine beats the
// split's, the first class holding it. The target's logit is t_i.
template <typename dots_t>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const dots_t* __restrict__ s, const float* __restrict__ r, Rows rows, Chunk chunk,
                        SplitPartials out) {
  __shared__ float shared_value[kWarps];
  __shared__ int64_t shared_index[kWarps];
  const int64_t i = blockIdx.x, n = chunk.classes, K = rows.subcenters;
  const dots_t* dots = s + i * chunk.rows;
  const float qi = rows.q[i];
  const int64_t target = target_column(rows.labels[i], chunk.class0, n, rows.ignore_index);
  const float target_logit = target >= 0 ? rows.target_logit[i] : 0.0f;
  const RowRule rule = row_rule(rows.rule, rows.scale, i);
  auto logit = [&](int64_t j, float c) { return j == target ? target_logit : rule.logit(c); };

  float zmax = -INFINITY, cmax = -INFINITY, zsum = 0.0f;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float c = class_cosine(dots, r, qi, j, K);
    const float z = logit(j, c);
    zmax = fmaxf(zmax, z);
    cmax = fmaxf(cmax, c);
    zsum += z;
  }
  zmax = block_reduce(zmax, Max{}, shared_value);
  cmax = block_reduce(cmax, Max{}, shared_value);
  zsum = block_reduce(zsum, Sum{}, shared_value);
  const float new_max = fmaxf(out.max[i], zmax);
  const bool better = cmax > out.best_cos[i];  // the same for the whole block
  float sumexp = 0.0f;
  int64_t first = n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float c = class_cosine(dots, r, qi, j, K);
    sumexp += expf(logit(j, c) - new_max);
    if (better && c == cmax && j < first) first = j;
  }
  sumexp = block_reduce(sumexp, Sum{}, shared_value);
  if (better) first = block_reduce(first, Min{}, shared_index);
  if (threadIdx.x == 0) {
    fold_logits(out, i, new_max, sumexp, zsum);
    if (better) {
      out.best_cos[i] = cmax;
      out.best_class[i] = chunk.class0 + first;
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

// Elementwise over the B×(chunk rows) tile: U_ij = 2^k u_i q_i r_j ∂ℓ_i/∂c_ij from S_ij (zero on
// ignored rows), written as grad_t (the input dtype, for the GEMMs; over S when S has that dtype
// and K = 1). t_i and σ_i are read only on the target. With K sub-centres per class, element jK + k
// holds class j's entry if k is its chosen sub-centre, else 0 (each thread reads its class's K dot
// products).
template <typename dots_t, typename grad_t>
__global__ void gradient_rows_kernel(const dots_t* s, grad_t* u, const float* __restrict__ r, Rows rows, Chunk chunk,
                                     int64_t batch) {
  // 2-D grid: x over the chunk's rows of W, y over rows of the batch (strided), so no index is
  // divided (but the column's class, once per thread, with sub-centres).
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= chunk.rows) return;
  const int64_t K = rows.subcenters;
  const int64_t klass = K == 1 ? j : j / K;  // this column's (chunk-local) class
  const int64_t group = klass * K;           // and its first row
  const float lift = rows.lift ? rows.lift[0] : 1.0f;
  for (int64_t i = blockIdx.y; i < batch; i += gridDim.y) {
    const int64_t idx = i * chunk.rows + j;
    const int64_t label = rows.labels[i];
    const float upstream = rows.upstream[i];
    float value = 0.0f;
    float c;
    int64_t chosen = j;  // the row the class's gradient goes to
    if (K == 1) {
      c = clamp_unit(static_cast<float>(s[idx]) * rows.q[i] * r[j]);
    } else {
      const SubcenterPick pick = pick_subcenter(s + i * chunk.rows + group, r + group, rows.q[i], K);
      c = pick.cosine;
      chosen = group + pick.k;
    }
    if (label != rows.ignore_index && upstream != 0.0f && chosen == j) {
      const bool is_target = label - chunk.class0 == klass;
      const RowRule rule = row_rule(rows.rule, rows.scale, i);
      const float z = is_target ? rows.target_logit[i] : rule.logit(c);
      const float slope = is_target ? rows.target_slope[i] : rule.slope(c);
      const float prob = expf((z - rows.row_max[i]) - rows.log_sumexp[i]);
      value = lift * upstream * rows.q[i] * r[j] *
              logit_grad(prob, slope, is_target, rows.label_smoothing, rows.smoothing_per_class);
    }
    u[idx] = to_gradient_tile<grad_t>(value);
  }
}

// out_i = (h_i - v̂_i (v̂_i·h_i))·unlift, v̂_i = inv_i v_i (or h_i·unlift where |v_i| < 1e-12): one
// warp per row; `unlift` (nullptr: 1) undoes the float16 gradient tile's lift; v̂ is formed before
// any product, so no sum overflows for huge rows; rows of v read 16 bytes at a time where
// `vectorised`. `out` may alias `h` (each lane reads its elements before writing them).
template <typename scalar_t, typename out_t>
__global__ void project_rows_kernel(const float* h, const scalar_t* __restrict__ v, const float* __restrict__ inv,
                                    int64_t count, int64_t dim, bool vectorised, const float* __restrict__ unlift,
                                    out_t* out) {
  const float back = unlift ? *unlift : 1.0f;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < count;
       row += warps) {
    const float* hi = h + row * dim;
    const scalar_t* vi = v + row * dim;
    const float r = inv[row];
    float vh = 0.0f;
    for_lane_elements(vi, dim, lane, vectorised, [&](int64_t d, float e) { vh += (e * r) * hi[d]; });
    vh = warp_reduce(vh, Sum{});
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

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// f(data) with S's data: bfloat16 or fp32 (CudaDevice::dots_type).
template <typename F>
void with_dots(const at::Tensor& s, const F& f) {
  if (s.scalar_type() == at::kBFloat16) {
    f(s.data_ptr<c10::BFloat16>());
  } else {
    f(s.data_ptr<float>());
  }
}

// The chunked driver's CUDA device (driver.h): one worker, the units in turn on the current stream.
struct CudaDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  static constexpr const char* kForward = "marginfused cuda forward_partials";
  static constexpr const char* kBackward = "marginfused cuda backward";
  using Guard = c10::cuda::CUDAGuard;

  struct Scratch {
    explicit Scratch(int64_t) {}
  };

  static at::ScalarType operand_type(at::ScalarType input) { return input; }
  static at::ScalarType dots_type(at::ScalarType input) { return input == at::kBFloat16 ? input : at::kFloat; }
  static at::ScalarType product_type(at::ScalarType) { return at::kFloat; }
  // Only where U and S have one dtype and each element of U reads its own element of S alone.
  static bool gradients_over_products(const GemmTypes& types, int64_t subcenters) {
    return types.dots == types.operand && subcenters == 1;
  }
  // All of W's norms in one launch before the first chunk, not one launch per chunk.
  static constexpr bool kNormsPerChunk = false;
  static int64_t concurrency() { return 1; }

  template <typename Body>
  static void run(int64_t units, int, const Body& body) {
    for (int64_t k = 0; k < units; ++k) body(0, k);
  }

  static at::Tensor empty_like(const at::Tensor& t) { return at::empty_like(t); }

  static void inverse_norms(const at::Tensor& v, const at::Tensor& out) {
    MF_DISPATCH_FLOATING_TYPES(v.scalar_type(), "marginfused cuda inverse_norms", [&] {
      inverse_norms_kernel<scalar_t><<<grid_for(v.size(0), kWarps), kThreads, 0, stream()>>>(
          v.data_ptr<scalar_t>(), v.size(0), v.size(1), vector_rows(v), out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void forward_rows(const Rows& rows, const at::Tensor& s, const at::Tensor& r, const Chunk& chunk,
                           const SplitPartials& out, Scratch&) {
    if (s.size(0) == 0) return;  // no rows: an empty grid is no launch
    TORCH_CHECK(s.size(0) <= std::numeric_limits<int>::max(), kForward, ": batch too large for one grid");
    with_dots(s, [&](const auto* dots) {
      forward_rows_kernel<<<static_cast<unsigned>(s.size(0)), kThreads, 0, stream()>>>(dots, r.data_ptr<float>(),
                                                                                      rows, chunk, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gradient_rows(const Rows& rows, const at::Tensor& s, const at::Tensor& u, const at::Tensor& r,
                            const Chunk& chunk, Scratch&) {
    if (s.size(0) == 0) return;  // no rows: an empty grid is no launch
    const dim3 grid(static_cast<unsigned>((chunk.rows + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min<int64_t>(s.size(0), 65535)));
    MF_DISPATCH_FLOATING_TYPES(u.scalar_type(), "marginfused cuda gradient_rows", [&] {
      with_dots(s, [&](const auto* dots) {
        gradient_rows_kernel<<<grid, kThreads, 0, stream()>>>(dots, u.data_ptr<scalar_t>(), r.data_ptr<float>(), rows,
                                                              chunk, s.size(0));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void project_rows(const at::Tensor& h, const at::Tensor& v, const at::Tensor& inverse, const float* unlift,
                           const at::Tensor& out) {
    MF_DISPATCH_FLOATING_TYPES(v.scalar_type(), "marginfused cuda project_rows", [&] {
      project_rows_kernel<scalar_t, scalar_t><<<grid_for(h.size(0), kWarps), kThreads, 0, stream()>>>(
          h.data_ptr<float>(), v.data_ptr<scalar_t>(), inverse.data_ptr<float>(), h.size(0), h.size(1),
          vector_rows(v), unlift, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

// The entry points cuda_bindings.cpp declares (common.h).
ForwardResult forward_partials(const Call& call) { return marginfused::forward_partials<CudaDevice>(call); }

Gradients backward(const Call& call, bool need_x, bool need_w) {
  return marginfused::backward<CudaDevice>(call, need_x, need_w);
}

static_assert(std::is_same_v<decltype(forward_partials), ForwardPartialsFn>);
static_assert(std::is_same_v<decltype(backward), BackwardFn>);

}  // namespace cuda
}  // namespace marginfused
