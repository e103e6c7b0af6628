"""A small Triton kernel compiled for sm_90 and read by bench/sass.py: run as a script without
TRITON_INTERPRET (tests/test_model.py does), it prints the read as one JSON object.

The kernel: a 64 × 32 float32 accumulator over K in steps of 64 with 4 warps (one warpgroup), so
its loop holds 4 wgmma m64n32k16, both operands from shared memory."""

import json
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sass  # noqa: E402
from marginfused.kernels.compile_check import compile_kernel  # noqa: E402


@triton.jit
def small_dot(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m, n, k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(b_ptr + (k0 + k)[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + m[:, None] * BLOCK_N + n[None, :], acc)


if __name__ == "__main__":
    kernel = compile_kernel(small_dot, {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32"},
                            dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64), 4, 3, 90)
    print(json.dumps(sass.read_compiled(kernel)))
