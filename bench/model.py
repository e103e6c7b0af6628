"""The performance model as code: what each kernel of the fused backends must move and compute,
and the time that predicts on a given GPU. Every figure here is a PREDICTION from datasheet
numbers and counted work, never a measurement; `python -m bench` measures.

    python -m bench.model [--gpu H100] [--batch 1024] [--dim 512] [--classes 100000 1000000 4000000] [--dtype bf16]

Counting (docs/design.md §5), for B rows, C classes, D dims, e bytes per input element:

- FLOPs: each cosine GEMM is 2·B·C·D. `cuda`: forward 1, backward 3 (recompute, dX, dW).
  `triton` (docs/design.md §3.2, every output written once by its owner): forward 1; each of its
  two backward kernels recomputes the cosines once per slice of D (BLOCK_G wide) and runs one
  gradient GEMM, so 2·(⌈D/BLOCK_G⌉ + 1): 4 at D ≤ BLOCK_G, 6 at D = 2·BLOCK_G.
- HBM bytes: what must leave or enter the GPU's memory (W once per pass when the tiles that
  share it run together and L2 serves the rest; B×chunk tiles that outgrow L2).
- L2 bytes: each tile's operands, re-read by every program that needs them (a program holds its
  accumulator in registers, its operand tiles only while it uses them).

A kernel's predicted time is the largest of FLOPs / (peak × MATMUL_EFFICIENCY), HBM bytes / HBM
bandwidth and L2 bytes / L2 bandwidth. The efficiency and the L2 bandwidth are assumptions to be
replaced by measured rates.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Gpu:
    """Datasheet numbers (dense tensor-core rates)."""

    name: str
    bf16_tflops: float
    fp32_tflops: float  # without tensor cores
    hbm_tbps: float
    l2_tbps: float  # aggregate L2 bandwidth (not on the datasheet: a widely quoted estimate)
    l2_mb: float
    sms: int


GPUS = {
    "H100": Gpu("H100 SXM", 989.0, 67.0, 3.35, 10.0, 50.0, 132),
    "H200": Gpu("H200 SXM", 989.0, 67.0, 4.8, 10.0, 50.0, 132),
    "A100": Gpu("A100 SXM 80GB", 312.0, 19.5, 2.04, 5.0, 40.0, 108),
}

def gpu_named(device_name: str) -> Optional[str]:
    """The key in GPUS of the GPU whose name `device_name` contains ("NVIDIA H100 80GB HBM3" is
    "H100"), or None."""
    return next((key for key in GPUS if key in device_name), None)


MATMUL_EFFICIENCY = 0.8
"""Fraction of the datasheet matmul rate a large GEMM reaches (assumed; 790/989 was measured on
an H200 for bf16, docs/design.md §5)."""
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Kernel:
    """One kernel's counted work and its predicted time on a GPU."""

    backend: str
    name: str
    flops: float
    hbm_bytes: float
    l2_bytes: float

    def seconds(self, gpu: Gpu, dtype: str) -> float:
        peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12 * MATMUL_EFFICIENCY
        return max(
            self.flops / peak,
            self.hbm_bytes / (gpu.hbm_tbps * 1e12),
            self.l2_bytes / (gpu.l2_tbps * 1e12),
        )


def triton_kernels(batch: int, classes: int, dim: int, dtype: str, forward_tile: tuple = (128, 64),
                   row_tile: tuple = (64, 64), class_tile: tuple = (32, 64), block_g: int = 256) -> list[Kernel]:
    """The `triton` backend as built: norms pre-pass, forward, and the owned-output backward: dX
    by (batch tile, class split, D slice) programs, dW by (class tile, D slice) programs, no
    atomics. Tiles are (BLOCK_B, BLOCK_C) of kernels/configs.py's Hopper 16-bit configurations."""
    e = BYTES[dtype]
    gemm = 2.0 * batch * classes * dim
    w_bytes, x_bytes = classes * dim * e, batch * dim * e
    passes = math.ceil(dim / block_g) + 1  # cosine recomputes, one per slice, and the gradient GEMM

    def operand_traffic(tile: tuple, passes: int) -> float:
        """L2 bytes of a kernel whose (BLOCK_B × BLOCK_C) programs each read their x and W tiles
        `passes` times: every W tile once per batch tile, every x tile once per class tile."""
        block_b, block_c = tile
        return passes * (math.ceil(batch / block_b) * w_bytes + math.ceil(classes / block_c) * x_bytes)

    return [
        Kernel("triton", "norms (x, W)", 0.0, w_bytes + x_bytes, 0.0),
        Kernel("triton", "forward", gemm, w_bytes + x_bytes, operand_traffic(forward_tile, 1)),
        Kernel("triton", "norms again (backward)", 0.0, w_bytes + x_bytes, 0.0),
        Kernel("triton", "backward dX (row tiles)", passes * gemm, w_bytes, operand_traffic(row_tile, passes)),
        Kernel("triton", "backward dW (class tiles)", passes * gemm, 2 * w_bytes, operand_traffic(class_tile, passes)),
    ]


