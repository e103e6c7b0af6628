// The `cpu` backend: the chunked softmax loss for CPU tensors (ATen GEMM + OpenMP), margin-agnostic.
//
// Notation (docs/design.md §1): x (B×D) embeddings, W (C×D) class centres (a shard: global classes
// [class_start, class_start + C)), q_i = 1/max(|x_i|, 1e-12), r_j = 1/max(|w_j|, 1e-12),
//   c_ij = clamp(q_i r_j (x_i·w_j), -1, 1),  z_ij = s c_ij (j ≠ y_i),  z_iy = t_i,
// where the caller gives each row's target logit t_i = s f(c_iy) and its slope σ_i = ∂t_i/∂c_iy
// (whatever the margin f; this file never evaluates one). A row whose label is ignore_index, or
// outside this shard, has no target here: all its logits are s c_ij. Under a negative-logit rule
// (common.h's HardNegatives) a hard negative's logit is s c_ij (a_i + q c_ij) instead, and its
// s in G below s (a_i + 2 q c_ij).
//
// Forward, per chunk of classes [c0, c0 + n) (n from the caller, so one B×n fp32 tile per thread
// stays within a fixed budget whatever C is):
//   r for the chunk's rows of W (no normalised copy of W); S = X W_chunkᵀ (one GEMM, fp32);
//   one fused, vectorised pass per row: c = clamp(q_i r_j S_ij), the logit sum and the best cosine
//   and its class; then the online max / sum-exp of the logits, the target column taking t_i. The
//   outputs are the per-row partials of marginfused/partials.py over this weight's classes; the
//   caller merges shards and forms the loss.
//
// Backward, per chunk, with lse_i over all classes and u_i = grad_rows_i, the gradient of ℓ_i:
//   recompute S, then in place U_ij = u_i q_i r_j G_ij with p_ij = exp(z_ij - lse_i) and
//     G_ij = ∂ℓ_i/∂c_ij = s (p_ij - ε/C)               for j ≠ y_i,
//     G_iy = ∂ℓ_i/∂c_iy = σ_i (p_iy - (1-ε) - ε/C)
//   (U_i· = 0 on ignored rows), A += U W_chunk (B×D) and H_chunk = Uᵀ X (n×D), two GEMMs on the raw
//   inputs. Since A_i = q_i g_x̂_i and H_j = r_j g_ŵ_j, projecting through the normalisation is
//     ∂ℓ/∂x_i = A_i - x̂_i (x̂_i·A_i),   ∂ℓ/∂w_j = H_j - ŵ_j (ŵ_j·H_j)
//   (without the projection where |row| <= 1e-12, as F.normalize's clamp does).
//
// Sub-centres (K per class, W of C·K rows, class j's at rows jK..jK+K−1): chunks hold whole classes;
// c_ij is the largest of the class's K cosines, and U_i· puts each class's entry at its arg-max
// sub-centre's row and 0 at the others, so the same two GEMMs give dX and every sub-centre's dW.
//
// Threads: the chunks are dealt dynamically to the OpenMP threads (statically under
// torch.use_deterministic_algorithms(True), for bit-identical runs) in one parallel region per
// call; each thread owns a tile, partials (forward) or a dX accumulator (backward), and runs the
// GEMMs of its chunks single-threaded (its tile stays in its core's cache). The per-thread partials
// and accumulators are merged at the end; dW rows of different chunks are disjoint. One barrier per
// call, not several per chunk, keeps the backend fast on a machine whose cores are shared.
//
// Inputs in float32, float16 or bfloat16. The GEMMs of bfloat16 inputs run in bfloat16 where the CPU
// has it natively (oneDNN's AVX512-BF16 or AMX paths through ATen: S, and U's products with W and
// X, computed with float32 accumulation and rounded to bfloat16 once, as the torch reference's own
// bfloat16 matmul rounds its logits; `use_native_bf16_gemm`, set once per process by the Python
// side); otherwise, and for float16, chunks are converted to fp32 for fp32 GEMMs. Everything after
// the GEMMs is fp32 (the logit sum is accumulated across chunks in double).
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "common.h"

