// The chunked algorithm of both extensions, written once: the checks of a Call, the chunks of W,
// the loop over them, the ATen GEMMs and the accumulation of the gradients. It is templated on a
// device (cpu.cpp's CpuDevice, cuda.cu's CudaDevice), which supplies its row passes, its inverse
// norms and its projection through the normalisation, the dtypes of its GEMMs, and how units of
// work are run (OpenMP threads, one CUDA stream). Host code.
//
// Notation (docs/design.md §1): x (B×D) embeddings, W (C×D) class centres (a shard: global classes
// [class_start, class_start + C)), q_i = 1/max(|x_i|, 1e-12), r_j = 1/max(|w_j|, 1e-12),
//   c_ij = clamp(q_i r_j (x_i·w_j), -1, 1),  z_ij = s c_ij (j ≠ y_i),  z_iy = t_i,
// where the caller gives each row's target logit t_i = s f(c_iy) and its slope σ_i = ∂t_i/∂c_iy
// (whatever the margin f; no file here evaluates one). A row whose label is ignore_index, or
// outside this shard, has no target here: all its logits are s c_ij. Under the negatives rule
// (common.h) a hard negative's logit is s c_ij (a_i + q c_ij) instead, and its s in G below
// s (a_i + 2 q c_ij).
//
// The classes are walked in chunks of n (from the caller's `chunk`, so that the B×n tile stays
// within a fixed budget whatever C is); per chunk, r for its rows of W (no normalised copy of W;
// on a GPU r is computed for all of W before the first chunk) and S = X W_chunkᵀ (one GEMM), then
// forward:  the row pass folds the chunk into its split's partials (common.h, SplitPartials): the
//           running max and sum-exp of the logits, their sum, and the best cosine and its class,
//           the target's column taking t_i. A split is a run of consecutive chunks; the splits'
//           partials are returned unmerged, in class order (marginfused/partials.py merges them).
// backward: with the log-sum-exp (m_i, log s_i) over all classes and u_i = upstream_i, the row pass
//           forms the gradient tile U_ij = u_i q_i r_j G_ij, with p_ij = exp((z_ij − m_i) − log s_i),
//             G_ij = ∂ℓ_i/∂c_ij = s (p_ij − ε/C)               for j ≠ y_i,
//             G_iy = ∂ℓ_i/∂c_iy = σ_i (p_iy − (1−ε) − ε/C)
//           (U_i· = 0 on ignored rows); then A += U W_chunk (B×D) and H_chunk = Uᵀ X (n×D), two GEMMs
//           on the raw inputs. The first splits its depth n over up to `dx_splits` ways (one batched
//           GEMM over consecutive row ranges of the chunk, each into its own float32 accumulator,
//           added up after the last chunk), so that its few B×D output tiles still fill a GPU.
//           Since A_i = q_i g_x̂_i and H_j = r_j g_ŵ_j, projecting through the normalisation gives
//             ∂ℓ/∂x_i = A_i − x̂_i (x̂_i·A_i),   ∂ℓ/∂w_j = H_j − ŵ_j (ŵ_j·H_j)
//           (without the projection where |row| <= 1e-12, as F.normalize's clamp does): dW's rows
//           chunk by chunk, dX after the last chunk.
//
// Sub-centres (K per class, W of C·K rows, class j's at rows jK..jK+K−1): chunks hold whole classes;
// c_ij is the largest of the class's K cosines (the first on ties), and U_i· puts each class's entry
// at that sub-centre's row and 0 at the others, so the same two GEMMs give dX and every
// sub-centre's dW.
//
// GEMMs: the operands (x, W's chunks, U) in the device's operand_type, S in its dots_type, U W and
// Uᵀ X in its product_type; the row passes compute in fp32 whatever they read and write, and dX is
// accumulated in fp32. The fp16 lift (2^k, 2^-k), where given, multiplies U before its cast to the
// operands' dtype; dW's rows and dX are divided by 2^k in their projections (exact: powers of two).
// Inverse norms of W's rows: per chunk, just before its GEMM reads it (a device whose kNormsPerChunk),
// or once for all of W before the first chunk (one launch instead of one per chunk). The forward
// keeps every row's r and x's q and returns them; a backward given them (Call's inv_x, inv_w) reads
// them and computes neither, else computes them as the forward does.
//
// Work: the units (the forward's splits, the backward's chunks) are run by the device's workers,
// each with its own buffers (Workspace), all allocated before any unit runs (so allocation trackers
// see them). Each worker adds its chunks' U W_chunk into its own dX accumulators (one per split of
// the depth); the accumulators are added in worker and split order at the end. dW rows of
// different chunks are disjoint.
//
// A device supplies, as static members:
//   kType, kForward, kBackward   its tensors' device type; its entry points' names, for messages
//   Guard(device)                what is held while a call runs (the CUDA device guard)
//   operand_type(input), dots_type(input), product_type(input)
//                                               its GEMMs' dtypes for inputs of dtype `input`
//   gradients_over_products(types, K)           whether the gradient pass may write U over S
//   kNormsPerChunk                              W's inverse norms chunk by chunk, or once for all of W
//   concurrency(), run(units, workers, body)    its workers at most; body(worker, unit) for every unit
//   empty_like(w)                               W's gradient, uninitialised
//   Scratch(n)                                  a worker's row-pass scratch for chunks of n rows
//   inverse_norms(v, out)                       out_i = 1/max(|v_i|, 1e-12), overflow-safe (common.h)
//   forward_rows(rows, s, r, chunk, split, scratch)    fold S of a chunk into a split's partials
//   gradient_rows(rows, s, u, r, chunk, scratch)       U from S (above)
//   project_rows(h, v, inverse, unlift, out)   out_i = (h_i − v̂_i (v̂_i·h_i))·unlift, v̂_i = inverse_i v_i,
//                                              h_i·unlift where |v_i| < 1e-12 (unlift: nullptr for 1);
//                                              out may be h itself
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <vector>

