"""The suite's tolerances hold when the floating-point code paths under it change.

ATen picks its vectorised kernels by ATEN_CPU_CAPABILITY, MKL its GEMM kernels by
MKL_ENABLE_INSTRUCTIONS, and the OpenMP thread count changes how sums are split: other machines
run other paths. The whole suite is run under each of these before a tolerance is trusted (see
tests/helpers.py); here the contract tests of the backends ATen, MKL and OpenMP serve (`torch`,
`cpu`) are re-run under two variations on every run, so a tolerance fitted to one machine's
rounding shows up here first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIATIONS = {
    "default-capability-3-threads": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "3"},
    "mkl-avx2-1-thread": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_NUM_THREADS": "1"},
}


@pytest.mark.parametrize("variation", list(VARIATIONS))
def test_truth_tests_hold_under_other_code_paths(variation):
    env = {**os.environ, **VARIATIONS[variation]}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py",
         "-k", "cpu or torch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
