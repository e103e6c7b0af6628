// The `cpu` extension: the chunked driver (driver.h, where the algorithm is written out) on CPU
// tensors, with this device's row passes, inverse norms and projection as loops the compiler
// vectorises and its units of work dealt to OpenMP threads; and the pybind module.
//
// Threads: the units (the forward's splits, the backward's chunks) are dealt dynamically to the
// OpenMP threads (statically under torch.use_deterministic_algorithms(True), so that each thread
// adds the same chunks into its dX accumulator in the same order on every run: bit-identical for a
// given thread count; a split's partials are the same whichever thread walks it) in one parallel
// region per call. Each thread runs the GEMMs of its units single-threaded (its tile stays in its
// core's cache). One barrier per call, not several per chunk, keeps the backend fast on a machine
// whose cores are shared.
//
// GEMM dtypes: float32 inputs in float32. bfloat16 inputs in bfloat16 where the CPU has it natively
// (oneDNN's AVX512-BF16 or AMX paths through ATen: S, U W and Uᵀ X computed with float32
// accumulation and rounded to bfloat16 once, as the torch reference's own bfloat16 matmul rounds its
// logits; `use_native_bf16_gemm`, set once per process by the Python side); otherwise, and for
// float16, in float32 on converted copies of x and of each chunk of W. The row passes read S and
// write U in the GEMMs' dtype, bfloat16 as its bits (widened and rounded with integer operations,
// so that every loop vectorises).
//
// Profiler scopes (torch.profiler, on the calling thread): marginfused::cpu_forward_rows,
// cpu_gradient_rows, cpu_project, cpu_inverse_norms.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Half.h>

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "driver.h"

namespace marginfused {
namespace {

std::atomic<bool> native_bf16_gemm{false};

// A bfloat16 value as its bits.
using bf16_bits = uint16_t;

// A GEMM dtype's value widened to fp32, and an fp32 value rounded (to nearest even) to an output
// dtype. (Rounding to bfloat16 with integer operations assumes no NaN payload in the top mantissa
// bits; the inputs' values are checked finite before the kernels run.)
MF_INLINE float widen(float v) { return v; }
MF_INLINE float widen(bf16_bits v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}

template <typename T>
MF_INLINE T narrow(float v) {
  return static_cast<T>(v);
}
template <>
MF_INLINE bf16_bits narrow<bf16_bits>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(float));
  return static_cast<bf16_bits>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// f(data) with the data of a GEMM operand or product (float32, or bfloat16 as its bits).
template <typename F>
void with_gemm_data(const at::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(static_cast<bf16_bits*>(t.data_ptr()));
  } else {
    f(t.data_ptr<float>());
  }
}

// f(data) with the data of a gradient in the inputs' dtype.
template <typename F>
void with_output_data(const at::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(static_cast<bf16_bits*>(t.data_ptr()));
  } else if (t.scalar_type() == at::kHalf) {
    f(t.data_ptr<c10::Half>());
  } else {
    f(t.data_ptr<float>());
  }
}

// exp(v) in fp32 without a library call, so the loops over a tile row vectorise: Cody-Waite
// range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial for e^r, and 2^k built in the
// exponent bits. Relative error < 1e-7 (8e-8 measured over [-87, 0]). Below -87 it returns e^-87
// (1.6e-38) rather than underflowing (no branch, so the loops vectorise; every use adds it to sums >= 1 or
// to gradients where 1e-38 is far below fp32 resolution).
MF_INLINE float exp_fp32(float v) {
  v = v < -87.0f ? -87.0f : v;
  v = v > 88.0f ? 88.0f : v;
  // Round v·log2(e) to the nearest integer with the 1.5·2^23 trick (no floor: vectorises on SSE2).
  float k = v * 1.44269504088896341f + 12582912.0f;
  k -= 12582912.0f;
  float r = v - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return poly * two_k;
}

// The grain of a parallel loop over rows of length `dim`: about 4096 elements.
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, dim)); }

