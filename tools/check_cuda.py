"""`make check-cuda`: compile every CUDA source of marginfused with nvcc for sm_75, sm_80 and sm_90
(compile only: no GPU, and no CUDA build of torch, needed), warnings as errors.

- each csrc/*.cu: `nvcc -c` against torch's headers, -gencode for sm_75, sm_80 and sm_90, with
  `--Werror all-warnings`, host `-Wall -Wextra -Werror`, and ptxas register-spill warnings as
  errors; torch's own headers are -isystem, so only our code is judged. (Local-memory use is not
  an error: sinf/cosf keep a 28-byte stack frame for the Payne-Hanek reduction of huge arguments,
  a path our bounded angles never take.)
- csrc/cuda_bindings.cpp (the host side of the cuda extension): a g++ syntax check with the
  same warnings.

The .cu files include only ATen/c10 headers, never cuBLAS ones, so the headers of a CPU-only torch
wheel suffice. C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips c10/cuda/impl/cuda_cmake_macros.h, which only
CUDA builds of torch generate (it sets DLL-export macros, irrelevant on Linux).

`python tools/check_cuda.py [FILE.cu ...]` checks the named files instead (the tests use it to
prove a warning fails the check). Exit status: 0 all compiled, 1 a compile failed, 2 no nvcc found (nothing checked). nvcc is taken
from $NVCC, then PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ARCHS = ("75", "80", "90")
ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def extension_flags() -> list[str]:
    """The flags torch's JIT build gives nvcc (cpp_extension.COMMON_NVCC_FLAGS), so the check
    compiles what a real build would."""
    from torch.utils import cpp_extension

    return list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))


def include_flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = [*include_paths(), sysconfig.get_paths()["include"]]
    return [flag for d in dirs for flag in ("-isystem", d)]


def run(command: list[str]) -> bool:
    print("$ " + " ".join(command), flush=True)
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if output:
        print(output)
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"  -> {status} in {time.monotonic() - start:.0f} s", flush=True)
    return result.returncode == 0


def main(argv: list[str]) -> int:
    """Check csrc/*.cu, or the .cu files named on the command line."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("check-cuda: SKIPPED - no nvcc found (set NVCC or CUDA_HOME); nothing was compiled")
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"check-cuda: {nvcc} ({version[-1] if version else 'unknown version'})")
    includes = include_flags()
    sources = [Path(a) for a in argv] or sorted(CSRC.glob("*.cu"))
    if not sources:
        print("check-cuda: no .cu files in csrc/")
        return 1
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            command = [
                nvcc, "-c", str(source), "-o", os.path.join(tmp, source.stem + ".o"),
                "-std=c++20", "-O3", "--threads", "2", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *extension_flags(),
                "-DTORCH_EXTENSION_NAME=check_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
                *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
                "--Werror", "all-warnings", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror",
                "-Xptxas", "-warn-spills,-Werror",
            ]
            ok &= run(command)
        bindings = CSRC / "cuda_bindings.cpp"
        if not argv and bindings.exists():
            cxx = os.environ.get("CXX", "g++")
            ok &= run([cxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror",
                       "-DTORCH_EXTENSION_NAME=check_cuda", *includes, str(bindings)])
    print("check-cuda: " + ("all CUDA sources compile" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
