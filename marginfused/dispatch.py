"""Which backend runs a call: the registry, `available_backends()` and the choice for `"auto"`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import Backend, BackendUnavailableError
from .chunked import CpuBackend, CudaBackend
from .config import LossConfig
from .reference import TorchBackend
from .triton_backend import TritonBackend

BACKENDS: dict[str, Backend] = {
    "triton": TritonBackend(),
    "cuda": CudaBackend(),
    "cpu": CpuBackend(),
    "torch": TorchBackend(),
}
"""Every backend by name, fastest first."""

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
"""The order `backend="auto"` tries backends in, by device type; other devices get "torch"."""


def available_backends() -> dict[str, Optional[str]]:
    """Every backend's name mapped to None if it can run on this machine, else the reason it cannot."""
    return {name: backend.unavailable_reason() for name, backend in BACKENDS.items()}


@torch.compiler.assume_constant_result
def _choose(name: str, device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    """(the backend to run, "") or ("", why none can): a constant for given arguments, which
    torch.compile evaluates once when tracing instead of tracing into it (availability checks
    build extensions and take locks). The decorator imports torch._dynamo: `import marginfused`
    took 3.0 s against 1.8 s for `import torch` alone on a 2-core CPU, the price of
    `torch.compile(..., fullgraph=True)` with backend="auto"."""
    if name != "auto":
        backend = BACKENDS[name]
        reason = backend.unavailable_reason() or backend.unsupported_reason(device_type, dtype)
        return ("", f"backend {name!r} cannot run here: {reason}") if reason else (name, "")
    for candidate in AUTO_ORDER.get(device_type, ("torch",)):
        backend = BACKENDS[candidate]
        if backend.unavailable_reason() is None and backend.unsupported_reason(device_type, dtype) is None:
            return candidate, ""
    return "", f"no backend can run on {device_type} tensors of {dtype}"


def select_backend(name: str, embeddings: Tensor, weight: Tensor, config: LossConfig) -> Backend:
    """The backend to run: `name` itself (or an error saying why it cannot), or the first usable
    backend for the tensors' device type and dtype when `name` is "auto"."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        known = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    chosen, error = _choose(name, embeddings.device.type, embeddings.dtype)
    if error:
        raise BackendUnavailableError(error)
    return BACKENDS[chosen]
