"""The `cpu` backend: the chunked algorithm in C++ (csrc/driver.h) with ATen GEMMs, its row passes
vectorised and its chunks on OpenMP threads (csrc/cpu.cpp).

bfloat16 inputs: where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; oneDNN's paths
through ATen), the GEMMs run in bfloat16 with float32 accumulation, their results rounded to
bfloat16 once (as the torch reference's own bfloat16 matmul rounds its logits); elsewhere the
weight's chunks are converted to float32 for float32 GEMMs, which is then the faster path. The
choice is made once per process (`bfloat16_gemm`); `use_native_bfloat16_gemm` overrides it.
float16 always takes the float32 path (native float16 GEMMs need AVX512-FP16 or AMX-FP16).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..partials import LogSumExp, RowPartials
from .base import FUSED_DTYPES, KernelSettings, Requirements
from .extension import ExtensionBackend, load

_native_bfloat16: Optional[bool] = None


def bfloat16_gemm() -> str:
    """The dtype the cpu backend's GEMMs run in for bfloat16 inputs, "bfloat16" (native) or
    "float32" (converted chunks): native where this CPU has AVX512-BF16 or AMX, unless
    `use_native_bfloat16_gemm` said otherwise."""
    global _native_bfloat16
    if _native_bfloat16 is None:
        _native_bfloat16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bfloat16" if _native_bfloat16 else "float32"


def use_native_bfloat16_gemm(native: bool) -> None:
    """Run the GEMMs of bfloat16 inputs in bfloat16 (True) or on float32 copies (False), for the
    rest of the process."""
    global _native_bfloat16
    if not isinstance(native, bool):
        raise TypeError(f"native must be a bool, got {type(native).__name__}")
    _native_bfloat16 = native


class CpuBackend(ExtensionBackend):
    """C++ with ATen GEMMs (MKL/OpenBLAS, oneDNN for bfloat16) and OpenMP for CPU tensors."""

    name = "cpu"
    device_type = "cpu"
    keeps_norms = False
    """The backward computes its own inverse norms, chunk by chunk: that pass over a chunk of W brings
    it into cache for the chunk's GEMM, so reading the forward's instead made a step no faster (about
    2% slower at B = 256, C = 200k, D = 128 fp32 on 2 cores: the GEMM then streams W itself)."""
    requirements = Requirements("cpu", FUSED_DTYPES)

    def forward_norms(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor,
                      kernel: KernelSettings) -> tuple[RowPartials, Tensor, Tensor]:
        _configure()
        return super().forward_norms(x, w, y, target_logit, kernel)

    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool, need_w: bool,
                  inv_x: Optional[Tensor] = None, inv_w: Optional[Tensor] = None) -> tuple[Optional[Tensor],
                                                                                          Optional[Tensor]]:
        _configure()
        return super().gradients(x, w, y, target_logit, target_slope, lse, upstream, kernel, need_x, need_w, inv_x,
                                 inv_w)


def _configure() -> None:
    """Hand the process's bfloat16 GEMM choice to the extension."""
    load("cpu").use_native_bf16_gemm(bfloat16_gemm() == "bfloat16")
