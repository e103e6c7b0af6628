"""The results file: one CSV row per (provider, shape, dtype) of every run, with where and when.

By default it is .bench/results.csv at the repository's root, outside the tracked files (.bench/
is ignored by git); bench/results/ holds only results deliberately committed."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / ".bench" / "results.csv"

FIELDS = [
    "run", "commit", "device", "torch", "triton", "matmul_tflops",
    "provider", "margin", "dtype", "batch", "dim", "classes",
    "fwd_ms", "bwd_ms", "fwd_bwd_ms", "tflops", "pct_matmul", "working_mb", "status",
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """Where and when: run timestamp, git commit, device, torch and triton versions."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "-"
    return {
        "run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton,
    }


def append(rows: list[dict], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read(path: Path = RESULTS) -> list[dict]:
    with path.open(newline="") as source:
        return list(csv.DictReader(source))
