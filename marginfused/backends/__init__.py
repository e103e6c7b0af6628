"""The backends, their registry, and which one runs a call.

Imports run one way: `base` (the contract, what a backend needs, the kernels' settings, the
registry) ← `ops` (the custom operators of each fused backend) ← one module per backend, named
after it (`torch`, `cpu`, `cuda`, `triton`, the C++ two sharing `extension`) ← `timing` (which of
several usable backends is faster on a shape) ← this module's `registry`, which registers them in
priority order and chooses among them ← the functional API and the modules.

`backend="auto"` tries the backends in `AUTO_ORDER` for the tensors' device type and takes the
first that can run, or where several fused backends can, the faster on the call's shape, timed
once (`timing`); `explain_backend(x, w)` says, for each backend it passed over, why (after
xformers' `not_supported_reasons`), and the same lines go to the "marginfused" logger at DEBUG.
"""

from .base import REGISTRY, Backend, BackendUnavailableError, KernelSettings, RowLoss
from .ops import FusedBackend
from .registry import (AUTO_ORDER, available_backends, backend_for_call, backend_reasons, check_backend_name,
                       explain_backend, select_backend)

__all__ = [
    "AUTO_ORDER",
    "REGISTRY",
    "Backend",
    "BackendUnavailableError",
    "FusedBackend",
    "KernelSettings",
    "RowLoss",
    "available_backends",
    "backend_for_call",
    "backend_reasons",
    "check_backend_name",
    "explain_backend",
    "select_backend",
]
