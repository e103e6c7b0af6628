"""Building and loading the C++/CUDA extensions of the `cpu` and `cuda` backends.

The sources ship inside the package (`marginfused.csrc`). On first use each extension is
JIT-built with ninja through the public `torch.utils.cpp_extension.load`, into an explicit,
cached build directory keyed by a hash of the sources, the torch and Python versions and the
compiler flags:

    $MARGINFUSED_BUILD_DIR/<kind>-<hash>      if MARGINFUSED_BUILD_DIR is set
    ~/.cache/marginfused/<kind>-<hash>        otherwise ($XDG_CACHE_HOME honoured)

so a second process (or a second run) loads the built library without compiling. `MAX_JOBS`
is honoured by torch's build. The two extensions are separate libraries, so a failing CUDA
build never takes the `cpu` backend down.

If an extension cannot be built or loaded, the reason is recorded once per process and reported
by `unavailable_reason` (hence `available_backends()`); nothing is retried on every call.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .backend import BackendUnavailableError

SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")

EXTENSIONS: dict[str, dict] = {
    "cpu": {
        "sources": ["cpu.cpp"],
        "cflags": ["-O3", "-fopenmp", "-march=native", "-fno-trapping-math"],
        "cuda_cflags": [],
        "ldflags": ["-fopenmp"],
    },
    "cuda": {
        "sources": ["cuda_bindings.cpp", "cuda.cu"],
        "cflags": ["-O3"],
        "cuda_cflags": ["-O3", "-lineinfo"],
        "ldflags": [],
    },
}
"""Per extension: its translation units (in csrc/) and compiler flags. `-march=native` is safe
because the build happens on the machine that runs it (the CPU model is part of the hash);
`-fno-trapping-math` lets GCC if-convert the clamps so the exp loops vectorise."""

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_failures: dict[str, str] = {}


def source_dir() -> Path:
    """The directory holding the C++/CUDA sources, wherever the package is installed."""
    files = importlib.resources.files("marginfused.csrc")
    return Path(str(files))


def source_files() -> list[Path]:
    """Every C++/CUDA source and header in the package, sorted by name."""
    return sorted(p for p in source_dir().iterdir() if p.suffix in SOURCE_SUFFIXES)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key(kind: str) -> str:
    """A hash of everything the built library depends on."""
    spec = EXTENSIONS[kind]
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sys.version, platform.machine(), _cpu_model(),
                 repr(spec)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_root() -> Path:
    """Where built extensions are cached: $MARGINFUSED_BUILD_DIR or ~/.cache/marginfused."""
    explicit = os.environ.get("MARGINFUSED_BUILD_DIR")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "marginfused"


def _precondition(kind: str) -> Optional[str]:
    """Why the extension cannot even be attempted on this machine, or None."""
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"torch {torch.__version__} was built without CUDA"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found to build the extension (set CUDA_HOME to the one with nvcc)"
    return None


def _build(kind: str) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    spec = EXTENSIONS[kind]
    key = build_key(kind)
    build_dir = build_root() / f"{kind}-{key}"
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    # Build from copies next to the build files: the exact sources of this build, on a real
    # filesystem whatever the installation looks like.
    for path in source_files():
        target = src_dir / path.name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copyfile(path, target)
    return load_extension(
        name=f"marginfused_{kind}_{key}",
        sources=[str(src_dir / name) for name in spec["sources"]],
        # copies: torch's build appends to the lists it is given
        extra_cflags=list(spec["cflags"]),
        extra_cuda_cflags=list(spec["cuda_cflags"]) or None,
        extra_ldflags=list(spec["ldflags"]),
        build_directory=str(build_dir),
        with_cuda=kind == "cuda",
        verbose=os.environ.get("MARGINFUSED_BUILD_VERBOSE") == "1",
    )


def _summarise(error: BaseException, limit: int = 1500) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else "... " + text[-limit:]


def unavailable_reason(kind: str) -> Optional[str]:
    """None if the `kind` extension is (now) loaded, else why it cannot be. Builds it on first call."""
    if kind in _modules:
        return None
    with _lock:
        if kind in _modules:
            return None
        if kind not in _failures:
            reason = _precondition(kind)
            if reason is None:
                try:
                    _modules[kind] = _build(kind)
                    return None
                except Exception as error:  # noqa: BLE001 - any build/load failure is reported, not raised
                    reason = f"the {kind} C++ extension could not be built or loaded: {_summarise(error)}"
            _failures[kind] = reason
        return _failures[kind]


def load(kind: str) -> ModuleType:
    """The loaded `kind` extension, or BackendUnavailableError with the reason it cannot be."""
    reason = unavailable_reason(kind)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return _modules[kind]
