"""`backend="auto"` where several fused backends can run: the first call of each shape times them
and keeps the faster.

Which fused backend is faster depends on the GPU, the dtype and the shapes (the Triton kernels
and the chunked cuda path scale differently with B and D), and a table fitted on one GPU would be
wrong on the next. So the first call for each (device, dtype, D, B bucket), B rounded up to a power
of two, runs each candidate's forward and backward on the call's own tensors, with gradients on
(even inside `torch.no_grad()`): once to warm up (kernel compilation, the extension's build), once
timed. The timed steps change nothing of the call: the tensors are detached, and the margin is
replaced by a plain one, so an adaptive margin's statistics stay as they are (the kernels never
evaluate a margin; a margin's own negatives rule, CurricularFace's, is left out of the timed step,
while the call's label smoothing and inter-class filtering stay in it). The faster backend is kept
for that key and said once at INFO. Under `torch.inference_mode()` nothing can be timed: the call
takes the first usable backend, and the choice waits for a call outside it.

In a process group every rank must run the same backend and the same collectives: every rank
contributes its time for each backend (infinite where it could not run one) and all take the
slowest rank's time for each backend (a max-reduction), so they all choose the same. A sharded
call's choice is kept apart from single-process ones, and it is timed even where a rank has one
candidate, so that every rank joins the reduction.

Under torch.compile no timing runs: a traced call takes the backend last measured for its
device and dtype by an eager call, else the first usable backend in `AUTO_ORDER`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ..margins import CosFace
from ..settings import LossSettings
from .base import REGISTRY, Backend

_log = logging.getLogger("marginfused")

_measured: dict[tuple[str, str, int, int, bool], str] = {}
"""The backend chosen for each (device, dtype, D, B bucket, sharded) this process has timed."""
_latest: dict[tuple[str, str], str] = {}
"""The backend last chosen by timing for each (device, dtype): what a traced call takes."""


def batch_bucket(rows: int) -> int:
    """B rounded up to a power of two (at least 1)."""
    return 1 << max(rows - 1, 0).bit_length()


def candidates(order: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends in `order` that can run tensors of this device and dtype without holding the
    logits."""
    return [name for name in order if not REGISTRY[name].holds_logits
            and REGISTRY[name].unavailable_reason() is None
            and REGISTRY[name].unsupported_reason(device, dtype) is None]


def step_seconds(backend: Backend, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> float:
    """Seconds one forward and backward of `backend` takes on these tensors, after one run to warm
    up, with a plain margin and nothing of the tensors' own autograd graph or gradients touched."""
    plain = dataclasses.replace(settings, margin=CosFace(), margin_grad="detached")

    def step() -> None:
        with torch.enable_grad():
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            backend.per_row_loss(xs, ws, y, plain).loss.sum().backward()

    step()
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):  # the events on the tensors' device's stream
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


SlowestRank = Callable[[Tensor], Tensor]
"""Max-reduces a float64 CPU tensor over the ranks of a process group (every rank gets the result)."""


def fastest(chosen: Backend, order: tuple[str, ...], x: Tensor, w: Tensor, y: Tensor, settings: LossSettings,
            slowest_rank: Optional[SlowestRank] = None) -> Backend:
    """`chosen` (the first usable backend in `order`), or the faster fused backend by the timing of
    this module's docstring where more than one can run these tensors. In a process group,
    `slowest_rank` reduces the times over its ranks, and y holds class ids of the shard `w`."""
    if torch.compiler.is_compiling():
        return REGISTRY[_traced_choice(str(x.device), x.dtype, chosen.name)]
    if torch.is_inference_mode_enabled():
        return chosen
    names = candidates(order, x.device, x.dtype)
    if len(names) < 2 and slowest_rank is None:
        return chosen
    key = (str(x.device), str(x.dtype), x.shape[1], batch_bucket(x.shape[0]), slowest_rank is not None)
    if key not in _measured:
        _measured[key] = _time_and_choose(names, chosen.name, x, w, y, settings, slowest_rank)
        _latest[key[:2]] = _measured[key]
    return REGISTRY[_measured[key]]


@torch.compiler.assume_constant_result
def _traced_choice(device: str, dtype: torch.dtype, default: str) -> str:
    """The backend last chosen by timing for this device and dtype, else `default`: a constant that
    torch.compile evaluates once when tracing."""
    return _latest.get((device, str(dtype)), default)


def _time_and_choose(names: list[str], default: str, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings,
                     slowest_rank: Optional[SlowestRank]) -> str:
    every = list(REGISTRY)  # the same list on every rank, whatever each rank can run
    seconds = torch.full((len(every),), math.inf, dtype=torch.float64)
    for name in names:
        try:
            seconds[every.index(name)] = step_seconds(REGISTRY[name], x, w, y, settings)
        except Exception as error:  # a backend that cannot run this step is not chosen
            warnings.warn(f"marginfused: backend='auto' could not time the {name!r} backend ({error}); "
                          f"it is not chosen for this shape", RuntimeWarning, stacklevel=3)
    if slowest_rank is not None:
        seconds = slowest_rank(seconds)
    if not bool(torch.isfinite(seconds).any()):
        return default
    choice = every[int(seconds.argmin())]
    timed = ", ".join(f"{name} {seconds[every.index(name)].item() * 1e3:.3g} ms" for name in names)
    _log.info("marginfused: backend='auto' timed forward+backward at B=%d, D=%d, %d rows of W, %s on %s (%s%s): "
              "runs %r for this shape", x.shape[0], x.shape[1], w.shape[0], x.dtype, x.device, timed,
              ", slowest rank" if slowest_rank is not None else "", choice)
    return choice
