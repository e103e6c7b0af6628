"""Which backend runs a call: the registry, `available_backends()` and the choice for `"auto"`."""

from __future__ import annotations

from typing import Optional

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


def _reason(backend: Backend, embeddings: Tensor, weight: Tensor, config: LossConfig) -> Optional[str]:
    return backend.unavailable_reason() or backend.unsupported_reason(embeddings, weight, config)


def select_backend(name: str, embeddings: Tensor, weight: Tensor, config: LossConfig) -> Backend:
    """The backend to run: `name` itself (or an error saying why it cannot), or the first usable
    backend for the tensors' device when `name` is "auto"."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        order = AUTO_ORDER.get(embeddings.device.type, ("torch",))
        for candidate in order:
            backend = BACKENDS[candidate]
            if _reason(backend, embeddings, weight, config) is None:
                return backend
        raise BackendUnavailableError(f"no backend can run on {embeddings.device}")
    backend = BACKENDS.get(name)
    if backend is None:
        known = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    reason = _reason(backend, embeddings, weight, config)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return backend
