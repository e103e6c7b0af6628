"""The chunked `cuda` backend's kernels and cuBLAS GEMMs, counted from csrc/driver.h and csrc/cuda.cu,
as built and as it would be tuned."""

from __future__ import annotations

from marginfused.backends.chunks import GpuShape, cuda_chunk_classes, cuda_dx_splits, cuda_forward_chunk_classes

from .gpus import BYTES, ELEMENTWISE_INSTRUCTIONS, GEMM_TILE, LAUNCH_GAP_S, MATMUL_EFFICIENCY, Gpu, cdiv
from .kernel import Kernel, _bytes_terms, memory_kernel


def gemm_fill(gpu: Gpu, m: int, n: int, splits: int = 1) -> float:
    """The share of the SMs' time a GEMM's output tiles (GEMM_TILE², times its split-K ways) keep busy
    over whole waves."""
    tiles = cdiv(m, GEMM_TILE) * cdiv(n, GEMM_TILE) * splits
    return tiles / (cdiv(tiles, gpu.sms) * gpu.sms)


def gemm_kernel(gpu: Gpu, backend: str, name: str, flops: float, fill: float, hbm_bytes: float, l2_bytes: float,
                launches: int, shapes: str) -> Kernel:
    """cuBLAS GEMMs: FLOPs at MATMUL_EFFICIENCY of peak times the fill of their waves (the operand
    traffic of a tuned GEMM is in that measured rate, so L2 counts only what is written)."""
    flop_s = flops / (gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY * fill)
    hbm_s, l2_s = _bytes_terms(gpu, hbm_bytes, l2_bytes)
    return Kernel(backend, name, flops, hbm_bytes, l2_bytes, flop_s, hbm_s, l2_s, None, None, launches,
                  launches * LAUNCH_GAP_S, shapes)


def cuda_kernels(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str, tuned: bool = True) -> list[Kernel]:
    """The chunked `cuda` backend: per chunk of n classes, the cosine GEMM S = X·W_chunkᵀ, the row
    pass (forward); the cosine GEMM again, the gradient tile U, dX̂ += U·W_chunk (one batched GEMM
    split over its depth into fp32 accumulators), H = Uᵀ·X and its projection into dW (backward).

    Both: each pass its own chunk, the forward's n_f = cuda_forward_chunk_classes (its tile and W rows
    within L2), the backward's n = cuda_chunk_classes and its dX splits cuda_dx_splits
    (marginfused/backends/chunks.py, passed to the extension); the row passes one kernel each; U
    written over S where both have the input dtype. As built (csrc/cuda.cu, csrc/driver.h): S in
    bfloat16 for bfloat16 inputs, in fp32 for float16 (U in float16 beside it) and fp32; the inverse
    norms of x and of all of W in two launches at the start of the forward, kept for the backward
    (one pass over W); per chunk 2 launches forward and 5 backward; the split accumulators added
    after the last chunk; no CUDA graph, so the host's launches bound the step where they outlast the
    GPU. Tuned: S in the input dtype for every dtype, the chunk loop in a CUDA graph."""
    e = BYTES[dtype]
    backend = "cuda" if tuned else "cuda-as-built"
    gpu_shape = GpuShape(gpu.sms, gpu.l2_bytes)
    n = min(cuda_chunk_classes(gpu_shape, batch, dim, dtype), classes)
    chunks = cdiv(classes, n)
    n_f = min(cuda_forward_chunk_classes(gpu_shape, batch, dim, dtype), classes)
    chunks_f = cdiv(classes, n_f)
    splits = cuda_dx_splits(gpu_shape, batch, dim, n)
    s_bytes = e if tuned or dtype != "fp16" else 4
    u_beside = s_bytes != e  # U in its own buffer, not over S
    working = batch * (s_bytes + (e if u_beside else 0)) + dim * e + dim * 4
    in_l2 = n * working <= gpu.l2_bytes  # the chunk's tiles, W rows and H stay in L2 between kernels
    in_l2_f = n_f * (batch * s_bytes + dim * e) <= gpu.l2_bytes  # the forward's: its tile and W rows
    gemm = 2.0 * batch * classes * dim
    x_bytes, w_bytes = batch * dim * e, classes * dim * e
    s_total, u_total = batch * classes * s_bytes, batch * classes * e  # every chunk's tile, once
    h_total = classes * dim * 4
    spill = 0.0 if in_l2 else 1.0  # tiles through HBM when the chunk outgrows L2
    spill_f = 0.0 if in_l2_f else 1.0
    elements = batch * classes / 32  # warp instructions per instruction per element
    where = (f"forward n = {n_f} classes, {chunks_f} chunks, tiles {'in L2' if in_l2_f else 'through HBM'}; "
             f"backward n = {n} classes, {chunks} chunks, tiles {'in L2' if in_l2 else 'through HBM'}")
    norms = memory_kernel(gpu, backend, f"norms of x and W, once, kept ({where})", w_bytes + x_bytes, 0.0, 2)

    kernels = [
        norms,
        gemm_kernel(gpu, backend, "forward S = X·Wᵀ GEMMs", gemm, gemm_fill(gpu, batch, n_f), spill_f * s_total,
                    s_total, chunks_f, f"{batch}×{n_f}×{dim}"),
        memory_kernel(gpu, backend, "forward row pass", spill_f * s_total, s_total, chunks_f,
                      elements * ELEMENTWISE_INSTRUCTIONS),
        gemm_kernel(gpu, backend, "backward S GEMMs (recompute)", gemm, gemm_fill(gpu, batch, n),
                    w_bytes + spill * s_total, s_total, chunks, f"{batch}×{n}×{dim}"),
        memory_kernel(gpu, backend, "backward gradient tile U", spill * (s_total + u_total), s_total + u_total,
                      chunks, elements * ELEMENTWISE_INSTRUCTIONS),
    ]
    partials = chunks * 2 * splits * batch * dim * 4  # each split's fp32 accumulator, read and written
    kernels.append(gemm_kernel(gpu, backend, f"backward dX += U·W GEMMs (split-K {splits})", gemm,
                               gemm_fill(gpu, batch, dim, splits), spill * (u_total + w_bytes), partials, chunks,
                               f"{batch}×{dim}×{n // splits} ×{splits}"))
    kernels.append(gemm_kernel(gpu, backend, "backward H = Uᵀ·X GEMMs", gemm, gemm_fill(gpu, n, dim),
                               spill * (u_total + h_total), h_total, chunks, f"{n}×{dim}×{batch}"))
    kernels.append(memory_kernel(gpu, backend, "backward dW projection", w_bytes + spill * (h_total + w_bytes),
                                 h_total + w_bytes, chunks))
    kernels.append(memory_kernel(gpu, backend, "dX: the split accumulators added, projected",
                                 x_bytes * 2 + splits * batch * dim * 4, 0.0, splits))
    return kernels
