"""Row normalisation on the PyTorch side of every backend: v̂ = v / max(‖v‖, ε) (F.normalize's,
ε = NORM_EPS) and 1 / max(‖v‖, ε), with no overflow for any finite row.

‖v‖² overflows float32 once an entry passes ~1.8e19, far below where ‖v‖ leaves float32's range
(and 1/‖v‖ is representable further still, as a subnormal). So a row whose largest entry passes
2^60 is divided first by the power of two at or below that entry (exact), as BLAS's nrm2 scales
its sum of squares:

    v / max(‖v‖, ε) = (v/s) / max(‖v/s‖, ε/s),        1 / max(‖v‖, ε) = (1/s) / max(‖v/s‖, ε/s).

Other rows are left as they are (s = 1: the same operations as F.normalize). Underflow of the
squares needs no care: it happens only where ‖v‖ < 2^-60·√D, far below ε, where the norm is
clamped to ε anyway. float16 rows need no scale (65504² is well within float32, their working
precision). The kernels compute the same quantities the same way (kernels/norms.py, csrc/).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .constants import NORM_EPS
from .margins import working_dtype

LARGE_ENTRY = 2.0**60
"""Rows with an entry above this are scaled before their squares are summed."""


def _scales(rows: Tensor) -> Tensor:
    """Per row (keepdim), the power of two at or below its largest entry where that passes
    LARGE_ENTRY, else 1; detached (a constant factor of the row, exact)."""
    largest = torch.linalg.vector_norm(rows.detach(), ord=float("inf"), dim=-1, keepdim=True)
    power = torch.exp2(torch.floor(torch.log2(largest.clamp_min(1.0))))
    return torch.where(largest > LARGE_ENTRY, power, torch.ones_like(power))


def normalize_rows(rows: Tensor) -> Tensor:
    """v / max(‖v‖, NORM_EPS) along the last dimension, differentiable, in the rows' dtype."""
    scale = _scales(rows)
    scaled = rows / scale
    return scaled / torch.maximum(torch.linalg.vector_norm(scaled, dim=-1, keepdim=True), NORM_EPS / scale)


def inverse_norms(rows: Tensor) -> Tensor:
    """1 / max(‖v‖, NORM_EPS) along the last dimension, detached, in the working precision
    (float32; float64 for float64 rows). float16 rows are read as they are (no scaled copy)."""
    work = working_dtype(rows.dtype)
    rows = rows.detach()
    if rows.dtype == torch.float16:
        return 1.0 / torch.linalg.vector_norm(rows, dim=-1, dtype=work).clamp_min(NORM_EPS)
    scale = _scales(rows).to(work)
    norms = torch.linalg.vector_norm(rows.to(work) / scale, dim=-1, keepdim=True)
    return ((1.0 / scale) / torch.maximum(norms, NORM_EPS / scale)).squeeze(-1)
