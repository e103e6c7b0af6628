"""How many classes the chunked `cuda` backend takes per chunk, pass by pass (docs/design.md §5).

Per chunk of n classes the backend runs, forward, one GEMM S = X·W_chunkᵀ (B×D by D×n) and one
elementwise pass over the B×n tile; backward, S again, dX̂ += U·W_chunk (B×n by n×D) and
H = Uᵀ·X (n×B by B×D), and elementwise kernels over the B×n tile. Each pass takes its own chunk
(the extension's Call carries one per call), chosen for two things:

- **Fill the GPU** (backward). The dX GEMM has only ⌈B/128⌉·⌈D/128⌉ output tiles of 128×128 (32 at
  B = 1024, D = 512: a quarter of an H100's 132 SMs), so it must split its K = n over
  ⌊SMs / tiles⌋ ways (4 there) to put every SM to work, each split at least SPLIT_K_DEPTH classes
  deep so that its main loop outweighs its prologue and epilogue. That sets the smallest backward
  chunk worth taking. The forward has no such GEMM: its S GEMM has ⌈B/128⌉·⌈n/128⌉ output tiles.
- **Stay in L2.** Between the GEMM that writes a tile and the kernels that read it, the chunk's
  working set should stay in L2: at most L2_SHARE of it. Backward: the B×n tile in the input dtype,
  the n×D chunk of W and the n×D float32 product H before its projection. Forward: the B×n tile S
  (in S's dtype: bfloat16 for bfloat16 inputs, float32 otherwise, csrc/cuda.cu) and the n×D chunk
  of W; no H, so more classes fit (12800 instead of 7680 at B = 1024, D = 512, bfloat16 on an H100).

The backward's chunk is the larger of the two (filling the GPU wins where they disagree: at small
batches the tile is small anyway), the forward's its working set's; both in whole GEMM tiles of 128
classes. Pure functions of the GPU's shape, so that bench/model and the backend size chunks the
same way.
"""

from __future__ import annotations

from typing import NamedTuple

GEMM_TILE = 128
"""Rows and columns of a GEMM output tile (cuBLAS's Hopper and Ampere kernels use 128 or 256)."""
SPLIT_K_DEPTH = 1024
"""Classes of K each split of the dX GEMM takes at least: 16 main-loop steps of 64."""
L2_SHARE = 0.75
"""The share of L2 a chunk's working set may take (the rest: x, the partials, whatever else is live)."""
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


class GpuShape(NamedTuple):
    """What the chunk size depends on: streaming multiprocessors and L2 bytes."""

    sms: int
    l2_bytes: int


def _element_bytes(dtype) -> int:
    """Bytes per element of a dtype given by name ("bf16", "float32") or as a torch.dtype."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    return ELEMENT_BYTES[str(dtype).removeprefix("torch.")]


def dx_split_ways(gpu: GpuShape, batch: int, dim: int) -> int:
    """Ways the dX GEMM's K is split so that its output tiles times the splits fill one wave of SMs."""
    tiles = -(-batch // GEMM_TILE) * -(-dim // GEMM_TILE)
    return max(1, gpu.sms // tiles)


def cuda_dx_splits(gpu: GpuShape, batch: int, dim: int, chunk: int) -> int:
    """Ways the `cuda` backend's dX GEMM splits the depth of a chunk of `chunk` classes: enough to
    fill the SMs (dx_split_ways), each split at least SPLIT_K_DEPTH classes deep, and a divisor of
    the chunk, since csrc/driver.h splits a chunk's depth evenly (a last, shorter chunk takes the
    most of these ways that divide it)."""
    ways = max(1, min(dx_split_ways(gpu, batch, dim), chunk // SPLIT_K_DEPTH))
    while chunk % ways:
        ways -= 1
    return ways


def cuda_chunk_classes(gpu: GpuShape, batch: int, dim: int, dtype) -> int:
    """Classes per chunk for the `cuda` backend's backward: enough that the dX GEMM fills every SM (split K,
    each split SPLIT_K_DEPTH deep), and otherwise as many as keep the chunk's working set within
    L2_SHARE of L2; a multiple of GEMM_TILE, at least one tile. Non-increasing in batch and dim,
    non-decreasing in SMs and L2."""
    e = _element_bytes(dtype)
    fill = dx_split_ways(gpu, batch, dim) * SPLIT_K_DEPTH
    per_class = batch * e + dim * e + dim * 4  # its column of the tile, its row of W, its row of H
    fits = int(L2_SHARE * gpu.l2_bytes) // per_class
    return max(GEMM_TILE, max(fill, fits) // GEMM_TILE * GEMM_TILE)


def _dots_bytes(dtype) -> int:
    """Bytes per element of the `cuda` backend's S for inputs of `dtype`: bfloat16 for bfloat16, else
    float32 (float16's range cannot hold every raw dot product)."""
    return 2 if str(dtype).removeprefix("torch.") in ("bf16", "bfloat16") else 4


def cuda_forward_chunk_classes(gpu: GpuShape, batch: int, dim: int, dtype) -> int:
    """Classes per chunk for the `cuda` backend's forward: as many as keep its working set, the B×n
    tile S and the chunk's n×D rows of W, within L2_SHARE of L2; a multiple of GEMM_TILE, at least
    one tile. For bfloat16 and float32 inputs at least the backward's chunk wherever that one is sized
    by L2 alone (the same tile, no H); non-increasing in batch and dim, non-decreasing in L2,
    independent of the SMs."""
    per_class = batch * _dots_bytes(dtype) + dim * _element_bytes(dtype)  # its column of S, its row of W
    fits = int(L2_SHARE * gpu.l2_bytes) // per_class
    return max(GEMM_TILE, fits // GEMM_TILE * GEMM_TILE)
