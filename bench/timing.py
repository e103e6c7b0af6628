"""Time on one device: marks on its timeline, and the time each kernel or operator took.

A mark is a CUDA event on a GPU (when the GPU reaches it in its stream: work queued between two
marks is timed as the GPU runs it) and the host clock on the CPU (where work runs as it is called).
Per-kernel times come from torch.profiler: on a GPU the device time of every kernel, Triton's and
CUDA's alike, summed by kernel name; on the CPU the self time of every operator.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


class Marks:
    """Points in time on `device`'s timeline, marked one after another."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._points: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._points.append(event)
        else:
            self._points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device to reach the last)."""
        pairs = list(zip(self._points, self._points[1:]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in pairs]
        return [(end - start) * 1e3 for start, end in pairs]


def median_ms(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `run()` over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        marks = Marks(device)
        marks.mark()
        run()
        marks.mark()
        times.extend(marks.intervals_ms())
    return statistics.median(times)


def kernel_times_ms(run: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Milliseconds per kernel name of one `run()`, largest first: device time on a GPU, operator
    self time on the CPU."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        run()
        if on_gpu:
            torch.cuda.synchronize(device)
    totals: dict[str, float] = defaultdict(float)
    if on_gpu:
        for event in profiler.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us() / 1e3
    else:
        for average in profiler.key_averages():
            totals[average.key] += average.self_cpu_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