def cuda_kernels(batch: int, classes: int, dim: int, dtype: str, l2_mb: float = 50.0,
                 tile_bytes: float = 0.0) -> list[Kernel]:
    """The chunked `cuda` backend: per chunk of n = tile_bytes / (4B) classes, cuBLAS GEMMs
    through ATen and elementwise kernels over the B×n float32 tile, which goes to HBM when it
    outgrows L2 (the backend sizes it to a third of L2: tile_bytes 0 means that)."""
    tile_bytes = tile_bytes or l2_mb * 2**20 / 3
    e = BYTES[dtype]
    gemm = 2.0 * batch * classes * dim
    w_bytes = classes * dim * e
    tile_total = 4.0 * batch * classes  # every chunk's float32 tile, once
    spills = tile_bytes > l2_mb * 2**20
    tile_hbm = tile_total if spills else 0.0
    return [
        Kernel("cuda", "forward GEMMs", gemm, w_bytes + tile_hbm, 0.0),
        Kernel("cuda", "forward row pass", 0.0, tile_hbm, tile_total),
        Kernel("cuda", "backward GEMM recompute", gemm, w_bytes + tile_hbm, 0.0),
        Kernel("cuda", "backward gradient tile", 0.0, tile_hbm + (tile_hbm * e / 4), tile_total * (1 + e / 4)),
        Kernel("cuda", "backward dX, dW GEMMs", 2 * gemm, 2 * w_bytes + 2 * tile_hbm * e / 4 + classes * dim * 4, 0.0),
        Kernel("cuda", "project dW", 0.0, classes * dim * (4 + e + e), 0.0),
    ]


def predict(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> dict[str, tuple[float, list]]:
    """Predicted forward+backward seconds per backend, with each kernel's (name, seconds)."""
    out = {}
    for backend, kernels in (("triton", triton_kernels(batch, classes, dim, dtype)),
                             ("cuda", cuda_kernels(batch, classes, dim, dtype, l2_mb=gpu.l2_mb))):
        times = [(k.name, k.seconds(gpu, dtype)) for k in kernels]
        out[backend] = (sum(t for _, t in times), times)
    return out


def floor_seconds(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> float:
    """8·B·C·D at the assumed matmul rate: the time four GEMMs take at best."""
    peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12 * MATMUL_EFFICIENCY
    return 8.0 * batch * classes * dim / peak


def table(gpu_name: str, batch: int, dim: int, classes: list[int], dtype: str) -> str:
    gpu = GPUS[gpu_name]
    lines = [f"PREDICTED (bench/model.py, not measured): {gpu.name}, {dtype}, B={batch}, D={dim}; "
             f"matmul at {MATMUL_EFFICIENCY:.0%} of {gpu.bf16_tflops if dtype != 'fp32' else gpu.fp32_tflops:g} "
             f"TFLOP/s, HBM {gpu.hbm_tbps} TB/s, L2 {gpu.l2_tbps} TB/s (assumed)",
             "| C | backend | predicted fwd+bwd ms | 8BCD floor ms | largest kernel |",
             "|---|---|---|---|---|"]
    for c in classes:
        floor = floor_seconds(gpu, batch, c, dim, dtype) * 1e3
        for backend, (total, kernels) in predict(gpu, batch, c, dim, dtype).items():
            name, worst = max(kernels, key=lambda item: item[1])
            lines.append(f"| {c} | {backend} | {total * 1e3:.2f} | {floor:.2f} | {name} {worst * 1e3:.2f} ms |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H100", choices=list(GPUS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--dtype", default="bf16", choices=list(BYTES))
    args = parser.parse_args(argv)
    print(table(args.gpu, args.batch, args.dim, args.classes, args.dtype))


if __name__ == "__main__":
    main()