// 1/max(|row|, 1e-12) of `count` contiguous rows of length `dim`, into out; a row whose sum of
// squares overflows is summed again scaled (common.h, inverse_norm).
template <typename in_t>
void row_inverse_norms(const in_t* rows, int64_t count, int64_t dim, float* out) {
  at::parallel_for(0, count, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const in_t* row = rows + i * dim;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < dim; ++d) sq += widen(row[d]) * widen(row[d]);
      if (!squares_overflowed(sq)) {
        out[i] = inverse_norm(sq);
        continue;
      }
      float largest = 0.0f;
#pragma omp simd reduction(max : largest)
      for (int64_t d = 0; d < dim; ++d) largest = std::max(largest, std::fabs(widen(row[d])));
      const float scale = row_scale(largest), down = 1.0f / scale;
      float scaled = 0.0f;
#pragma omp simd reduction(+ : scaled)
      for (int64_t d = 0; d < dim; ++d) scaled += (widen(row[d]) * down) * (widen(row[d]) * down);
      out[i] = scaled_inverse_norm(scale, scaled);
    }
  });
}

// out_i = (h_i − v̂_i (v̂_i·h_i))·back with v̂_i = inv_i v_i, or h_i·back where |v_i| < 1e-12, for
// `count` rows. v̂ is formed before any product, so no sum overflows for huge rows. `out` may alias
// `h` (each element is read before it is written).
template <typename h_t, typename v_t, typename out_t>
void project(const h_t* h, const v_t* v, const float* inv, int64_t count, int64_t dim, float back, out_t* out) {
  at::parallel_for(0, count, row_grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const h_t* hi = h + i * dim;
      const v_t* vi = v + i * dim;
      const float r = inv[i];
      float vh = 0.0f;
#pragma omp simd reduction(+ : vh)
      for (int64_t d = 0; d < dim; ++d) vh += (widen(vi[d]) * r) * widen(hi[d]);
      const float coef = above_norm_floor(r) ? vh : 0.0f;
      out_t* oi = out + i * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) oi[d] = narrow<out_t>((widen(hi[d]) - (widen(vi[d]) * r) * coef) * back);
    }
  });
}

// c_ij = clamp(q_i r_j S_ij, -1, 1) of S_ij in a GEMM dtype.
template <typename product_t>
MF_INLINE float cosine(product_t dot, float qi, float rj) {
  float c = widen(dot) * qi * rj;
  c = c < -1.0f ? -1.0f : c;
  return c > 1.0f ? 1.0f : c;
}

// c_ij of row i from S_i·, one row of W per class.
template <typename product_t>
struct RowCosines {
  const product_t* dots;
  float qi;
  const float* r;
  MF_INLINE float operator()(int64_t j) const { return cosine(dots[j], qi, r[j]); }
};

// The class cosines a sub-centre pass left in `best`.
struct ClassCosines {
  const float* best;
  MF_INLINE float operator()(int64_t j) const { return best[j]; }
};

// Row i's class cosines over a chunk of n classes of K sub-centres each, from S_i· over their n·K
// rows: best[j] = c_ij, the largest of the class's K cosines, and choice[j] the first k holding it.
// One pass per sub-centre, each vectorised over the classes.
template <typename product_t>
inline void subcenter_cosines(const product_t* dots, float qi, const float* r, int64_t n, int64_t subcenters,
                              float* best, int32_t* choice) {
  for (int64_t k = 0; k < subcenters; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float c = cosine(dots[j * subcenters + k], qi, r[j * subcenters + k]);
      const bool better = k == 0 || c > best[j];
      best[j] = better ? c : best[j];
      choice[j] = better ? static_cast<int32_t>(k) : choice[j];
    }
  }
}

// body(negatives) with row i's negatives: NoRule where the call has no rule (the fast loops), else
// its RowRule.
template <typename Body>
inline void with_negatives(const Rows& rows, int64_t i, const Body& body) {
  if (rows.rule.threshold) {
    body(row_rule(rows.rule, rows.scale, i));
  } else {
    body(NoRule{rows.scale});
  }
}