#include "common.h"

namespace marginfused {

// --- checks ----------------------------------------------------------------------------------------
//
// What Python cannot guarantee for a caller of the extension itself: the memory each entry point
// reads and writes. Every tensor on x's device, of its dtype and size, contiguous; the negatives
// rule's two tensors together; W's rows whole classes of K ≥ 1 sub-centres. The values (labels,
// finite inputs, the scalars' ranges) are marginfused's own checks, made once per call in Python.

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// `t` beside x: on x's very device, of `dtype`, contiguous, with `sizes`.
inline void check_beside(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                         at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(sizes), op, ": ", name, " must have shape ", at::IntArrayRef(sizes),
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_forward(const char* op, c10::DeviceType device_type, const Call& c) {
  TORCH_CHECK(c.x.defined(), op, ": x is an undefined tensor");
  TORCH_CHECK(c.x.device().type() == device_type, op, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", c.x.device());
  const at::ScalarType dtype = c.x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(c.x.dim() == 2, op, ": x must be 2-D, got shape ", c.x.sizes());
  const int64_t batch = c.x.size(0), dim = c.x.size(1);
  check_beside(op, "x", c.x, c.x, dtype, {batch, dim});
  TORCH_CHECK(c.w.defined() && c.w.dim() == 2, op, ": w must be a 2-D tensor");
  check_beside(op, "w", c.w, c.x, dtype, {c.w.size(0), dim});
  check_beside(op, "y", c.y, c.x, at::kLong, {batch});
  check_beside(op, "target_logit", c.target_logit, c.x, at::kFloat, {batch});
  TORCH_CHECK(given(c.rule_threshold) == given(c.rule_offset), op,
              ": rule_threshold and rule_offset must be given together");
  if (given(c.rule_threshold)) {
    check_beside(op, "rule_threshold", *c.rule_threshold, c.x, at::kFloat, {batch});
    check_beside(op, "rule_offset", *c.rule_offset, c.x, at::kFloat, {batch});
  }
  TORCH_CHECK(given(c.inv_x) == given(c.inv_w), op, ": inv_x and inv_w must be given together");
  if (given(c.inv_x)) {
    check_beside(op, "inv_x", *c.inv_x, c.x, at::kFloat, {batch});
    check_beside(op, "inv_w", *c.inv_w, c.x, at::kFloat, {c.w.size(0)});
  }
  TORCH_CHECK(c.subcenters >= 1, op, ": subcenters must be >= 1, got ", c.subcenters);
  TORCH_CHECK(c.w.size(0) % c.subcenters == 0, op, ": w's ", c.w.size(0), " rows are not whole classes of ",
              c.subcenters, " sub-centres");
}

inline void check_backward(const char* op, c10::DeviceType device_type, const Call& c) {
  check_forward(op, device_type, c);
  const int64_t batch = c.x.size(0);
  check_beside(op, "target_slope", c.target_slope, c.x, at::kFloat, {batch});
  check_beside(op, "row_max", c.row_max, c.x, at::kFloat, {batch});
  check_beside(op, "log_sumexp", c.log_sumexp, c.x, at::kFloat, {batch});
  check_beside(op, "upstream", c.upstream, c.x, at::kFloat, {batch});
  if (given(c.lift)) check_beside(op, "lift", *c.lift, c.x, at::kFloat, {2});
}

// --- the chunks --------------------------------------------------------------------------------------

// A contiguous (rows, cols) view of the front of a flat buffer.
inline at::Tensor front(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// W's rows in chunks of whole classes: the caller's `chunk` rows, at most all of them, rounded down
// to whole classes of K (at least one class).
struct Geometry {
  int64_t batch, dim, rows, subcenters, class_start, chunk_rows, chunks, dx_splits;

  explicit Geometry(const Call& call)
      : batch(call.x.size(0)),
        dim(call.x.size(1)),
        rows(call.w.size(0)),
        subcenters(call.subcenters),
        class_start(call.class_start),
        chunk_rows(std::max<int64_t>(subcenters, std::min(call.chunk, rows) / subcenters * subcenters)),
        chunks((rows + chunk_rows - 1) / chunk_rows),
        dx_splits(std::max<int64_t>(1, std::min(call.dx_splits, chunk_rows))) {}

  Chunk chunk(int64_t k) const {
    const int64_t row0 = k * chunk_rows, count = std::min(chunk_rows, rows - row0);
    return Chunk{row0, count, count / subcenters, class_start + row0 / subcenters};
  }
};

// The forward's splits: at least 64, so that each running sum in fp32 covers at most 1/64 of the
// chunks, and 4 per worker, so that a worker slowed by another process holds up at most a few
// chunks; never more than the chunks.
inline int64_t split_count(int64_t chunks, int64_t concurrency) {
  return std::min<int64_t>(chunks, std::max<int64_t>(64, 4 * concurrency));
}

// The first chunk of `split` of `splits` (balanced runs of consecutive chunks).
inline int64_t first_chunk(int64_t split, int64_t splits, int64_t chunks) { return split * chunks / splits; }

// The dtypes of a call's GEMMs on a device.
struct GemmTypes {
  at::ScalarType input;    // x's and W's
  at::ScalarType operand;  // the GEMMs' operands: x, W's chunks, U
  at::ScalarType dots;     // S = X W_chunkᵀ
  at::ScalarType product;  // U W_chunk and Uᵀ X
};

template <class Device>
GemmTypes gemm_types(at::ScalarType input) {
  return GemmTypes{input, Device::operand_type(input), Device::dots_type(input), Device::product_type(input)};
}

// `t` as a GEMM operand: itself, or converted to the operand dtype into `buffer` (at least as large).
inline at::Tensor as_operand(const at::Tensor& t, const GemmTypes& types, const at::Tensor& buffer) {
  if (t.scalar_type() == types.operand) return t;
  at::Tensor out = front(buffer, t.size(0), t.size(1));
  out.copy_(t);
  return out;
}

// out = a b through ATen, in out's dtype: the operands' own, or fp32 from 16-bit operands.
inline void product(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

// One worker's buffers (sizes for chunks of n rows of W).
template <class Device>
struct Workspace {
  at::Tensor products;   // (B·n) S, in the dots dtype
  at::Tensor gradients;  // (B·n) U, in the operand dtype: `products` itself where U is written over S
  at::Tensor w_rows;     // (n·D) a chunk of W in the operand dtype, where that is not W's own
  at::Tensor r;          // (n) fp32 the chunk's inverse norms        (norms per chunk, where none are kept)
  at::Tensor dx;         // (splits, B, D) fp32 Σ U W_chunk, a split of the depth each  (backward, need_x)
  at::Tensor dx_chunk;   // (splits, B, D) U W_chunk where no GEMM adds it to dx in fp32 (backward, need_x)
  at::Tensor dw_rows;    // (n·D) Uᵀ X, in cache for its projection into grad_w's rows  (backward, need_w)
  typename Device::Scratch scratch;

  Workspace(const Geometry& g, const GemmTypes& types, const at::TensorOptions& options, bool chunk_norms)
      : products(at::empty({g.batch * g.chunk_rows}, options.dtype(types.dots))), scratch(g.chunk_rows) {
    if (chunk_norms) r = at::empty({g.chunk_rows}, options.dtype(at::kFloat));
    if (types.operand != types.input) w_rows = at::empty({g.chunk_rows * g.dim}, options.dtype(types.operand));
  }
};

// A forward's buffers, one Workspace per worker; `chunk_norms`: with room for a chunk's inverse norms.
template <class Device>
std::vector<Workspace<Device>> forward_workspaces(int workers, const Geometry& g, const GemmTypes& types,
                                                  const at::TensorOptions& options, bool chunk_norms) {
  std::vector<Workspace<Device>> work;
  for (int t = 0; t < workers; ++t) work.emplace_back(g, types, options, chunk_norms);
  return work;
}

// A backward's buffers: the forward's, and U, the dX accumulators, one per split of the depth (worker
// 0's is grad_x itself for fp32 inputs and one split), zeroed; U W_chunk where the device's GEMM
// cannot add it to them in fp32; and Uᵀ X.
template <class Device>
std::vector<Workspace<Device>> backward_workspaces(int workers, const Geometry& g, const GemmTypes& types,
                                                   const at::TensorOptions& options, const at::Tensor& grad_x,
                                                   const at::Tensor& grad_w, bool chunk_norms) {
  std::vector<Workspace<Device>> work = forward_workspaces<Device>(workers, g, types, options, chunk_norms);
  const bool over = Device::gradients_over_products(types, g.subcenters);
  for (int t = 0; t < workers; ++t) {
    Workspace<Device>& ws = work[t];
    ws.gradients = over ? ws.products : at::empty({g.batch * g.chunk_rows}, options.dtype(types.operand));
    if (grad_x.defined()) {
      ws.dx = t == 0 && types.input == at::kFloat && g.dx_splits == 1
                  ? grad_x.view({1, g.batch, g.dim})
                  : at::empty({g.dx_splits, g.batch, g.dim}, options.dtype(at::kFloat));
      ws.dx.zero_();
      if (types.operand != at::kFloat && types.product != at::kFloat)
        ws.dx_chunk = at::empty({g.dx_splits, g.batch, g.dim}, options.dtype(types.product));
    }
    if (grad_w.defined()) ws.dw_rows = at::empty({g.chunk_rows * g.dim}, options.dtype(types.product));
  }
  return work;
}

// W's inverse norms r_j = 1/max(|w_j|, 1e-12) for a pass: `r` (C·K,) fp32, `filled` once it holds
// every row's (then a chunk reads its rows), else each chunk computes its own just before its GEMM
// reads it (into its rows of `r` where defined, else into the worker's ws.r).
struct WeightNorms {
  at::Tensor r;
  bool filled;
};

// The forward's: every row's kept (it returns them for the backward), all at once (one pass, one
// launch) or, where the device takes them chunk by chunk, each chunk's written into its rows.
template <class Device>
WeightNorms forward_norms(const Call& call) {
  at::Tensor r = at::empty({call.w.size(0)}, call.w.options().dtype(at::kFloat));
  if (!Device::kNormsPerChunk) Device::inverse_norms(call.w, r);
  return WeightNorms{r, !Device::kNormsPerChunk};
}

// The backward's: the forward's where the call gives them (inv_w, nothing computed), else all at
// once or chunk by chunk (into ws.r) as the device takes them.
template <class Device>
WeightNorms backward_norms(const Call& call) {
  if (given(call.inv_w)) return WeightNorms{*call.inv_w, true};
  if (Device::kNormsPerChunk) return WeightNorms{at::Tensor(), false};
  at::Tensor r = at::empty({call.w.size(0)}, call.w.options().dtype(at::kFloat));
  Device::inverse_norms(call.w, r);
  return WeightNorms{r, true};
}

// A chunk's rows of W as a GEMM operand, and their inverse norms.
struct ChunkOperand {
  at::Tensor w, r;
};

// The chunk's rows of W as a GEMM operand, and their inverse norms: the rows of norms.r where filled,
// or computed now (WeightNorms).
template <class Device>
ChunkOperand chunk_operand(const Call& call, const Chunk& chunk, const GemmTypes& types, const WeightNorms& norms,
                           Workspace<Device>& ws) {
  const at::Tensor wg = as_operand(call.w.narrow(0, chunk.row0, chunk.rows), types, ws.w_rows);
  if (norms.filled) return ChunkOperand{wg, norms.r.narrow(0, chunk.row0, chunk.rows)};
  const at::Tensor r = norms.r.defined() ? norms.r.narrow(0, chunk.row0, chunk.rows) : ws.r.narrow(0, 0, chunk.rows);
  Device::inverse_norms(wg, r);
  return ChunkOperand{wg, r};
}

// The ways a chunk of `rows` rows splits the depth of its dX GEMM: the most, up to `most`, that
// divide the rows evenly.
inline int64_t depth_splits(int64_t rows, int64_t most) {
  for (int64_t ways = std::min(most, rows); ways > 1; --ways) {
    if (rows % ways == 0) return ways;
  }
  return 1;
}

// acc[k] += U_k W_k for the k-th of `ways` consecutive row ranges of the chunk (U: B×n, W: n×D): one
// batched GEMM, in place where the operands are fp32 or the device's GEMM writes fp32 from 16-bit
// operands (cuBLAS through ATen's out_dtype overload), else through `buffer` in the product dtype.
// One way (the CPU's) takes the plain GEMMs.
inline void add_split_products(const at::Tensor& acc, const at::Tensor& u, const at::Tensor& w, int64_t ways,
                               const at::Tensor& buffer) {
  const int64_t batch = u.size(0), depth = u.size(1) / ways;
  const at::Tensor a = u.view({batch, ways, depth}).transpose(0, 1);  // (ways, B, depth), rows of U strided
  const at::Tensor b = w.view({ways, depth, w.size(1)});
  at::Tensor out = acc.narrow(0, 0, ways);
  if (u.scalar_type() == at::kFloat) {
    if (ways == 1) {
      out.select(0, 0).addmm_(u, w);
    } else {
      out.baddbmm_(a, b);
    }
  } else if (!buffer.defined()) {
    at::baddbmm_out(out, out, a, b, at::kFloat);
  } else {
    at::Tensor products = buffer.narrow(0, 0, ways);
    if (ways == 1) {
      product(products.select(0, 0), u, w);
    } else {
      at::bmm_out(products, a, b);
    }
    out.add_(products);
  }
}

// S = X W_chunkᵀ (B × chunk rows) in the worker's dots buffer.
template <class Device>
at::Tensor cosine_products(const at::Tensor& xg, const at::Tensor& wg, Workspace<Device>& ws) {
  at::Tensor s = front(ws.products, xg.size(0), wg.size(0));
  product(s, xg, wg.t());
  return s;
}

// The per-row data of a call for its row passes; q the inverse norms of x.
inline Rows forward_rows_data(const Call& call, const at::Tensor& q) {
  const bool ruled = given(call.rule_threshold);
  return Rows{q.data_ptr<float>(),
              call.y.data_ptr<int64_t>(),
              call.target_logit.data_ptr<float>(),
              nullptr,
              nullptr,
              nullptr,
              nullptr,
              nullptr,
              NegativesRule{ruled ? call.rule_threshold->data_ptr<float>() : nullptr,
                            ruled ? call.rule_offset->data_ptr<float>() : nullptr,
                            static_cast<float>(call.rule_quadratic)},
              static_cast<float>(call.scale),
              static_cast<float>(call.label_smoothing),
              static_cast<float>(call.label_smoothing / static_cast<double>(call.num_classes)),
              call.ignore_index,
              call.subcenters};
}

inline Rows backward_rows_data(const Call& call, const at::Tensor& q) {
  Rows rows = forward_rows_data(call, q);
  rows.target_slope = call.target_slope.data_ptr<float>();
  rows.row_max = call.row_max.data_ptr<float>();
  rows.log_sumexp = call.log_sumexp.data_ptr<float>();
  rows.upstream = call.upstream.data_ptr<float>();
  rows.lift = given(call.lift) ? call.lift->data_ptr<float>() : nullptr;
  return rows;
}

// x as a GEMM operand (xg), and its inverse norms q: the call's inv_x where given (the forward's,
// kept for the backward), else computed.
struct Embeddings {
  at::Tensor xg, q;
};

template <class Device>
Embeddings embeddings(const Call& call, const GemmTypes& types) {
  const at::Tensor xg = call.x.scalar_type() == types.operand ? call.x : call.x.to(types.operand);
  if (given(call.inv_x)) return Embeddings{xg, *call.inv_x};
  Embeddings e{xg, at::empty({call.x.size(0)}, call.x.options().dtype(at::kFloat))};
  Device::inverse_norms(e.xg, e.q);
  return e;
}

// The five (splits, B) partials, each split starting as the empty range's.
inline Partials empty_partials(int64_t splits, const Geometry& g, const at::TensorOptions& options) {
  const at::TensorOptions f32 = options.dtype(at::kFloat);
  const float inf = std::numeric_limits<float>::infinity();
  return Partials{at::full({splits, g.batch}, -inf, f32), at::full({splits, g.batch}, 0.0f, f32),
                  at::full({splits, g.batch}, 0.0f, f32), at::full({splits, g.batch}, -inf, f32),
                  at::full({splits, g.batch}, g.class_start, options.dtype(at::kLong))};
}

inline SplitPartials split_row(const Partials& p, int64_t split, int64_t batch) {
  return SplitPartials{std::get<0>(p).data_ptr<float>() + split * batch,
                       std::get<1>(p).data_ptr<float>() + split * batch,
                       std::get<2>(p).data_ptr<float>() + split * batch,
                       std::get<3>(p).data_ptr<float>() + split * batch,
                       std::get<4>(p).data_ptr<int64_t>() + split * batch};
}

// --- the entry points ----------------------------------------------------------------------------

template <class Device>
ForwardResult forward_partials(const Call& call) {
  check_forward(Device::kForward, Device::kType, call);
  const typename Device::Guard guard(call.x.device());
  const Geometry g(call);
  const GemmTypes types = gemm_types<Device>(call.x.scalar_type());
  const Embeddings emb = embeddings<Device>(call, types);
  const Rows rows = forward_rows_data(call, emb.q);
  const int64_t splits = split_count(g.chunks, Device::concurrency());
  const Partials partials = empty_partials(splits, g, call.x.options());
  const int workers = static_cast<int>(std::min<int64_t>(Device::concurrency(), std::max<int64_t>(splits, 1)));
  std::vector<Workspace<Device>> work = forward_workspaces<Device>(workers, g, types, call.x.options(), false);
  const WeightNorms norms = forward_norms<Device>(call);
  Device::run(splits, workers, [&](int t, int64_t split) {
    Workspace<Device>& ws = work[t];
    const SplitPartials out = split_row(partials, split, g.batch);
    for (int64_t k = first_chunk(split, splits, g.chunks); k < first_chunk(split + 1, splits, g.chunks); ++k) {
      const Chunk chunk = g.chunk(k);
      const ChunkOperand wc = chunk_operand(call, chunk, types, norms, ws);
      Device::forward_rows(rows, cosine_products(emb.xg, wc.w, ws), wc.r, chunk, out, ws.scratch);
    }
  });
  const auto& [max, sumexp, logit_sum, best_cos, best_class] = partials;
  return ForwardResult{max, sumexp, logit_sum, best_cos, best_class, emb.q, norms.r};
}

template <class Device>
Gradients backward(const Call& call, bool need_x, bool need_w) {
  check_backward(Device::kBackward, Device::kType, call);
  const typename Device::Guard guard(call.x.device());
  const at::Tensor grad_x = need_x ? at::empty_like(call.x) : at::Tensor();
  const at::Tensor grad_w = need_w ? Device::empty_like(call.w) : at::Tensor();
  if (!need_x && !need_w) return Gradients{grad_x, grad_w};
  const Geometry g(call);
  const GemmTypes types = gemm_types<Device>(call.x.scalar_type());
  const Embeddings emb = embeddings<Device>(call, types);
  const Rows rows = backward_rows_data(call, emb.q);
  const float* unlift = rows.lift ? rows.lift + 1 : nullptr;
  const int workers = static_cast<int>(std::min<int64_t>(Device::concurrency(), std::max<int64_t>(g.chunks, 1)));
  const WeightNorms norms = backward_norms<Device>(call);
  std::vector<Workspace<Device>> work =
      backward_workspaces<Device>(workers, g, types, call.x.options(), grad_x, grad_w, !norms.filled);
  Device::run(g.chunks, workers, [&](int t, int64_t k) {
    Workspace<Device>& ws = work[t];
    const Chunk chunk = g.chunk(k);
    const ChunkOperand wc = chunk_operand(call, chunk, types, norms, ws);
    const at::Tensor u = front(ws.gradients, g.batch, chunk.rows);
    Device::gradient_rows(rows, cosine_products(emb.xg, wc.w, ws), u, wc.r, chunk, ws.scratch);
    if (need_x) add_split_products(ws.dx, u, wc.w, depth_splits(chunk.rows, g.dx_splits), ws.dx_chunk);
    if (need_w) {  // H_chunk = Uᵀ X, projected into the chunk's rows of dW
      const at::Tensor out = grad_w.narrow(0, chunk.row0, chunk.rows);
      const at::Tensor h = front(ws.dw_rows, chunk.rows, g.dim);
      product(h, u.t(), emb.xg);
      Device::project_rows(h, wc.w, wc.r, unlift, out);
    }
  });
  if (need_x) {  // A: the accumulators added in worker and split order, then projected (·2^-k where lifted)
    const at::Tensor dx = work[0].dx.select(0, 0);
    for (int t = 0; t < workers; ++t) {
      for (int64_t split = t == 0 ? 1 : 0; split < g.dx_splits; ++split) dx.add_(work[t].dx.select(0, split));
    }
    Device::project_rows(dx, emb.xg, emb.q, unlift, grad_x);
  }
  return Gradients{grad_x, grad_w};
}

}  // namespace marginfused
