"""`python -m bench`: time and working memory of every provider over a sweep of shapes.

For each provider × dtype × B × D × C: forward, backward and forward+backward median times (one
timed call each repetition, bench/worker.py), achieved TFLOP/s counting 8·B·C·D for
forward+backward (4 GEMMs of 2·B·C·D: forward, recompute, dX, dW), that as a % of the matmul rate
measured in the same run, and the working memory beyond inputs and gradients.

Each row is appended to the results file (.bench/results.csv unless --results says otherwise,
outside the tracked files) and printed as its point finishes, so a sweep stopped part way keeps
what it measured. A point past its time limit, out of memory or killed is a row with that status
(and the provider is not run at larger C); a sweep stopped by SIGTERM or Ctrl-C records the point
it was measuring as killed. A provider that cannot run here (not installed, or missing from the
installed torch) is reported once, with the reason, and not run. On the CPU each point runs in
processes of its own (the memory measurement needs its own); on a GPU one worker process serves
every point, and a fresh one follows a worker that failed. `python -m bench.report` draws the
plots. Defaults are sized for the present device: about 16 minutes on a 2-core CPU, most of it
PyTorch's chunked linear cross-entropy (20 s a call at C = 200k in bf16).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import results
from .micro import matmul_tflops
from .process import Measurer, Stopped, stop_on_signals
from .providers import KINDS, PROVIDERS, unavailable_reason
from .worker import DTYPES

WORKER_TIMEOUT_S = 600
MATMUL_N = {"cuda": 8192, "cpu": 1024}
"""The side of the square GEMM whose rate each row's % of matmul is taken against."""


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
    parser.add_argument("--results", type=Path, default=results.RESULTS,
                        help=f"CSV to append each row to (default {results.RESULTS.relative_to(results.REPO)})")
    parser.add_argument("--no-save", action="store_true", help="print the rows only")
    return parser.parse_args(argv)


HEADER = (
    f"{'provider':>23} {'dtype':>5} {'B':>5} {'D':>4} {'C':>9} {'fwd ms':>9} {'bwd ms':>9} "
    f"{'fwd+bwd ms':>10} {'TFLOP/s':>8} {'%mm':>5} {'work MB':>9}  {'computes':<27}  status"
)


def format_row(row: dict) -> str:
    def number(key: str, spec: str) -> str:
        return format(float(row[key]), spec) if row.get(key) not in (None, "") else "-"

    return (
        f"{row['provider']:>23} {row['dtype']:>5} {row['batch']:>5} {row['dim']:>4} {row['classes']:>9} "
        f"{number('fwd_ms', '9.2f'):>9} {number('bwd_ms', '9.2f'):>9} {number('fwd_bwd_ms', '10.2f'):>10} "
        f"{number('tflops', '8.3f'):>8} {number('pct_matmul', '5.1f'):>5} {number('working_mb', '9.1f'):>9}  "
        f"{KINDS[row['provider']]:<27}  {row['status']}"
    )


def complete(row: dict, measured: dict, rate: float) -> None:
    """Fill `row` from a worker's answer: its status, and for a measured point its numbers."""
    row["status"] = measured.pop("status")
    if row["status"] != "ok":
        return
    row.update({key: f"{value:.6g}" for key, value in measured.items()})
    tflops = 8 * row["batch"] * row["classes"] * row["dim"] / (measured["fwd_bwd_ms"] * 1e-3) / 1e12
    row["tflops"] = f"{tflops:.6g}"
    row["pct_matmul"] = f"{100 * tflops / rate:.4g}"


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
            print(f"unavailable: {provider}: {reason}")
    if device.type == "cpu" and "bf16" in args.dtype and "cpu" in providers:
        from marginfused.backends.cpu import bfloat16_gemm

        print(f"cpu backend, bfloat16 inputs: GEMMs in {bfloat16_gemm()} (bfloat16 where the CPU has "
              f"AVX512-BF16 or AMX, else on float32 copies)")
    rates = {dtype: matmul_tflops(device, DTYPES[dtype], MATMUL_N[device.type]) for dtype in args.dtype}
    for dtype, rate in rates.items():
        print(f"matmul rate, {dtype}: {rate:.3f} TFLOP/s")

    sweep = list(itertools.product(args.dtype, args.batch, args.dim, args.classes, providers))
    measurer = Measurer(device)
    given_up = {}  # (provider, dtype, B, D) -> why larger C is not run: out of memory, or out of time
    print(HEADER, flush=True)
    stop_on_signals()
    try:
        for dtype, batch, dim, classes, provider in tqdm(sweep, desc="bench", unit="run", file=sys.stderr, disable=None):
            row = {**where, "matmul_tflops": f"{rates[dtype]:.6g}", "provider": provider, "margin": args.margin,
                   "dtype": dtype, "batch": batch, "dim": dim, "classes": classes}
            family = (provider, dtype, batch, dim)
            if family in given_up:
                row["status"] = f"not run: {given_up[family]} at a smaller C"
            else:
                try:
                    measured = measurer.measure(dict(provider=provider, batch=batch, classes=classes, dim=dim,
                                                     dtype=dtype, margin=args.margin, device=args.device,
                                                     repeats=args.repeats), args.timeout)
                except Stopped as stopped:
                    row["status"] = f"killed: the sweep was stopped ({stopped}) while this point ran"
                    record(row, args)
                    raise
                complete(row, measured, rates[dtype])
                if row["status"] == "OOM" or row["status"].startswith(("timeout", "killed")):
                    given_up[family] = row["status"]
            record(row, args)
    except Stopped as stopped:
        sys.exit(128 + stopped.signum)
    finally:
        measurer.close()
    if not args.no_save:
        print(f"appended {len(sweep)} rows to {args.results}")


def record(row: dict, args: argparse.Namespace) -> None:
    """Print the row and, unless --no-save, append it to the results file."""
    print(format_row(row), flush=True)
    if not args.no_save:
        results.append([row], args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
