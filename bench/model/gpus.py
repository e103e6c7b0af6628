"""The GPUs the model knows, by their published figures, and the assumptions every prediction shares
(each with its source)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Gpu:
    """Published figures of a GPU (dense tensor-core rates at the boost clock)."""

    name: str
    arch: int  # compute capability, 90 for sm_90
    bf16_tflops: float
    fp32_tflops: float  # without tensor cores
    hbm_tbps: float
    l2_tbps: float  # L2 read bandwidth: published microbenchmark figures (see GPUS), not the datasheet
    l2_mb: float  # MiB
    sms: int
    clock_ghz: float  # the boost clock at which bf16_tflops is quoted
    shared_per_sm: int  # bytes
    shared_per_block: int  # bytes, the opt-in limit
    registers_per_sm: int = 65536
    schedulers: int = 4  # warp schedulers per SM, each issuing one instruction per cycle
    shared_bytes_per_clock: int = 128  # per SM: 32 banks of 4 bytes

    @property
    def tensor_flops_per_clock(self) -> float:
        """Dense 16-bit tensor-core FLOPs per cycle per SM: 4096 on Hopper (989 TFLOP/s over 132 SMs
        at 1.83 GHz), 2048 on Ampere (312 over 108 at 1.41)."""
        return self.bf16_tflops * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def l2_bytes(self) -> int:
        return int(self.l2_mb * 2**20)


GPUS = {
    # H100 SXM5: NVIDIA's datasheet (989 dense bf16 TFLOP/s, 3.35 TB/s HBM3, 50 MB L2, 132 SMs) at
    # the 1.83 GHz boost clock its whitepaper computes the peak with. L2: published microbenchmark
    # figures for H100 L2 read bandwidth are 5.5–7 TB/s (Chips and Cheese's H100 article, 2023; the
    # Hopper microbenchmark papers, arXiv 2402.13499 and 2501.12084); the low end is taken until
    # bench/gpu_session.sh's L2 probe measures it.
    "H100": Gpu("H100 SXM", 90, 989.0, 67.0, 3.35, 5.5, 50.0, 132, 1.83, 233472, 232448),
    # H200 SXM: the H100's die, clocks and L2 with 4.8 TB/s of HBM3e (datasheet).
    "H200": Gpu("H200 SXM", 90, 989.0, 67.0, 4.8, 5.5, 50.0, 132, 1.83, 233472, 232448),
    # A100 SXM4 80GB: datasheet (312 bf16 TFLOP/s, 2.04 TB/s, 40 MB L2, 108 SMs, 1.41 GHz). L2: the
    # whitepaper's 5120 bytes per clock (7.2 TB/s) scaled by the low end of H100's measured/theoretical
    # ratio (5.5 of 9.0 TB/s): 4.4 TB/s, an assumption no published A100 figure here confirms.
    "A100": Gpu("A100 SXM 80GB", 80, 312.0, 19.5, 2.04, 4.4, 40.0, 108, 1.41, 167936, 166912),
}


def gpu_named(device_name: str) -> Optional[str]:
    """The key in GPUS of the GPU whose name `device_name` contains ("NVIDIA H100 80GB HBM3" is
    "H100"), or None."""
    return next((key for key in GPUS if key in device_name), None)


MATMUL_EFFICIENCY = 0.8
"""Fraction of the datasheet matmul rate a large GEMM reaches (790 of 989 TFLOP/s measured on an
H200 for bf16, docs/design.md §5): applied to every tensor-core time (it covers clocks under the
boost clock under load). bench/gpu_session.sh measures it."""
LAUNCH_GAP_S = 2e-6
"""Device time between two dependent kernels of one stream or CUDA graph: the upper end of the
1–2 µs usually quoted for a kernel node in a graph (assumed)."""
HOST_LAUNCH_S = 5e-6
"""Host time per kernel launched without a CUDA graph (ATen dispatch and the launch itself): the
~5 µs usually quoted (assumed). A chunk loop of short kernels cannot run faster than its launches."""
ELEMENTWISE_INSTRUCTIONS = 24
"""Instructions per element of the `cuda` backend's row pass and gradient tile (one thread per
element, 16-byte loads, float32 math): assumed (the Triton forward's softmax epilogue reads 37 per
element in its SASS, argmax and 64-bit compares included); a SASS read of the tuned kernels replaces it."""
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GEMM_TILE = 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
