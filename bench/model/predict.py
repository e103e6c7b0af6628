"""Predictions: each backend's kernels summed on a GPU, the assumptions they rest on, and the tables
`python -m bench.model` prints."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Optional

from .. import sass
from .cuda import cuda_kernels
from .gpus import (BYTES, ELEMENTWISE_INSTRUCTIONS, GEMM_TILE, GPUS, HOST_LAUNCH_S, LAUNCH_GAP_S,
                   MATMUL_EFFICIENCY, Gpu)
from .kernel import Kernel
from .triton import flash_kernels, sass_sources


@dataclass
class Prediction:
    """A backend's predicted forward + backward: its kernels, and what bounds it as a whole."""

    backend: str
    kernels: list[Kernel]
    host_s: float = 0.0  # launches × HOST_LAUNCH_S where no CUDA graph holds the loop
    counts: str = ""

    @property
    def device_s(self) -> float:
        return sum(kernel.seconds for kernel in self.kernels)

    @property
    def seconds(self) -> float:
        return max(self.device_s, self.host_s)

    @property
    def binds(self) -> str:
        if self.host_s > self.device_s:
            return "host launches"
        by_term: dict[str, float] = {}
        for kernel in self.kernels:
            by_term[kernel.binds] = by_term.get(kernel.binds, 0.0) + kernel.seconds
        return ", ".join(f"{term} {seconds / self.device_s:.0%}"
                         for term, seconds in sorted(by_term.items(), key=lambda item: -item[1]))


def load_counts(refresh: bool = False) -> tuple[dict, str]:
    """The SASS counts and a sentence saying where they come from: bench/sass_counts.json, or a
    fresh compile (refresh; needs Triton, else the cached counts are used, saying so)."""
    if refresh:
        try:
            import triton  # noqa: F401
        except ImportError:
            refresh = False
            note = "Triton is not installed: the cached counts are used. "
        else:
            sass.refresh(sass_sources())
            note = "recompiled now. "
    else:
        note = ""
    counts = sass.load()
    if not counts:
        raise FileNotFoundError("bench/sass_counts.json is missing: run python -m bench.model --from-sass")
    return counts, (f"{note}Instruction counts: {sass.CACHE.name}, a read of compiled code (Triton "
                    f"{counts['triton']}, {counts['dtype']}, read {counts['date'][:10]}), not a measurement.")


def predict_backends(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str,
                     counts: Optional[dict] = None) -> dict[str, Prediction]:
    """Every backend's prediction: `triton` (flash), `cuda` (tuned), and `cuda-as-built`."""
    counts = counts if counts is not None else load_counts()[0]
    if dtype == "fp32":  # no tensor cores (the kernels' fp32 dots are IEEE); the counts stay the 16-bit kernels'
        gpu = replace(gpu, bf16_tflops=gpu.fp32_tflops)
    out = {"triton": Prediction("triton", flash_kernels(gpu, batch, classes, dim, dtype, counts))}
    tuned = cuda_kernels(gpu, batch, classes, dim, dtype, tuned=True)
    out["cuda"] = Prediction("cuda", tuned)
    built = cuda_kernels(gpu, batch, classes, dim, dtype, tuned=False)
    out["cuda-as-built"] = Prediction("cuda-as-built", built, sum(k.launches for k in built) * HOST_LAUNCH_S)
    return out


AS_BUILT = {"triton": "triton", "cuda": "cuda-as-built"}
"""The prediction of the code as built, by the provider bench/session.py times."""


