"""`python -m bench`: time and working memory of every provider over a sweep of shapes.

For each provider × dtype × B × D × C: forward, backward and forward+backward median times,
achieved TFLOP/s counting 8·B·C·D for forward+backward (4 GEMMs of 2·B·C·D: forward,
recompute, dX, dW), that as a % of the matmul rate measured in the same run, and the working
memory beyond inputs and gradients (see bench/worker.py for how each is measured). Each
measurement runs in a process of its own; running out of memory is recorded as "OOM".
Rows are appended to bench/results/results.csv; `python -m bench.report` draws the plots.
Defaults are sized for the present device: about 16 minutes on a 2-core CPU, most of it PyTorch's
chunked linear cross-entropy (20 s a call at C = 200k in bf16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import results
from .providers import KINDS, PROVIDERS, unavailable_reason
from .worker import DTYPES

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 600


def parse_args(argv: list[str]) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024] if gpu else [256])
    parser.add_argument("--dim", type=int, nargs="+", default=[512] if gpu else [128])
    parser.add_argument(
        "--classes", type=int, nargs="+",
        default=[10_000, 100_000, 1_000_000, 4_000_000, 16_000_000] if gpu else [10_000, 50_000, 200_000],
    )
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bf16"] if gpu else ["fp32", "bf16"])
    parser.add_argument("--margin", default="arcface")
    parser.add_argument("--repeats", type=int, default=20 if gpu else 3)
    parser.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S,
                        help="seconds one measurement may take (a provider that runs past it is not run at larger C)")
    parser.add_argument("--results", type=Path, default=results.RESULTS, help="CSV to append to")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The dense matmul rate of this device in this dtype: median of square GEMMs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(8):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - began)
    return 2 * n**3 / statistics.median(times) / 1e12


def run_worker(config: dict, timeout: float) -> dict:
    """The worker's times and working memory (bench/worker.py): on a GPU in one process; on the
    CPU the memory in a second process, with large blocks unmapped on free, which would slow the
    timed runs down."""
    if config["device"] != "cpu":
        return _run_worker({**config, "what": "both"}, dict(os.environ), timeout)
    result = _run_worker({**config, "what": "time"}, dict(os.environ), timeout)
    if result["status"] != "ok":
        return result
    memory = _run_worker({**config, "what": "memory"}, dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), timeout)
    return {**result, **memory} if memory["status"] == "ok" else memory


def _run_worker(config: dict, env: dict, timeout: float) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker", json.dumps(config)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:g} s"}
    if done.returncode in (-9, 137):
        return {"status": "OOM"}  # killed by the kernel's out-of-memory killer
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"error: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'provider':>18} {'dtype':>5} {'B':>5} {'D':>4} {'C':>9} {'fwd ms':>9} {'bwd ms':>9} "
        f"{'fwd+bwd ms':>10} {'TFLOP/s':>8} {'%mm':>5} {'work MB':>9}  {'computes':<27}  status"
    )
    lines = [header]
    for r in rows:
        def number(key: str, spec: str) -> str:
            return format(float(r[key]), spec) if r.get(key) not in (None, "") else "-"

        lines.append(
            f"{r['provider']:>18} {r['dtype']:>5} {r['batch']:>5} {r['dim']:>4} {r['classes']:>9} "
            f"{number('fwd_ms', '9.2f'):>9} {number('bwd_ms', '9.2f'):>9} {number('fwd_bwd_ms', '10.2f'):>10} "
            f"{number('tflops', '8.3f'):>8} {number('pct_matmul', '5.1f'):>5} {number('working_mb', '9.1f'):>9}  "
            f"{KINDS[r['provider']]:<27}  {r['status']}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    where = results.environment(device)
    print(f"{where['device']}; torch {where['torch']}; triton {where['triton']}; commit {where['commit']}")

    providers = []
    for provider in args.providers:
        reason = unavailable_reason(provider, device, args.margin)
        if reason is None:
            providers.append(provider)
        else:
            print(f"skipping {provider}: {reason}")
    if device.type == "cpu" and "bf16" in args.dtype and "cpu" in providers:
        from marginfused.backends.cpu import bfloat16_gemm

        print(f"cpu backend, bfloat16 inputs: GEMMs in {bfloat16_gemm()} (bfloat16 where the CPU has "
              f"AVX512-BF16 or AMX, else on float32 copies)")
    rates = {dtype: matmul_tflops(device, DTYPES[dtype]) for dtype in args.dtype}
    for dtype, rate in rates.items():
        print(f"matmul rate, {dtype}: {rate:.3f} TFLOP/s")

    sweep = list(itertools.product(args.dtype, args.batch, args.dim, args.classes, providers))
    rows = []
    given_up = {}  # (provider, dtype, B, D) -> why larger C is not run: out of memory, or out of time
    for dtype, batch, dim, classes, provider in tqdm(sweep, desc="bench", unit="run", file=sys.stderr):
        row = {**where, "matmul_tflops": f"{rates[dtype]:.6g}", "provider": provider, "margin": args.margin,
               "dtype": dtype, "batch": batch, "dim": dim, "classes": classes}
        family = (provider, dtype, batch, dim)
        if family in given_up:
            row["status"] = f"{given_up[family]} (at a smaller C)"
        else:
            measured = run_worker(dict(provider=provider, batch=batch, classes=classes, dim=dim, dtype=dtype,
                                       margin=args.margin, device=args.device, repeats=args.repeats), args.timeout)
            row["status"] = measured.pop("status")
            if row["status"] == "OOM" or row["status"].startswith("timeout"):
                given_up[family] = row["status"]
            if row["status"] == "ok":
                row.update({key: f"{value:.6g}" for key, value in measured.items()})
                tflops = 8 * batch * classes * dim / (measured["fwd_bwd_ms"] * 1e-3) / 1e12
                row["tflops"] = f"{tflops:.6g}"
                row["pct_matmul"] = f"{100 * tflops / rates[dtype]:.4g}"
        rows.append(row)

    print(format_table(rows))
    if not args.no_save:
        results.append(rows, args.results)
        print(f"appended {len(rows)} rows to {args.results}")


if __name__ == "__main__":
    main(sys.argv[1:])
