"""`python -m bench.triton_gpu`: issue 3's GPU benchmark of the fused Triton backend.

Forward+backward at B=1024, D=512, C ∈ {100k, 1M, 4M} in bf16 for three providers: the `triton`
backend, the `torch` reference (eager) and `torch.compile` of the reference's math. Per provider
and C: the median time (CUDA events, after warm-up), the achieved TFLOP/s counting 8·B·C·D, that
as a % of the bf16 matmul rate measured in the same run, and the peak memory allocated beyond the
inputs and their gradients. Rows are appended to bench/results/triton_gpu.csv with the device,
versions and date. Runs on any device the chosen providers run on (`--device cpu` with
TRITON_INTERPRET=1 and tiny sizes checks the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch

import marginfused as mf
from marginfused.config import LossConfig
from marginfused.reference import TorchBackend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS = os.path.join(os.path.dirname(__file__), "results", "triton_gpu.csv")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.triton_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--margin", default="arcface")
    parser.add_argument("--providers", nargs="+", default=["triton", "torch", "torch.compile"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=RESULTS)
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """The plain matmul rate of this device in this dtype, measured now (4096³, or 512³ on a CPU)."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def make_provider(name: str, margin: str):
    if name == "triton":
        return lambda x, w, y: mf.margin_cross_entropy(x, w, y, margin, backend="triton")
    if name == "torch":
        return lambda x, w, y: mf.margin_cross_entropy(x, w, y, margin, backend="torch")
    if name == "torch.compile":
        config = LossConfig.build(margin, 64.0, "detached", -100, 0.0)
        reference = TorchBackend()
        return torch.compile(lambda x, w, y: reference.per_row_loss(x, w, y, config).loss.mean())
    raise ValueError(f"unknown provider {name!r}")


def peak_extra_bytes(run, x: torch.Tensor, w: torch.Tensor, device: torch.device) -> int:
    """Peak bytes allocated during one forward+backward beyond what was allocated before it and the
    gradients of x and w it must produce."""
    if device.type != "cuda":
        return -1
    gradients = x.numel() * x.element_size() + w.numel() * w.element_size()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before - gradients


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rate = matmul_tflops(device, dtype, args.repeats)
    import triton

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "margin": args.margin,
        "matmul_tflops": f"{rate:.1f}",
    }
    print(f"{device_name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{args.dtype} matmul {rate:.1f} TFLOP/s")
    print(f"{'provider':>14} {'C':>9} {'ms':>9} {'TFLOP/s':>8} {'% mm':>6} {'extra MB':>9}")
    rows = []
    for classes in args.classes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, args.dim, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(classes, args.dim, generator=gen).to(device, dtype).requires_grad_()
        y = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
        flop = 8 * args.batch * classes * args.dim
        for name in args.providers:
            loss_fn = make_provider(name, args.margin)

            def run():
                loss_fn(x, w, y).backward()
                x.grad = None
                w.grad = None

            try:
                ms = median_ms(run, device, args.repeats)
                extra = peak_extra_bytes(run, x, w, device)
            except torch.OutOfMemoryError:
                print(f"{name:>14} {classes:>9} {'OOM':>9}")
                rows.append({**meta, "provider": name, "B": args.batch, "D": args.dim, "C": classes, "ms": "OOM"})
                torch.cuda.empty_cache()
                continue
            tflops = flop / (ms * 1e-3) / 1e12
            print(f"{name:>14} {classes:>9} {ms:9.3f} {tflops:8.1f} {100 * tflops / rate:6.1f} "
                  f"{extra / 2**20:9.1f}")
            rows.append({**meta, "provider": name, "B": args.batch, "D": args.dim, "C": classes,
                         "ms": f"{ms:.4f}", "tflops": f"{tflops:.2f}", "pct_matmul": f"{100 * tflops / rate:.1f}",
                         "extra_mb": f"{extra / 2**20:.1f}"})
        del x, w, y
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fields = ["date", "device", "torch", "triton", "dtype", "margin", "matmul_tflops", "provider", "B", "D", "C",
              "ms", "tflops", "pct_matmul", "extra_mb"]
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