// The largest negative logit of a row's class cosines, the target's excluded (its cosine set to
// -inf, whose logit is -inf).
template <typename Negatives>
inline float largest_negative(const float* cosines, int64_t n, const Negatives& neg) {
  float largest = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : largest)
  for (int64_t j = 0; j < n; ++j) {
    const float z = neg.logit(cosines[j]);
    largest = largest > z ? largest : z;
  }
  return largest;
}

// One row of one chunk of n classes, forward: folds its logits into the split's row i (common.h,
// SplitPartials). cosine_of(j) gives c_ij (RowCosines, or the ClassCosines of sub-centres), kept in
// `cosines` (scratch; it may be the very array cosine_of reads). The target (column `target`, or
// -1) takes t_i; `neg` gives the other logits.
template <typename CosineOf, typename Negatives>
inline void forward_row(const CosineOf& cosine_of, float* cosines, int64_t n, int64_t target, float target_logit,
                        const Negatives& neg, int64_t class0, const SplitPartials& out, int64_t i) {
  float cmax = -std::numeric_limits<float>::infinity();
  float zmax = -std::numeric_limits<float>::infinity();
  float zsum = 0.0f;
#pragma omp simd reduction(max : cmax, zmax) reduction(+ : zsum)
  for (int64_t j = 0; j < n; ++j) {
    const float c = cosine_of(j);
    cosines[j] = c;
    cmax = cmax > c ? cmax : c;
    const float z = neg.logit(c);
    zmax = zmax > z ? zmax : z;
    zsum += z;
  }
  if (cmax > out.best_cos[i]) {  // strictly: an earlier class keeps a tie
    int64_t j = 0;
    while (cosines[j] != cmax) ++j;
    out.best_cos[i] = cmax;
    out.best_class[i] = class0 + j;
  }
  if (target >= 0) {  // the target's logit is t_i, not its negative's: take its cosine out of the row
    const float zt = neg.logit(cosines[target]);
    cosines[target] = -std::numeric_limits<float>::infinity();
    zsum += target_logit - zt;
    zmax = std::max(zt < zmax ? zmax : largest_negative(cosines, n, neg), target_logit);
  }
  const float new_max = std::max(out.max[i], zmax);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_fp32(neg.logit(cosines[j]) - new_max);
  if (target >= 0) sum += exp_fp32(target_logit - new_max);
  fold_logits(out, i, new_max, sum, zsum);
}

// One row of one chunk of n classes, backward: U_ij = u_i q_i r_j G_ij (driver.h) into `grads`, from
// c_ij = cosine_of(j), which may read the very array written (element j is read before it is
// written); `lifted_uq` = 2^k u_i q_i (the fp16 lift's 2^k, or 1). Zero on an ignored row or where u_i = 0.
template <typename CosineOf, typename Negatives, typename grad_t>
inline void gradient_row(const CosineOf& cosine_of, grad_t* grads, int64_t n, const float* r, const Rows& rows,
                         int64_t i, int64_t target, float lifted_uq, const Negatives& neg) {
  if (rows.labels[i] == rows.ignore_index || rows.upstream[i] == 0.0f) {
    std::fill(grads, grads + n, narrow<grad_t>(0.0f));
    return;
  }
  const float m = rows.row_max[i], log_s = rows.log_sumexp[i];
  const float eps = rows.label_smoothing, eps_per_class = rows.smoothing_per_class;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float c = cosine_of(j);
    const float prob = exp_fp32((neg.logit(c) - m) - log_s);
    grads[j] = narrow<grad_t>(lifted_uq * r[j] * logit_grad(prob, neg.slope(c), false, eps, eps_per_class));
  }
  if (target >= 0) {
    const float prob = exp_fp32((rows.target_logit[i] - m) - log_s);
    grads[target] =
        narrow<grad_t>(lifted_uq * r[target] * logit_grad(prob, rows.target_slope[i], true, eps, eps_per_class));
  }
}

