"""The `cpu` backend: the chunked algorithm in C++ with ATen GEMMs and OpenMP (csrc/cpu.cpp)."""

from __future__ import annotations

from .extension import ExtensionBackend


class CpuBackend(ExtensionBackend):
    """C++ with ATen GEMMs (MKL/OpenBLAS) and OpenMP for CPU tensors."""

    name = "cpu"
    device_type = "cpu"