namespace marginfused {
namespace {

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;

std::atomic<bool> native_bf16_gemm{false};

// Whether this call's GEMMs run in the inputs' own dtype (bfloat16 with the native path on).
bool native_gemm(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 && native_bf16_gemm.load();
}

// exp(v) in fp32 without a library call, so the loops over a tile row vectorise: Cody-Waite
// range reduction to r in [-ln2/2, ln2/2], a degree-6 polynomial for e^r, and 2^k built in the
// exponent bits. Relative error < 1e-7 (8e-8 measured over [-87, 0]). Below -87 it returns e^-87
// (1.6e-38) rather than underflowing (no branch, so the loops vectorise; every use adds it to sums >= 1 or
// to gradients where 1e-38 is far below fp32 resolution).
inline float exp_fp32(float v) {
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

// A 16-bit value widened to fp32, and an fp32 value rounded (to nearest even) to a 16-bit type,
// written with bit operations for bfloat16 so the row loops that use them vectorise. (Rounding
// assumes a finite value: the inputs' values are checked before the kernels run.)
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(float));
  return out;
}
inline float widen(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T rounded(float v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 rounded<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(float));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
}

// 1/max(|row|, 1e-12) of `rows` contiguous rows of length `dim` (fp32 or 16-bit), into out; a row
// whose sum of squares overflows is summed again scaled (common.h, inverse_norm).
template <typename in_t>
void inverse_norms(const in_t* rows, int64_t count, int64_t dim, float* out) {
  RECORD_FUNCTION("marginfused::cpu_inverse_norms", c10::ArrayRef<const c10::IValue>{});
  at::parallel_for(0, count, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
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

// out_i = h_i - v̂_i (v̂_i·h_i) with v̂_i = inv_i v_i, or h_i where |v_i| < 1e-12, for `count` rows
// (h and v in fp32 or 16-bit): the gradient through v ↦ v/max(|v|, 1e-12) given h = inv_i ×
// (gradient w.r.t. v̂_i). v̂ is formed before any product, so no sum overflows for huge rows. `out`
// may alias an fp32 `h` (each element is read before it is written).
template <typename out_t, typename h_t, typename v_t>
void project_rows(const h_t* h, const v_t* v, const float* inv, int64_t count, int64_t dim, out_t* out) {
  RECORD_FUNCTION("marginfused::cpu_project", c10::ArrayRef<const c10::IValue>{});
  at::parallel_for(0, count, std::max<int64_t>(1, 4096 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const h_t* hi = h + i * dim;
      const v_t* vi = v + i * dim;
      const float r = inv[i];
      float vh = 0.0f;
#pragma omp simd reduction(+ : vh)
      for (int64_t d = 0; d < dim; ++d) vh += (widen(vi[d]) * r) * widen(hi[d]);
      const float coef = above_norm_floor(r) ? vh : 0.0f;
      out_t* oi = out + i * dim;
      for (int64_t d = 0; d < dim; ++d) oi[d] = static_cast<out_t>(widen(hi[d]) - (widen(vi[d]) * r) * coef);
    }
  });
}

// The per-row partials of the forward pass over the chunks one thread has walked.
struct Partials {
  std::vector<float> max, sumexp, best_cos;
  std::vector<double> logit_sum;
  std::vector<int64_t> best_class;

  Partials(int64_t batch, int64_t class_start)
      : max(batch, -std::numeric_limits<float>::infinity()),
        sumexp(batch, 0.0f),
        best_cos(batch, -std::numeric_limits<float>::infinity()),
        logit_sum(batch, 0.0),
        best_class(batch, class_start) {}

  // Fold in another thread's partials of disjoint chunks (ties in best_cos: the smaller class).
  void merge(const Partials& o, int64_t i) {
    if (o.max[i] > -std::numeric_limits<float>::infinity()) {
      const float top = std::max(max[i], o.max[i]);
      sumexp[i] = sumexp[i] * std::exp(max[i] - top) + o.sumexp[i] * std::exp(o.max[i] - top);
      max[i] = top;
    }
    logit_sum[i] += o.logit_sum[i];
    if (o.best_cos[i] > best_cos[i] || (o.best_cos[i] == best_cos[i] && o.best_class[i] < best_class[i])) {
      best_cos[i] = o.best_cos[i];
      best_class[i] = o.best_class[i];
    }
  }
};

// c_ij = clamp(q_i r_j S_ij, -1, 1), from S_ij in fp32 or a 16-bit GEMM's own output.
template <typename in_t>
inline float clamped_cosine(in_t dot, float qi, float rj) {
  float c = widen(dot) * qi * rj;
  c = c < -1.0f ? -1.0f : c;
  return c > 1.0f ? 1.0f : c;
}

// c_ij of row i from S_i· (fp32, or a 16-bit GEMM's own output, widened as it is read): one row of
// W per class.
template <typename in_t>
struct RowCosines {
  const in_t* dots;
  float qi;
  const float* r;
  float operator()(int64_t j) const { return clamped_cosine(dots[j], qi, r[j]); }
};

// Row i's class cosines over a chunk of n classes of K sub-centres each, from S_i· over their n·K
// rows: best[j] = c_ij, the largest of the class's K cosines, and choice[j] the first k holding it.
// One pass per sub-centre, each vectorised over the classes.
template <typename in_t>
inline void subcenter_cosines(const in_t* dots, float qi, const float* r, int64_t n, int64_t subcenters,
                              float* best, int32_t* choice) {
  for (int64_t k = 0; k < subcenters; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float c = clamped_cosine(dots[j * subcenters + k], qi, r[j * subcenters + k]);
      const bool better = k == 0 || c > best[j];
      best[j] = better ? c : best[j];
      choice[j] = better ? static_cast<int32_t>(k) : choice[j];
    }
  }
}

// One row of one chunk of n classes, forward. cosine_of(j) gives c_ij (RowCosines, from the row's
// raw dot products; or the class cosines subcenter_cosines left in `row`), written to `row` as
// scratch (each read before it is written). t_i (`target_logit`) is read
// only where the target is in the chunk; `neg` gives the other entries' logits (PlainNegatives, or
// RuledNegatives under a negative-logit rule).
template <typename CosineOf, typename Negatives>
inline void forward_row(const CosineOf& cosine_of, float* row, int64_t n, int64_t label, int64_t chunk_start,
                        float target_logit, const Negatives& neg, const LossParams& p, Partials& out, int64_t i) {
  float cmax = -std::numeric_limits<float>::infinity();
  float zmax = -std::numeric_limits<float>::infinity();
  float zsum = 0.0f;
#pragma omp simd reduction(max : cmax, zmax) reduction(+ : zsum)
  for (int64_t j = 0; j < n; ++j) {
    const float c = cosine_of(j);
    row[j] = c;
    cmax = cmax > c ? cmax : c;
    const float z = neg.logit(c);
    zmax = zmax > z ? zmax : z;
    zsum += z;
  }
  if (cmax > out.best_cos[i]) {  // strictly greater: the first maximal class wins, like argmax
    int64_t j = 0;
    while (row[j] != cmax) ++j;
    out.best_cos[i] = cmax;
    out.best_class[i] = chunk_start + j;
  }
  const int64_t target = target_column(label, chunk_start, n, p.ignore_index);
  double logits = static_cast<double>(zsum);  // Σ_j z_ij over the chunk
  if (target >= 0) {
    // The target's logit is t_i, not its negative's: take its cosine out of the row (the logit of
    // -inf is -inf, whose exp adds e^-87, see exp_fp32) and fold t_i in separately.
    const float zt = neg.logit(row[target]);
    row[target] = -std::numeric_limits<float>::infinity();
    logits += static_cast<double>(target_logit) - static_cast<double>(zt);
    float others = zmax;
    if (zt >= zmax) {  // the target held the maximum: the largest other logit
      others = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : others)
      for (int64_t j = 0; j < n; ++j) {
        const float z = neg.logit(row[j]);
        others = others > z ? others : z;
      }
    }
    zmax = std::max(others, target_logit);
  }
  const float m_old = out.max[i];
  const float m_new = std::max(m_old, zmax);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_fp32(neg.logit(row[j]) - m_new);
  if (target >= 0) sum += exp_fp32(target_logit - m_new);
  out.sumexp[i] = out.sumexp[i] * exp_fp32(m_old - m_new) + sum;
  out.max[i] = m_new;
  out.logit_sum[i] += logits;
}