// The forward row pass over a chunk's B×(n·K) tile S (`dots`).
template <typename product_t, typename Scratch>
void forward_tile(const product_t* dots, int64_t batch, const float* r, const Rows& rows, const Chunk& chunk,
                  const SplitPartials& out, Scratch& scratch) {
  const int64_t K = rows.subcenters, n = chunk.classes;
  float* cosines = scratch.cosines.data();
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t target = target_column(rows.labels[i], chunk.class0, n, rows.ignore_index);
    const product_t* row = dots + i * chunk.rows;
    with_negatives(rows, i, [&](const auto& neg) {
      if (K == 1) {
        forward_row(RowCosines<product_t>{row, rows.q[i], r}, cosines, n, target, rows.target_logit[i], neg,
                    chunk.class0, out, i);
      } else {
        subcenter_cosines(row, rows.q[i], r, n, K, cosines, scratch.choice.data());
        forward_row(ClassCosines{cosines}, cosines, n, target, rows.target_logit[i], neg, chunk.class0, out, i);
      }
    });
  }
}

// The gradient row pass: U (`grads`) from S (`dots`), which may be the same array. With sub-centres
// each row's class entries are formed in the scratch row first, from all of S_i·, then spread over
// U_i·: each at its chosen sub-centre's row, 0 at the others.
template <typename value_t, typename Scratch>
void gradient_tile(const value_t* dots, value_t* grads, int64_t batch, const float* r, const Rows& rows,
                   const Chunk& chunk, Scratch& scratch) {
  const int64_t K = rows.subcenters, n = chunk.classes;
  const float lift = rows.lift ? rows.lift[0] : 1.0f;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t target = target_column(rows.labels[i], chunk.class0, n, rows.ignore_index);
    const float lifted_uq = lift * rows.upstream[i] * rows.q[i];
    const value_t* row = dots + i * chunk.rows;
    value_t* out = grads + i * chunk.rows;
    with_negatives(rows, i, [&](const auto& neg) {
      if (K == 1) {
        gradient_row(RowCosines<value_t>{row, rows.q[i], r}, out, n, r, rows, i, target, lifted_uq, neg);
        return;
      }
      float* best = scratch.cosines.data();
      float* r_best = scratch.r_best.data();
      int32_t* choice = scratch.choice.data();
      subcenter_cosines(row, rows.q[i], r, n, K, best, choice);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) r_best[j] = r[j * K + choice[j]];
      gradient_row(ClassCosines{best}, best, n, r_best, rows, i, target, lifted_uq, neg);
      for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[j * K + k] = narrow<value_t>(choice[j] == k ? best[j] : 0.0f);
      }
    });
  }
}