def predict(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> dict[str, tuple[float, list]]:
    """Predicted forward+backward seconds per backend, with each kernel's (name, seconds)."""
    return {name: (p.seconds, [(k.name, k.seconds) for k in p.kernels])
            for name, p in predict_backends(gpu, batch, classes, dim, dtype).items()}


def floor_seconds(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> float:
    """8·B·C·D at the assumed matmul rate: the time four GEMMs take at best."""
    peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12 * MATMUL_EFFICIENCY
    return 8.0 * batch * classes * dim / peak


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def assumptions(gpu: Gpu, dtype: str) -> list[str]:
    """Each assumption of a prediction, with its source, as printed above the tables."""
    peak = gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops
    l2_source = "published microbenchmark figures, low end" if gpu.arch >= 90 else "assumed: see bench/model"
    matrix = (f"wgmma m64nNk16: N/2 cycles on an SM's tensor cores ({gpu.tensor_flops_per_clock:.0f} FLOP/cycle/SM), "
              f"its shared-memory operands at {gpu.shared_bytes_per_clock} B/cycle (A 2 KB re-read per SS wgmma, B "
              f"N·32 B): m64n16 SS 40%, m64n32 SS 67%, N ≥ 64 full rate" if gpu.arch >= 90 else
              "mma.sync m16n8k16 at full rate (operands from registers; their shared-memory loads are instructions)")
    return [
        f"matmul at MATMUL_EFFICIENCY = {MATMUL_EFFICIENCY:.0%} of {peak:g} TFLOP/s (790/989 measured on an H200, "
        f"docs/design.md §5)",
        f"HBM {gpu.hbm_tbps} TB/s (datasheet); L2 {gpu.l2_tbps} TB/s ({l2_source})",
        f"issue: {gpu.schedulers} schedulers × 1 warp instruction per cycle per SM at the {gpu.clock_ghz} GHz boost "
        f"clock (every cycle issues: optimistic)",
        matrix,
        "one program per SM: the phases of an iteration run one after another (serial)",
        f"launch gap {LAUNCH_GAP_S * 1e6:.0f} µs per kernel on the device; {HOST_LAUNCH_S * 1e6:.0f} µs of host time "
        f"per launch without a CUDA graph",
        f"cuda elementwise kernels: {ELEMENTWISE_INSTRUCTIONS} instructions per element (assumed); GEMMs in "
        f"{GEMM_TILE}×{GEMM_TILE} output tiles over {gpu.sms} SMs",
    ]


def table(gpu_name: str, batch: int, dim: int, classes: list[int], dtype: str, refresh: bool = False,
          kernels: bool = True) -> str:
    gpu = GPUS[gpu_name]
    counts, source = load_counts(refresh)
    lines = [f"PREDICTED (bench/model, not measured): {gpu.name}, {dtype}, B={batch}, D={dim}. "
             f"triton: the flash kernels; "
             f"cuda: the chunked backend as tuned; cuda-as-built: csrc/cuda.cu as it is.",
             "Assumed: " + "; ".join(assumptions(gpu, dtype)) + ".",
             source, "",
             "| C | backend | predicted ms | 8BCD floor ms | FLOP ms | HBM ms | L2 ms | issue ms | serial ms "
             "| launch ms | binds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = ["", "PREDICTED per kernel: each kernel's time is the largest of its terms plus its launch gaps; "
              "FLOP at its MMA shapes' efficiency (shape, SS/RS, % of the tensor rate).", "",
              "| C | backend | predicted ms | kernel | binds | FLOP ms | HBM ms | L2 ms | issue ms | serial ms "
              "| launch ms | MMA shapes | counts |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in classes:
        floor = floor_seconds(gpu, batch, c, dim, dtype)
        for name, p in predict_backends(gpu, batch, c, dim, dtype, counts).items():
            def total(attribute: str) -> Optional[float]:
                values = [getattr(k, attribute) for k in p.kernels if getattr(k, attribute) is not None]
                return sum(values) if values else None

            lines.append(f"| {c} | {name} | {_ms(p.seconds)} | {_ms(floor)} | {_ms(total('flop_s'))} "
                         f"| {_ms(total('hbm_s'))} | {_ms(total('l2_s'))} | {_ms(total('issue_s'))} "
                         f"| {_ms(total('serial_s'))} | {_ms(total('launch_s'))} | {p.binds} |")
            for k in p.kernels:
                detail.append(f"| {c} | {name} | {_ms(k.seconds)} | {k.name} | {k.binds} | {_ms(k.flop_s)} "
                              f"| {_ms(k.hbm_s)} | {_ms(k.l2_s)} | {_ms(k.issue_s)} | {_ms(k.serial_s)} "
                              f"| {_ms(k.launch_s)} | {k.shapes or '-'} | {k.counts or '-'} |")
    lines.append("(each term column: the sum over the backend's kernels; a kernel's time is its largest term, so the "
                 "predicted time is not the largest sum)")
    return "\n".join(lines + (detail if kernels else []))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model",
                                     description="The performance model's predictions (never measurements).")
    parser.add_argument("--gpu", default="H100", choices=list(GPUS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--dtype", default="bf16", choices=list(BYTES))
    parser.add_argument("--from-sass", action="store_true",
                        help="recompile the kernels the model reads and rewrite bench/sass_counts.json (needs Triton)")
    parser.add_argument("--no-kernels", action="store_true", help="the summary table only")
    args = parser.parse_args(argv)
    print(table(args.gpu, args.batch, args.dim, args.classes, args.dtype, args.from_sass, not args.no_kernels))