// One row of one chunk of n classes, backward: c_ij from cosine_of(j) (RowCosines over S_i· in
// `row` itself, or the class cosines of sub-centres), U_ij = u_i q_i r_j G_ij out (`row`, in place:
// element j is read before it is written), in fp32 or, for native 16-bit GEMMs, in their dtype
// (computed in fp32, rounded once for the next GEMMs); zero on an ignored row (or u_i = 0). t_i and
// σ_i (`target_logit`, `target_slope`) are read only where the target is in the chunk; `neg` gives
// the other entries' logits and slopes; lse_i is float64, split by split_lse.
template <typename value_t, typename CosineOf, typename Negatives>
inline void backward_row(value_t* row, int64_t n, const CosineOf& cosine_of, float qi, const float* r, int64_t label,
                         int64_t chunk_start, float target_logit, float target_slope, const Negatives& neg, double lse,
                         float grad_row, float smoothing_per_class, const LossParams& p) {
  if (label == p.ignore_index || grad_row == 0.0f) {
    std::fill(row, row + n, rounded<value_t>(0.0f));
    return;
  }
  const float eps = p.label_smoothing;
  const float uq = grad_row * qi;
  const SplitLse split = split_lse(lse);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float c = cosine_of(j);
    const float prob = exp_fp32((neg.logit(c) - split.hi) - split.lo);
    row[j] = rounded<value_t>(uq * r[j] * logit_grad(prob, neg.slope(c), false, eps, smoothing_per_class));
  }
  const int64_t target = target_column(label, chunk_start, n, p.ignore_index);
  if (target >= 0) {
    const float prob = exp_fp32((target_logit - split.hi) - split.lo);
    row[target] = rounded<value_t>(uq * r[target] * logit_grad(prob, target_slope, true, eps, smoothing_per_class));
  }
}

