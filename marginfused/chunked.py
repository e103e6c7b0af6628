"""The `cpu` and `cuda` backends: the chunked algorithm of DESIGN §3 in C++ (csrc/).

Both walk the classes in chunks whose B×chunk fp32 tile stays within a fixed budget, however
many classes there are: per chunk one GEMM for the raw dot products (normalisation folded in as
row and column scales, no normalised copy of W), then one fused pass for the margin on the
target column, the online max / sum-exp, the target logit, the logit sum and the argmax. The
backward pass recomputes each chunk, forms the gradient tile in place and accumulates dX̂ and
dŴ with two more GEMMs, then projects through the normalisation (the math is written out at the
top of csrc/cpu.cpp and csrc/cuda.cu). Inputs may be float32, float16 or bfloat16; everything is
computed and accumulated in fp32.

Both are `FusedBackend`s: their per-row loss is the `marginfused::margin_loss` custom operator
(fused.py) over the two per-shard pieces here, which the class-sharded loss uses too (labels are
global class ids; `weight` holds classes [class_start, class_start + weight.shape[0])):

    row_partials(x, W_shard, y, config, class_start)                    -> RowPartials over the shard
    row_partials_backward(x, W_shard, y, config, class_start, num_classes,
                          row_max, row_sumexp, grad_rows)                -> (grad_x part, grad_W_shard)

where row_max and row_sumexp are the partials merged over all `num_classes` classes (every
shard). The backward forms lse_i = m_i + log s_i from them in float64: at s = 64 a float32 lse is
off by up to ulp(lse) ≈ 4e-6, which would become a relative error of every p_ij. The grad_x parts
of all shards sum to the gradient with respect to x.

The chunk size is `TILE_BYTES[device] / (4·B)` classes (at least `MIN_CHUNK`), or the value of the
environment variable MARGINFUSED_CHUNK (read on every call; tests use it to span many chunks).
"""

from __future__ import annotations

import os
from typing import ClassVar, Optional

import torch
from torch import Tensor

from . import extension
from .fused import FusedBackend
from .config import LossConfig
from .partials import RowPartials

TILE_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}
"""The budget of one B×chunk fp32 tile per device type: cache-sized on the CPU (one tile per
thread), bounded on a GPU (one tile, plus its half/bf16 copy for the backward GEMMs)."""

MIN_CHUNK = 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def chunk_size(device_type: str, batch: int) -> int:
    """Classes per chunk for a batch of `batch` rows (MARGINFUSED_CHUNK overrides)."""
    override = os.environ.get("MARGINFUSED_CHUNK")
    if override:
        chunk = int(override)
        if chunk <= 0:
            raise ValueError(f"MARGINFUSED_CHUNK must be a positive integer, got {override!r}")
        return chunk
    return max(MIN_CHUNK, TILE_BYTES[device_type] // (4 * batch))


def _extension_for(x: Tensor):
    return extension.load(x.device.type)


def _margin_args(config: LossConfig) -> tuple[int, int, float, float, float, float]:
    p1, p2, p3 = config.margin.params
    return int(config.margin.kind), int(config.margin.fallback_code), p1, p2, p3, config.scale


def row_partials(x: Tensor, weight: Tensor, labels: Tensor, config: LossConfig, class_start: int = 0) -> RowPartials:
    """Per-row partials (max, sumexp, target, logit_sum, best_cos, best_class) of the logits over
    the classes [class_start, class_start + weight.shape[0]), computed by the C++ extension of
    x's device without any B×C tensor. No autograd: see `row_partials_backward`."""
    ext = _extension_for(x)
    x, weight, labels = x.contiguous(), weight.contiguous(), labels.long().contiguous()
    batch = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    out = RowPartials(
        max=torch.empty(batch, **f32),
        sumexp=torch.empty(batch, **f32),
        target=torch.empty(batch, **f32),
        logit_sum=torch.empty(batch, **f32),
        best_cos=torch.empty(batch, **f32),
        best_class=torch.empty(batch, dtype=torch.int64, device=x.device),
    )
    kind, fallback, p1, p2, p3, scale = _margin_args(config)
    ext.forward_partials(
        x.detach(), weight.detach(), labels, class_start, chunk_size(x.device.type, batch),
        kind, fallback, p1, p2, p3, scale, config.ignore_index, *out,
    )
    return out


def row_partials_backward(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    config: LossConfig,
    class_start: int,
    num_classes: int,
    row_max: Tensor,
    row_sumexp: Tensor,
    grad_rows: Tensor,
    need_x: bool = True,
    need_weight: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of Σ_i grad_rows_i · ℓ_i with respect to x and the weight shard holding classes
    [class_start, class_start + weight.shape[0]) of `num_classes`, given the max and sumexp of the
    partials over all classes. Returns (grad_x, grad_weight) in the input dtype, None for what is
    not needed."""
    lse = row_max.double() + torch.log(row_sumexp.double())
    ext = _extension_for(x)
    x, weight, labels = x.detach().contiguous(), weight.detach().contiguous(), labels.long().contiguous()
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.empty_like(weight) if need_weight else None
    kind, fallback, p1, p2, p3, scale = _margin_args(config)
    ext.backward(
        x, weight, labels, lse.double().contiguous(), grad_rows.float().contiguous(), class_start, num_classes,
        chunk_size(x.device.type, x.shape[0]), kind, fallback, p1, p2, p3, scale,
        config.margin_grad == "exact", config.label_smoothing, config.ignore_index, grad_x, grad_w,
    )
    return grad_x, grad_w


class ChunkedBackend(FusedBackend):
    """A backend running the chunked C++ extension built for `device_type` tensors."""

    device_type: ClassVar[str]

    def unavailable_reason(self) -> Optional[str]:
        return extension.unavailable_reason(self.device_type)

    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        if device_type != self.device_type:
            return f"the {self.name} backend runs on {self.device_type} tensors, got {device_type} tensors"
        if dtype not in SUPPORTED_DTYPES:
            return (
                f"{dtype} inputs are not supported (float32, float16 and bfloat16 are); "
                "use backend='torch' for them"
            )
        return None

    row_partials = staticmethod(row_partials)
    shard_backward = staticmethod(row_partials_backward)


class CpuBackend(ChunkedBackend):
    """C++ with ATen GEMMs (MKL/OpenBLAS) and OpenMP for CPU tensors."""

    name = "cpu"
    device_type = "cpu"


class CudaBackend(ChunkedBackend):
    """ATen (cuBLAS) GEMMs and hand-written CUDA kernels for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"
