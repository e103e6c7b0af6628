"""Measurements of one provider at one shape, and the worker process that serves them:
`python -m bench.worker` reads one JSON point per line on stdin and answers each with one line,
`RESULT` followed by JSON, on stdout (bench/process.py runs it).

Inputs are drawn on the measuring device in the measured dtype: on a GPU no copy of the class
centres passes through the host (16M classes × 512 dims: 16 GB in bf16, 32 GB as float32).

Time: each repetition is one forward and its backward, marked before, between and after
(bench/timing.py), so forward, backward and forward+backward come from the same calls and
forward+backward ≥ forward in every repetition, hence in the medians reported (of `repeats`
repetitions after WARMUP). Working memory: the peak memory of one forward+backward beyond the
inputs and the gradients it must produce — the CUDA allocator's peak on a GPU; on the CPU the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs), with large blocks
returned to the system on free (MALLOC_MMAP_THRESHOLD_) so it counts memory in use, not memory
cached.

On the CPU each point runs in fresh processes (`what`: "time", then "memory" in a process whose
every block above 64 KiB is mapped and unmapped on its own, which would add page faults to every
allocation a timed run makes). On a GPU one process serves point after point (`what`: "both":
the CUDA allocator's statistics need no such setting), freeing the allocator's cache and
torch.compile's caches between points; running out of GPU memory is answered as "OOM" and the
process goes on.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import sys
from typing import Callable

import torch
from torch import Tensor

from .providers import LossFn, make_loss
from .timing import Marks

WARMUP = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULT = "bench-result: "
"""The prefix of the worker's answer lines (anything else a provider prints is not an answer)."""


def draw_inputs(batch: int, classes: int, dim: int, dtype: str, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """Embeddings and class centres (leaves that need gradients) and labels, drawn on `device`."""
    generator = torch.Generator(device).manual_seed(0)
    drawn = dict(generator=generator, device=device, dtype=DTYPES[dtype])
    x = torch.randn(batch, dim, **drawn).requires_grad_()
    w = torch.randn(classes, dim, **drawn).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=generator, device=device)
    return x, w, y


def forward_backward_ms(loss_fn: LossFn, x: Tensor, w: Tensor, y: Tensor, repeats: int) -> dict[str, float]:
    """Median forward, backward and forward+backward milliseconds, each repetition one marked call."""
    forward, backward, both = [], [], []
    for repetition in range(WARMUP + repeats):
        x.grad = w.grad = None
        marks = Marks(x.device)
        marks.mark()
        loss = loss_fn(x, w, y)
        marks.mark()
        loss.backward()
        marks.mark()
        fwd, bwd = marks.intervals_ms()
        if repetition >= WARMUP:
            forward.append(fwd)
            backward.append(bwd)
            both.append(fwd + bwd)
    return {"fwd_ms": statistics.median(forward), "bwd_ms": statistics.median(backward),
            "fwd_bwd_ms": statistics.median(both)}


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


def working_mb(loss_fn: LossFn, x: Tensor, w: Tensor, y: Tensor) -> float:
    """Peak memory of one forward+backward beyond the inputs' gradients, in MiB (after one untimed
    call: compile caches and lazily built state are not working memory)."""

    def forward_backward() -> None:
        loss_fn(x, w, y).backward()

    forward_backward()
    x.grad = w.grad = None
    if x.device.type == "cuda":
        peak = _cuda_peak_bytes(forward_backward, x.device)
    else:
        peak = _cpu_peak_bytes(forward_backward)
    gradients = x.numel() * x.element_size() + w.numel() * w.element_size()
    return max(peak - gradients, 0) / 2**20


def measure(provider: str, batch: int, classes: int, dim: int, dtype: str, margin: str, device: str, repeats: int,
            what: str) -> dict:
    """The times ("time"), the working memory ("memory") or both ("both") of one provider at one shape."""
    x, w, y = draw_inputs(batch, classes, dim, dtype, device)
    loss_fn = make_loss(provider, margin)
    result = forward_backward_ms(loss_fn, x, w, y, repeats) if what in ("time", "both") else {}
    if what in ("memory", "both"):
        result["working_mb"] = working_mb(loss_fn, x, w, y)
    return result


def answer(config: dict) -> dict:
    """The measurement of one point, {"status": "ok", ...}, or {"status": "OOM"}; afterwards the
    point's memory and compiled graphs are released."""
    try:
        result = {"status": "ok", **measure(**config)}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    gc.collect()
    if config["provider"] == "torch-compile":
        torch.compiler.reset()  # else the next shapes would count as recompiles, past its limit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    for line in sys.stdin:
        print(RESULT + json.dumps(answer(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