struct CpuDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  static constexpr const char* kForward = "marginfused cpu forward_partials";
  static constexpr const char* kBackward = "marginfused cpu backward";

  struct Guard {
    explicit Guard(c10::Device) {}
  };

  // A chunk's row of class cosines, sub-centre choices and the chosen rows' inverse norms.
  struct Scratch {
    std::vector<float> cosines, r_best;
    std::vector<int32_t> choice;
    explicit Scratch(int64_t n) : cosines(n), r_best(n), choice(n) {}
  };

  static at::ScalarType operand_type(at::ScalarType input) {
    return input == at::kFloat || (input == at::kBFloat16 && native_bf16_gemm.load()) ? input : at::kFloat;
  }
  static at::ScalarType dots_type(at::ScalarType input) { return operand_type(input); }
  static at::ScalarType product_type(at::ScalarType input) { return operand_type(input); }
  // Each row's pass reads its row of S before it writes that row of U.
  static bool gradients_over_products(const GemmTypes&, int64_t) { return true; }
  // Each chunk's norms just before its GEMM, while its rows of W are in this core's cache.
  static constexpr bool kNormsPerChunk = true;
  static int64_t concurrency() { return at::get_num_threads(); }

  // body(thread, unit) for every unit in [0, units) on `workers` OpenMP threads, in one parallel
  // region; ATen's GEMMs inside run single-threaded. The first exception thrown by a body is
  // rethrown after the region.
  template <typename Body>
  static void run(int64_t units, int workers, const Body& body) {
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    auto unit = [&](int64_t k) {
      if (failed.load()) return;
      try {
        body(omp_get_thread_num(), k);
      } catch (...) {
#pragma omp critical(marginfused_error)
        {
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
    };
    if (at::globalContext().deterministicAlgorithms()) {
#pragma omp parallel for num_threads(workers) schedule(static)
      for (int64_t k = 0; k < units; ++k) unit(k);
    } else {
#pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
      for (int64_t k = 0; k < units; ++k) unit(k);
    }
    if (error) std::rethrow_exception(error);
  }

  // W's gradient, its memory advised to transparent huge pages before the first touch (where the
  // kernel allows them: THP "madvise" or "always"). A fresh W-sized allocation is faulted in page by
  // page as the projection writes it: at 4 KiB pages that costs several times the projection itself.
  static at::Tensor empty_like(const at::Tensor& t) {
    at::Tensor out = at::empty_like(t);
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
    const auto address = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (address + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
    return out;
  }

  static void inverse_norms(const at::Tensor& v, const at::Tensor& out) {
    RECORD_FUNCTION("marginfused::cpu_inverse_norms", c10::ArrayRef<const c10::IValue>{});
    with_gemm_data(v, [&](const auto* data) { row_inverse_norms(data, v.size(0), v.size(1), out.data_ptr<float>()); });
  }

  static void forward_rows(const Rows& rows, const at::Tensor& s, const at::Tensor& r, const Chunk& chunk,
                           const SplitPartials& out, Scratch& scratch) {
    RECORD_FUNCTION("marginfused::cpu_forward_rows", c10::ArrayRef<const c10::IValue>{});
    with_gemm_data(s, [&](const auto* dots) {
      forward_tile(dots, s.size(0), r.data_ptr<float>(), rows, chunk, out, scratch);
    });
  }

  // U over S in place: U takes S's dtype (the dots').
  static void gradient_rows(const Rows& rows, const at::Tensor& s, const at::Tensor& u, const at::Tensor& r,
                            const Chunk& chunk, Scratch& scratch) {
    RECORD_FUNCTION("marginfused::cpu_gradient_rows", c10::ArrayRef<const c10::IValue>{});
    with_gemm_data(s, [&](const auto* dots) {
      using value_t = std::remove_cv_t<std::remove_pointer_t<decltype(dots)>>;
      gradient_tile(dots, static_cast<value_t*>(u.data_ptr()), s.size(0), r.data_ptr<float>(), rows, chunk, scratch);
    });
  }

  static void project_rows(const at::Tensor& h, const at::Tensor& v, const at::Tensor& inverse, const float* unlift,
                           const at::Tensor& out) {
    RECORD_FUNCTION("marginfused::cpu_project", c10::ArrayRef<const c10::IValue>{});
    const float back = unlift ? *unlift : 1.0f;
    with_gemm_data(h, [&](const auto* hd) {
      with_gemm_data(v, [&](const auto* vd) {
        with_output_data(out, [&](auto* od) {
          project(hd, vd, inverse.data_ptr<float>(), h.size(0), h.size(1), back, od);
        });
      });
    });
  }
};

}  // namespace
}  // namespace marginfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  marginfused::bind_entry_points(m, "marginfused cpu backend: chunked softmax loss partials and gradients, "
                                    "margin-agnostic (ATen GEMM + OpenMP)",
                                 &marginfused::forward_partials<marginfused::CpuDevice>,
                                 &marginfused::backward<marginfused::CpuDevice>);
  m.def("use_native_bf16_gemm", [](bool native) { marginfused::native_bf16_gemm.store(native); },
        "Run the GEMMs of bfloat16 inputs in bfloat16 (true) or on float32 copies (false)", pybind11::arg("native"));
}