// backward_row with K sub-centres per class: `row` holds S_i· over the chunk's n·K rows of W and
// becomes U_i· in place, each class's entry at its arg-max sub-centre and 0 at the others. All of
// S_i· is read first, into the class cosines `best`, the choices and the chosen rows' inverse norms
// `r_best`; backward_row turns `best` into the classes' entries of U.
template <typename value_t, typename Negatives>
inline void backward_row_subcenters(value_t* row, float* best, float* r_best, int32_t* choice, int64_t n,
                                    int64_t subcenters, float qi, const float* r, int64_t label, int64_t chunk_start,
                                    float target_logit, float target_slope, const Negatives& neg, double lse,
                                    float grad_row, float smoothing_per_class, const LossParams& p) {
  subcenter_cosines(row, qi, r, n, subcenters, best, choice);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) r_best[j] = r[j * subcenters + choice[j]];
  backward_row(best, n, [best](int64_t j) { return best[j]; }, qi, r_best, label, chunk_start, target_logit,
               target_slope, neg, lse, grad_row, smoothing_per_class, p);
  for (int64_t k = 0; k < subcenters; ++k) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j * subcenters + k] = rounded<value_t>(choice[j] == k ? best[j] : 0.0f);
  }
}

// body(negatives of row i) with row i's negatives: PlainNegatives without a rule (the fast loop),
// else RuledNegatives.
template <typename Body>
inline void with_negatives(const HardNegatives& rule, float scale, int64_t i, const Body& body) {
  if (rule.threshold) {
    body(ruled_negatives(rule, scale, i));
  } else {
    body(PlainNegatives{scale});
  }
}

// fp32 rows [start, start + n) of a float/half/bf16 matrix: a view when it is float already,
// else converted into `buffer` (at least n rows).
at::Tensor fp32_rows(const at::Tensor& m, int64_t start, int64_t n, at::Tensor& buffer) {
  at::Tensor rows = m.narrow(0, start, n);
  if (m.scalar_type() == at::kFloat) return rows;
  at::Tensor out = buffer.narrow(0, 0, n);
  out.copy_(rows);
  return out;
}

at::Tensor as_fp32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kFloat));
  out.copy_(t);
  return out;
}

// One thread's buffers, allocated before the parallel region (so allocation trackers see them):
// the B×n tile (S, then U in place; fp32, or the inputs' dtype for native 16-bit GEMMs), the fp32
// copy of a weight chunk and fp32 dW chunk rows before the projection (half/bf16 inputs), the dX
// accumulator, the chunk's inverse norms, and one row each of fp32 cosines, sub-centre choices and
// their inverse norms (scratch); with native 16-bit GEMMs instead their B×D dX term and their n×D dW rows. n counts
// rows of W.
struct Workspace {
  at::Tensor tile, w32, h32, acc, a16, h16;
  std::vector<float> r, row, r_best;
  std::vector<int32_t> choice;

