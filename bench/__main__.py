"""`python -m bench`: forward+backward time and working memory of the loss, per backend and
class count, on whatever device is present. Prints a table.

Working memory is the peak of what PyTorch allocates during forward+backward beyond the inputs
and their gradients: CUDA's allocator statistics on a GPU, `marginfused.memory.AllocationTracker`
on the CPU. Time is the median of `--repeats` runs after two warm-up runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import marginfused as mf
from marginfused.memory import AllocationTracker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--batch", type=int, default=1024 if gpu else 256)
    parser.add_argument("--dim", type=int, default=512 if gpu else 128)
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[100_000, 1_000_000] if gpu else [10_000, 50_000, 100_000]
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if gpu else "fp32")
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--margin", default="arcface")
    parser.add_argument("--repeats", type=int, default=10 if gpu else 3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    return parser.parse_args()


def fwd_bwd(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, margin: str, backend: str) -> None:
    loss = mf.margin_cross_entropy(x, w, y, margin, backend=backend)
    loss.backward()
    x.grad = None
    w.grad = None


def median_seconds(run, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def working_bytes(run, x: torch.Tensor, w: torch.Tensor, device: torch.device) -> int:
    """Peak bytes allocated during one run, less the gradients of x and w it must produce."""
    gradients = x.numel() * x.element_size() + w.numel() * w.element_size()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with AllocationTracker() as tracker:
            run()
        peak = tracker.peak_bytes
    return max(peak - gradients, 0)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = f"; {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {name}; torch {torch.__version__}; B={args.batch} D={args.dim} {args.dtype} {args.margin}{threads}")
    header = f"{'backend':>8} {'C':>10} {'fwd+bwd ms':>11} {'working MB':>11}"
    rows = []
    for classes in args.classes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(args.batch, args.dim, generator=gen).to(device, dtype).requires_grad_()
        w = torch.randn(classes, args.dim, generator=gen).to(device, dtype).requires_grad_()
        y = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
        for backend in args.backends:
            reason = mf.available_backends().get(backend, "unknown backend")
            if reason is not None:
                print(f"skipping {backend}: {reason}")
                continue
            run = lambda: fwd_bwd(x, w, y, args.margin, backend)  # noqa: E731
            try:
                seconds = median_seconds(run, device, args.repeats)
                memory = f"{working_bytes(run, x, w, device) / 2**20:11.1f}"
                timing = f"{seconds * 1e3:11.2f}"
            except torch.OutOfMemoryError:
                timing = memory = f"{'OOM':>11}"
            rows.append(f"{backend:>8} {classes:>10} {timing} {memory}")
        del x, w, y
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
