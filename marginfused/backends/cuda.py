"""The `cuda` backend, where Triton cannot run: the chunked algorithm with cuBLAS GEMMs through
ATen and hand-written CUDA kernels (csrc/cuda.cu)."""

from __future__ import annotations

from .extension import ExtensionBackend


class CudaBackend(ExtensionBackend):
    """ATen (cuBLAS) GEMMs and hand-written CUDA kernels for CUDA tensors."""

    name = "cuda"
    device_type = "cuda"
