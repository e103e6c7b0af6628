"""One measurement in a process of its own: `python -m bench.worker '<json>'` prints one JSON line.

A fresh process per (provider, shape) keeps compile caches and allocator state from leaking
between measurements, and turns running out of memory into a result instead of a crash.

Time: the median of `repeats` runs after `WARMUP` runs, with CUDA events on a GPU and the wall
clock on the CPU; "bwd" times the backward pass alone (its forward runs untimed before each).
Working memory: the peak memory of one forward+backward beyond the inputs and the gradients it
must produce — the CUDA allocator's peak on a GPU; on the CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs), with large blocks returned to the system on free
(MALLOC_MMAP_THRESHOLD_) so it counts memory in use, not memory cached.

On the CPU the caller runs the two in separate processes (`what`: "time" or "memory"): the timing
with the allocator as a training process has it, the memory with every block above 64 KiB mapped
and unmapped on its own, which would add page faults to every allocation a timed run makes. On a
GPU one process does both (`what`: "both"): the CUDA allocator's statistics need no such setting.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time
from typing import Callable

import torch

from .providers import make_loss

WARMUP = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _cpu_peak_bytes(run: Callable[[], None]) -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_bytes("VmRSS")
    run()
    return _proc_status_bytes("VmHWM") - before


def _cuda_peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def median_ms(prepare: Callable[[], object], run: Callable[[object], None], device: torch.device, repeats: int) -> float:
    """Median time of run(prepare()) in milliseconds, prepare untimed."""
    for _ in range(WARMUP):
        run(prepare())
    times = []
    for _ in range(repeats):
        state = prepare()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def measure(provider: str, batch: int, classes: int, dim: int, dtype: str, margin: str, device: str, repeats: int,
            what: str) -> dict:
    """The times ("time"), the working memory ("memory") or both ("both") of one provider at one shape."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator).to(device, DTYPES[dtype]).requires_grad_()
    w = torch.randn(classes, dim, generator=generator).to(device, DTYPES[dtype]).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    loss_fn = make_loss(provider, margin)

    def clear_grads() -> None:
        x.grad = None
        w.grad = None

    def forward_backward(_: object = None) -> None:
        loss_fn(x, w, y).backward()

    def forward() -> torch.Tensor:
        clear_grads()
        return loss_fn(x, w, y)

    result = {}
    if what in ("time", "both"):
        result = {
            "fwd_ms": median_ms(clear_grads, lambda _: loss_fn(x, w, y), device, repeats),
            "bwd_ms": median_ms(forward, lambda loss: loss.backward(), device, repeats),
            "fwd_bwd_ms": median_ms(clear_grads, forward_backward, device, repeats),
        }
    if what == "time":
        return result
    forward_backward()  # compile caches and lazily built state: not working memory
    clear_grads()
    gradients = x.numel() * x.element_size() + w.numel() * w.element_size()
    if device.type == "cuda":
        peak = _cuda_peak_bytes(forward_backward, device)
    else:
        peak = _cpu_peak_bytes(forward_backward)
    return {**result, "working_mb": max(peak - gradients, 0) / 2**20}


def main() -> None:
    config = json.loads(sys.argv[1])
    try:
        result = {"status": "ok", **measure(**config)}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
