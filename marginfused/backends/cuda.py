"""The `cuda` backend, where Triton cannot run: the chunked algorithm (csrc/driver.h) with cuBLAS
GEMMs through ATen and hand-written CUDA kernels (csrc/cuda.cu)."""

from __future__ import annotations

from .base import FUSED_DTYPES, Requirements
from .extension import ExtensionBackend


class CudaBackend(ExtensionBackend):
    """ATen (cuBLAS) GEMMs and hand-written CUDA kernels for CUDA tensors, built for the GPU at hand;
    its sources are compiled for sm_75, sm_80 and sm_90 by `make check-cuda` (nvcc 13 builds no older
    target)."""

    name = "cuda"
    device_type = "cuda"
    requirements = Requirements("cuda", FUSED_DTYPES, (7, 5),
                                "the cuda backend's sources are compiled and checked for sm_75 and later")
