"""The registered backends in priority order, and which one runs a call (`backend="auto"` or a
name). Kept apart from the package's __init__ so that the `torch` backend's module name never
shadows the torch package here."""

from __future__ import annotations

import logging
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from ..settings import LossSettings
from . import timing
from .base import REGISTRY, Backend, BackendUnavailableError
from .cpu import CpuBackend
from .cuda import CudaBackend
from .torch import TorchBackend
from .triton import TritonBackend

for _backend in (TritonBackend(), CudaBackend(), CpuBackend(), TorchBackend()):
    REGISTRY[_backend.name] = _backend

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
"""The order `backend="auto"` tries backends in, by device type; other devices get "torch". Where more
than one fused backend can run a call, the first call of each shape times them (`timing`)."""

_log = logging.getLogger("marginfused")


def available_backends() -> dict[str, Optional[str]]:
    """Every backend's name mapped to None if it can run on this machine, else the reason it cannot."""
    return {name: backend.unavailable_reason() for name, backend in REGISTRY.items()}


def _reason(name: str, device: str, dtype: torch.dtype) -> Optional[str]:
    backend = REGISTRY[name]
    return backend.unavailable_reason() or backend.unsupported_reason(torch.device(device), dtype)


def backend_reasons(device: Union[str, torch.device], dtype: torch.dtype) -> dict[str, Optional[str]]:
    """For tensors of this device and dtype, each backend `backend="auto"` would consider, in
    order, mapped to None if it can take them, else why not."""
    device = torch.device(device)
    return {name: _reason(name, str(device), dtype) for name in AUTO_ORDER.get(device.type, ("torch",))}


def explain_backend(x: Tensor, w: Optional[Tensor] = None) -> str:
    """Which backend `backend="auto"` picks for these tensors, and why each faster one was passed
    over, as a few lines of text."""
    reasons = backend_reasons(x.device, x.dtype)
    chosen = next((name for name, reason in reasons.items() if reason is None), None)
    lines = [f"{x.device.type} tensors of {x.dtype}: backend={chosen!r}" if chosen else
             f"{x.device.type} tensors of {x.dtype}: no backend can run"]
    for name, reason in reasons.items():
        if name == chosen:
            break
        lines.append(f"  passed over {name!r}: {reason}")
    return "\n".join(lines)


@torch.compiler.assume_constant_result
def _choose(name: str, device: str, dtype: torch.dtype) -> tuple[str, str]:
    """(the backend to run, "") or ("", why none can): a constant for given arguments, which
    torch.compile evaluates once when tracing instead of tracing into it (availability checks
    build extensions and take locks). The decorator imports torch._dynamo with marginfused: the
    price of `torch.compile(..., fullgraph=True)` with backend="auto"."""
    if name != "auto":
        reason = _reason(name, device, dtype)
        return ("", f"backend {name!r} cannot run here: {reason}") if reason else (name, "")
    reasons = backend_reasons(device, dtype)
    for candidate, reason in reasons.items():
        if reason is None:
            for passed, why in reasons.items():
                if passed == candidate:
                    break
                _log.debug("backend='auto' passed over %r for %s %s tensors: %s", passed, device, dtype, why)
                _warn_once_if_broken(passed, candidate)
            return candidate, ""
    details = "; ".join(f"{n}: {r}" for n, r in reasons.items())
    return "", f"no backend can run on {device} tensors of {dtype} ({details})"


_warned: set[str] = set()


def _warn_once_if_broken(passed: str, chosen: str) -> None:
    """A warning, once per process and backend, when `backend="auto"` passes over a fused backend
    that cannot run on this machine at all (a failed build, a missing compiler or package; not
    tensors of another device or dtype, which are the backend's design): it names the backend, why,
    and what the call costs instead."""
    why = REGISTRY[passed].unavailable_reason()
    if why is None or passed in _warned:
        return
    _warned.add(passed)
    cost = (" The torch reference holds the batch × classes logits in memory: at millions of classes that is an "
            "out-of-memory error or a many times slower step." if chosen == "torch" else "")
    warnings.warn(f"marginfused: backend='auto' cannot use the {passed!r} backend ({why}) and runs {chosen!r} "
                  f"instead.{cost} Pass backend={chosen!r} to choose it knowingly.", RuntimeWarning, stacklevel=2)


def check_backend_name(name: object) -> str:
    """`name` if it is "auto" or a registered backend's name; TypeError or ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in REGISTRY:
        known = ", ".join(["auto", *REGISTRY])
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    return name


_announced: set[tuple[str, str, str]] = set()


def select_backend(name: str, x: Tensor) -> Backend:
    """The backend to run: `name` itself (or an error saying why it cannot), or the first usable
    backend for the tensors' device and dtype when `name` is "auto" (before any timing)."""
    chosen, error = _choose(check_backend_name(name), str(x.device), x.dtype)
    if error:
        raise BackendUnavailableError(error)
    return REGISTRY[chosen]


def backend_for_call(name: str, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings,
                     slowest_rank: Optional[timing.SlowestRank] = None) -> Backend:
    """The backend that runs this call: `select_backend`'s, or for "auto" where several fused
    backends can run, the faster on this shape (`timing.fastest`; `slowest_rank` makes every rank of a
    process group choose alike). Which one runs is said once per process, backend, device and dtype,
    at INFO on the "marginfused" logger."""
    backend = select_backend(name, x)
    if name == "auto":
        backend = timing.fastest(backend, AUTO_ORDER.get(x.device.type, ("torch",)), x, w, y, settings, slowest_rank)
    key = (backend.name, str(x.device), str(x.dtype))
    if key not in _announced and not torch.compiler.is_compiling():
        _announced.add(key)
        _log.info("marginfused runs the %r backend for %s tensors of %s (backend=%r)", backend.name, x.device, x.dtype,
                  name)
    return backend