  Workspace(const at::Tensor& x, int64_t batch, int64_t dim, int64_t n_max, bool with_acc, bool with_h)
      : r(n_max), row(n_max), r_best(n_max), choice(n_max) {
    const auto f32 = x.options().dtype(at::kFloat);
    const bool native = native_gemm(x);
    tile = at::empty({batch * n_max}, native ? x.options() : f32);
    if (x.scalar_type() != at::kFloat && !native) w32 = at::empty({n_max, dim}, f32);
    if (with_h && !native) h32 = at::empty({n_max * dim}, f32);
    if (with_acc) acc = at::empty({batch, dim}, f32);
    if (native && with_acc) a16 = at::empty({batch, dim}, x.options());
    if (native && with_h) h16 = at::empty({n_max * dim}, x.options());
  }
};

int thread_count(int64_t chunks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
}

// body(thread, chunk) for every chunk in [0, chunks) on `threads` OpenMP threads: one parallel
// region per call, so a loaded machine costs one barrier, not one per chunk. Each thread calls
// ATen's GEMM on its own tile (single-threaded inside the region). The chunks are dealt
// dynamically (a slow core takes fewer), except under torch.use_deterministic_algorithms(True):
// then statically, so that each thread sums the same chunks in the same order on every run and the
// per-thread results, merged in thread order, are bit-identical for a given thread count. The
// first exception thrown by a body is rethrown after the region.
template <typename Body>
void run_chunks(int64_t chunks, int threads, const Body& body) {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto run = [&](int64_t k) {
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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < chunks; ++k) run(k);
  } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t k = 0; k < chunks; ++k) run(k);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

// forward_partials (common.h): every element of the five (B,) outputs. Labels are global class
// ids; the weight holds [class_start, class_start + C).
void forward_partials(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
                      const std::optional<at::Tensor>& hard_threshold, const std::optional<at::Tensor>& hard_offset,
                      double hard_quadratic, int64_t class_start, int64_t subcenters, int64_t chunk, double scale,
                      int64_t ignore_index, const at::Tensor& out_max, const at::Tensor& out_sumexp,
                      const at::Tensor& out_logit_sum, const at::Tensor& out_best_cos,
                      const at::Tensor& out_best_class) {
  constexpr const char* op = "marginfused cpu forward_partials";
  const ForwardPlan plan = check_forward_partials(op, kCPU, x, w, y, target_logit, hard_threshold, hard_offset,
                                                  hard_quadratic, class_start, subcenters, chunk, scale, ignore_index,
                                                  out_max, out_sumexp, out_logit_sum, out_best_cos, out_best_class);
  const LossParams& p = plan.params;
  const int64_t B = x.size(0), D = x.size(1);

  MF_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const bool native = native_gemm(x);
    const at::Tensor xf = as_fp32(x);
    std::vector<float> q(B);
    inverse_norms(xf.data_ptr<float>(), B, D, q.data());

    const int64_t K = subcenters;
    const int64_t n_max = chunk_rows(chunk, w.size(0), K);
    const int64_t chunks = (w.size(0) + n_max - 1) / n_max;
    const int threads = thread_count(chunks);
    std::vector<Workspace> work;
    std::vector<Partials> partials;
    for (int t = 0; t < threads; ++t) {
      work.emplace_back(x, B, D, n_max, false, false);
      partials.emplace_back(B, class_start);
    }
    const int64_t* labels = y.data_ptr<int64_t>();
    const float* targets = target_logit.data_ptr<float>();
    run_chunks(chunks, threads, [&](int t, int64_t k) {
      Workspace& ws = work[t];
      // the chunk's rows [r0, r0 + rows) of W: its classes [c0, c0 + n)
      const int64_t r0 = k * n_max, rows = std::min(n_max, w.size(0) - r0), c0 = r0 / K, n = rows / K;
      at::Tensor s_tile = front(ws.tile, B, rows);
      // S in the inputs' dtype for native 16-bit GEMMs (widened as it is read), else fp32
      const at::Tensor wc = native ? w.narrow(0, r0, rows) : fp32_rows(w, r0, rows, ws.w32);
      if (native) {
        inverse_norms(wc.data_ptr<scalar_t>(), rows, D, ws.r.data());
      } else {
        inverse_norms(wc.data_ptr<float>(), rows, D, ws.r.data());
      }
      at::mm_out(s_tile, native ? x : xf, wc.t());
      auto fold = [&](const auto* dots) {
        RECORD_FUNCTION("marginfused::cpu_forward_rows", c10::ArrayRef<const c10::IValue>{});
        using in_t = std::remove_cv_t<std::remove_pointer_t<decltype(dots)>>;
        for (int64_t i = 0; i < B; ++i)
          with_negatives(plan.rule, p.scale, i, [&](const auto& neg) {
            if (K == 1) {
              forward_row(RowCosines<in_t>{dots + i * rows, q[i], ws.r.data()}, ws.row.data(), n, labels[i],
                          class_start + c0, targets[i], neg, p, partials[t], i);
            } else {
              float* cosines = ws.row.data();
              subcenter_cosines(dots + i * rows, q[i], ws.r.data(), n, K, cosines, ws.choice.data());
              forward_row([cosines](int64_t j) { return cosines[j]; }, cosines, n, labels[i], class_start + c0,
                          targets[i], neg, p, partials[t], i);
            }
          });
      };
      if (native) {
        fold(s_tile.data_ptr<scalar_t>());
      } else {
        fold(s_tile.data_ptr<float>());
      }
    });

    Partials& all = partials[0];
    float* out[] = {out_max.data_ptr<float>(), out_sumexp.data_ptr<float>(), out_logit_sum.data_ptr<float>(),
                    out_best_cos.data_ptr<float>()};
    int64_t* out_class = out_best_class.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      for (int t = 1; t < threads; ++t) all.merge(partials[t], i);
      out[0][i] = all.max[i];
      out[1][i] = all.sumexp[i];
      out[2][i] = static_cast<float>(all.logit_sum[i]);
      out[3][i] = all.best_cos[i];
      out_class[i] = all.best_class[i];
    }
  });
}

