"""Microbenchmarks of the device at hand, the rates bench/model assumes: the dense matmul rate
(square GEMMs, and the `cuda` backend's GEMMs at its chunk shape) and memory bandwidth (a buffer
that fits in L2 read many times over, against a read and a copy far larger than L2, which HBM
serves).

The `cuda` backend walks the classes in chunks of n = chunk_size(device, B, D, dtype) rows of W
(marginfused/backends/extension.py) and per chunk runs three GEMMs through ATen (csrc/driver.h):
S = X·W_chunkᵀ (B×D by D×n, in the inputs' 16-bit dtype), A = U·W_chunk (B×n by n×D, one batched
GEMM over the dx_splits(device, B, D, n) splits of its depth, float32 results) and H = Uᵀ·X (n×B by
B×D, float32 result, dW_chunk), with 16-bit operands. Each is timed here over a walk through the
chunks of a W larger than L2, as the backend reads them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from marginfused.backends.extension import chunk_size, dx_splits

from .timing import median_ms

CHUNKS = 16
"""Chunks of W walked per timed GEMM pass (at B = 1024 on an H100: 16 × 7680 × 512 bf16 = 126 MB)."""


def _random(shape: tuple, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """The rate of an n×n×n GEMM on random data (median of repeated products)."""
    a, b = _random((n, n), dtype, device, 1), _random((n, n), dtype, device, 2)
    seconds = median_ms(lambda: a @ b, device, repeats=6) / 1e3
    return 2 * n**3 / seconds / 1e12


def _each(run: Callable[[Any], object], items: Sequence) -> Callable[[], None]:
    """One call that runs `run` on each item in turn (keeping none of its results)."""

    def each() -> None:
        for item in items:
            run(item)

    return each


def _gemm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b (matrices or batches of them) with a float32 result, as the backend asks of cuBLAS (a
    16-bit result on the CPU, which has no mixed-output GEMM)."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)
    return a @ b


def chunk_gemm_tflops(device: torch.device, dtype: torch.dtype, batch: int, dim: int) -> dict[str, float]:
    """TFLOP/s of each of the `cuda` backend's three GEMMs at its chunk shape on this device."""
    n = chunk_size(device, batch, dim, dtype)
    ways = dx_splits(device, batch, dim, n)
    x = _random((batch, dim), dtype, device, 3)
    w = _random((CHUNKS * n, dim), dtype, device, 4)
    u = _random((batch, n), dtype, device, 5)
    u_split = u.view(batch, ways, n // ways).transpose(0, 1)
    chunks = w.split(n)
    gemms = {
        f"S = X·W_chunkᵀ ({batch}×{dim} by {dim}×{n})": lambda c: x @ c.t(),
        f"A = U·W_chunk ({ways} × {batch}×{n // ways} by {n // ways}×{dim})":
            lambda c: _gemm(u_split, c.view(ways, n // ways, dim)),
        f"H = Uᵀ·X ({n}×{batch} by {batch}×{dim})": lambda c: _gemm(u.t(), x),
    }
    rates = {}
    for name, gemm in gemms.items():
        seconds = median_ms(_each(gemm, chunks), device, repeats=5) / 1e3
        rates[name] = CHUNKS * 2.0 * batch * n * dim / seconds / 1e12
    return rates


def reread_gbs(device: torch.device, nbytes: int, times: int) -> float:
    """GB/s of reading a float32 buffer of `nbytes` `times` over in one kernel: the row sums of a
    (times, n) view whose rows are all the buffer (stride 0), each row read afresh from wherever
    the buffer lives (L2, for one that fits in it; one kernel, so no launch gaps between reads)."""
    source = _random((nbytes // 4,), torch.float32, device, 6)
    rows = source.expand(times, -1)
    seconds = median_ms(lambda: rows.sum(dim=1), device, repeats=5) / 1e3
    return times * nbytes / seconds / 1e9


def copy_gbs(device: torch.device, nbytes: int) -> float:
    """GB/s of copying a float32 buffer of `nbytes` into another, bytes read plus bytes written."""
    source = _random((nbytes // 4,), torch.float32, device, 7)
    target = torch.empty_like(source)
    seconds = median_ms(lambda: target.copy_(source), device, repeats=5) / 1e3
    return 2 * nbytes / seconds / 1e9