// backward (common.h): lse is float64 (see backward_row). With shards, the grad_x of every shard
// are summed by the caller.
void backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, const at::Tensor& target_logit,
              const at::Tensor& target_slope, const std::optional<at::Tensor>& hard_threshold,
              const std::optional<at::Tensor>& hard_offset, double hard_quadratic, const at::Tensor& lse,
              const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_lift, int64_t class_start,
              int64_t subcenters, int64_t num_classes, int64_t chunk, double scale, double label_smoothing,
              int64_t ignore_index, const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_w) {
  constexpr const char* op = "marginfused cpu backward";
  const BackwardPlan plan = check_backward(op, kCPU, x, w, y, target_logit, target_slope, hard_threshold, hard_offset,
                                           hard_quadratic, lse, grad_rows, grad_lift, class_start, subcenters,
                                           num_classes, chunk, scale, label_smoothing, ignore_index, grad_x, grad_w);
  TORCH_CHECK(plan.lift == nullptr, op, ": grad_lift must be None (float16 inputs take float32 GEMMs here)");
  const bool need_x = plan.need_x, need_w = plan.need_w;
  if (!need_x && !need_w) return;
  const int64_t B = x.size(0), D = x.size(1), K = subcenters;

  MF_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const bool is_float = x.scalar_type() == at::kFloat;
    const bool native = native_gemm(x);
    const at::Tensor xf = as_fp32(x);
    std::vector<float> q(B);
    inverse_norms(xf.data_ptr<float>(), B, D, q.data());

    const int64_t n_max = chunk_rows(chunk, w.size(0), K);
    const int64_t chunks = (w.size(0) + n_max - 1) / n_max;
    const int threads = thread_count(chunks);
    std::vector<Workspace> work;
    // A = Σ_chunks U W_chunk, one fp32 accumulator per thread; thread 0's is grad_x itself when fp32.
    for (int t = 0; t < threads; ++t)
      work.emplace_back(x, B, D, n_max, need_x && !(is_float && t == 0), need_w && !is_float);
    if (need_x && is_float) work[0].acc = *grad_x;
    for (Workspace& ws : work)
      if (need_x) ws.acc.zero_();
    const int64_t* labels = y.data_ptr<int64_t>();
    const float* targets = target_logit.data_ptr<float>();
    const float* slopes = target_slope.data_ptr<float>();
    const double* lse_data = lse.data_ptr<double>();
    const float* up = grad_rows.data_ptr<float>();
    const float smoothing_per_class = static_cast<float>(label_smoothing / static_cast<double>(num_classes));

    run_chunks(chunks, threads, [&](int t, int64_t k) {
      Workspace& ws = work[t];
      // the chunk's rows [r0, r0 + n) of W, its classes [c0, c0 + n / K)
      const int64_t r0 = k * n_max, n = std::min(n_max, w.size(0) - r0), c0 = r0 / K;
      // the chunk of W in fp32, or as it is for native 16-bit GEMMs
      const at::Tensor wc = native ? w.narrow(0, r0, n) : fp32_rows(w, r0, n, ws.w32);
      if (native) {
        inverse_norms(wc.data_ptr<scalar_t>(), n, D, ws.r.data());
      } else {
        inverse_norms(wc.data_ptr<float>(), n, D, ws.r.data());
      }
      // S, then U in place: in the inputs' dtype for native 16-bit GEMMs (U computed in fp32 and
      // rounded once), else fp32
      at::Tensor u_tile = front(ws.tile, B, n);
      at::mm_out(u_tile, native ? x : xf, wc.t());
      auto row_pass = [&](auto* u_data) {
        RECORD_FUNCTION("marginfused::cpu_gradient_rows", c10::ArrayRef<const c10::IValue>{});
        for (int64_t i = 0; i < B; ++i)
          with_negatives(plan.rule, plan.params.scale, i, [&](const auto& neg) {
            auto* u_row = u_data + i * n;
            if (K == 1) {
              using value_t = std::remove_pointer_t<decltype(u_row)>;
              backward_row(u_row, n, RowCosines<value_t>{u_row, q[i], ws.r.data()}, q[i], ws.r.data(), labels[i],
                           class_start + c0, targets[i], slopes[i], neg, lse_data[i], up[i], smoothing_per_class,
                           plan.params);
            } else {
              backward_row_subcenters(u_row, ws.row.data(), ws.r_best.data(), ws.choice.data(), n / K, K, q[i],
                                      ws.r.data(), labels[i], class_start + c0, targets[i], slopes[i], neg,
                                      lse_data[i], up[i], smoothing_per_class, plan.params);
            }
          });
      };
      if (native) {
        row_pass(u_tile.data_ptr<scalar_t>());
      } else {
        row_pass(u_tile.data_ptr<float>());
      }
      if (need_x) {
        if (native) {
          at::mm_out(ws.a16, u_tile, wc);
          ws.acc.add_(ws.a16);
        } else {
          ws.acc.addmm_(u_tile, wc);
        }
      }
      if (need_w) {
        scalar_t* out = grad_w->data_ptr<scalar_t>() + r0 * D;
        if (native) {  // dW rows before the projection in the inputs' dtype, projected from there
          at::Tensor h = front(ws.h16, n, D);
          at::mm_out(h, u_tile.t(), x);
          project_rows(h.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), ws.r.data(), n, D, out);
        } else {
          at::Tensor h = is_float ? grad_w->narrow(0, r0, n) : front(ws.h32, n, D);
          at::mm_out(h, u_tile.t(), xf);
          project_rows(h.data_ptr<float>(), wc.data_ptr<float>(), ws.r.data(), n, D, out);
        }
      }
    });

    if (need_x) {
      at::Tensor acc = work[0].acc;
      for (int t = 1; t < threads; ++t) acc.add_(work[t].acc);
      project_rows(acc.data_ptr<float>(), xf.data_ptr<float>(), q.data(), B, D, grad_x->data_ptr<scalar_t>());
    }
  });
}

}  // namespace marginfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  marginfused::bind_entry_points(m, "marginfused cpu backend: chunked softmax loss partials and gradients, "
                                    "margin-agnostic (ATen GEMM + OpenMP)",
                                 &marginfused::forward_partials, &marginfused::backward);
  m.def("use_native_bf16_gemm", [](bool native) { marginfused::native_bf16_gemm.store(native); },
        "Run the GEMMs of bfloat16 inputs in bfloat16 (true) or on float32 copies (false)", pybind11::arg("native"));
}
