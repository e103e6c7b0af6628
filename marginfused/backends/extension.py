"""The C++/CUDA extensions of the `cpu` and `cuda` backends: building, loading, and the one place
Python calls them (by keyword), as `ExtensionBackend`.

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
import logging
import importlib.resources
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..negatives import NegativesRule
from ..normalize import inverse_norms
from ..partials import LogSumExp, RowPartials
from . import lift
from .chunks import GpuShape, cuda_chunk_classes, cuda_dx_splits, cuda_forward_chunk_classes
from .base import BackendUnavailableError, ForwardSaved, KernelSettings
from .ops import FusedBackend

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

_log = logging.getLogger("marginfused")
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
    if not (build_dir / f"marginfused_{kind}_{key}.so").exists():
        _log.warning("marginfused: building the %s extension (~30 s, once; cached in %s)", kind, build_dir)
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


CPU_TILE_BYTES = 1 << 20
"""One B×chunk fp32 tile per thread, cache-sized."""
MIN_CHUNK = 16


def gpu_shape(device: torch.device) -> GpuShape:
    """The SMs and L2 bytes of a CUDA device, what its chunks are sized from (chunks.py)."""
    properties = torch.cuda.get_device_properties(device)
    return GpuShape(properties.multi_processor_count, properties.L2_cache_size)


def chunk_size(device: torch.device, batch: int, dim: int, dtype: torch.dtype) -> int:
    """Rows of W per chunk of the backward for a (batch × dim) x of `dtype` (the extensions round it
    down to whole classes of sub-centres): on the CPU one B×chunk fp32 tile within CPU_TILE_BYTES, a
    core's cache; on a GPU `cuda_chunk_classes`, enough that the split dX GEMM fills every SM."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_chunk_classes(gpu_shape(device), batch, dim, dtype)
    return max(MIN_CHUNK, CPU_TILE_BYTES // (4 * batch))


def forward_chunk_size(device: torch.device, batch: int, dim: int, dtype: torch.dtype) -> int:
    """Rows of W per chunk of the forward: on a GPU `cuda_forward_chunk_classes` (its own working set
    within L2: no H, no dX GEMM to fill the SMs with); on the CPU the backward's (`chunk_size`: the
    same fp32 tile per thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_forward_chunk_classes(gpu_shape(device), batch, dim, dtype)
    return chunk_size(device, batch, dim, dtype)


def dx_splits(device: torch.device, batch: int, dim: int, chunk: int) -> int:
    """Ways the dX GEMM of a chunk splits its depth: on a GPU `cuda_dx_splits` (its few output tiles
    fill the SMs only so); 1 on the CPU, whose threads each run their own chunks' GEMMs."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_dx_splits(gpu_shape(device), batch, dim, chunk)
    return 1


def gradient_tile_lift(x: Tensor, w: Tensor, upstream: Tensor, target_slope: Tensor, scale: float,
                       rule: Optional[NegativesRule], inv_x: Optional[Tensor] = None,
                       inv_w: Optional[Tensor] = None) -> Tensor:
    """The cuda backend's fp16 lift (`lift.py`) as (2^k, 2^-k) float32: its one gradient tile
    U = G·q·r carries both inverse norms, so its bound is max_i(bound_i·q_i)·max_j r_j over the
    rows that are not zero rows. The forward's inverse norms where given, else one pass over W for
    them (float16 inputs only)."""
    rows = lift.row_bounds(upstream, target_slope, scale, rule)
    q = inverse_norms(x) if inv_x is None else inv_x
    r = inverse_norms(w) if inv_w is None else inv_w
    factor = lift.lift(lift.largest(rows * lift.nonzero_rows(q)) * lift.largest(lift.nonzero_rows(r)))
    return torch.cat([factor, 1.0 / factor])


def _row_data(t: Tensor) -> Tensor:
    """A (B,) or (2,) vector as the extensions read it: detached, contiguous float32."""
    return t.detach().float().contiguous()


class ExtensionBackend(FusedBackend):
    """A backend running the chunked C++ extension built for `device_type` tensors (csrc/).

    Both walk the classes in chunks of a size fixed by the batch, the device and the pass
    (`forward_chunk_size`, `chunk_size`), however many classes there are: per chunk one GEMM for the
    raw dot products (normalisation folded in as row and column scales, no normalised copy of W),
    then one fused pass that puts the supplied target logit on each row's target column and folds the
    chunk into its split's running max / sum-exp, logit sum and argmax; the splits' partials come back
    unmerged, with the inverse norms of x's and W's rows the forward computed (`forward_norms`),
    which `forward` keeps where `keeps_norms` (`ForwardSaved`, carried by the loss operator; in a
    sharded head each rank's inv_w is its shard's rows) and `backward` hands the extension, which
    reads them instead of computing them again. The backward pass
    recomputes each chunk, forms the gradient tile with p = exp((z − m) − log s) from the
    log-sum-exp as `LogSumExp` keeps it, and accumulates dX̂ and dŴ with two more GEMMs, then
    projects through the normalisation (the math is written out in csrc/driver.h). Inputs may be
    float32, float16 or bfloat16; everything after the GEMMs is computed in fp32.
    """

    device_type: ClassVar[str]
    keeps_norms: ClassVar[bool] = True
    """Whether `forward` keeps the inverse norms for `backward` (ForwardSaved), else keeps nothing and
    the backward computes them again."""

    def unavailable_reason(self) -> Optional[str]:
        return unavailable_reason(self.device_type)

    def _call(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings,
              inv_x: Optional[Tensor] = None, inv_w: Optional[Tensor] = None, **backward):
        """The extension's one argument (csrc/common.h, Call), built here alone: the tensors and the
        kernel settings by name, the pass's chunking (the forward's where no backward tensors are
        given), and the backward's (B,) tensors, fp16 lift and the forward's inverse norms where given."""
        rule = kernel.negatives_rule
        batch, dim = x.shape
        chunk = (chunk_size if backward else forward_chunk_size)(x.device, batch, dim, x.dtype)
        norms = {} if inv_x is None else dict(inv_x=inv_x.contiguous(), inv_w=inv_w.contiguous())
        return load(self.device_type).Call(
            x=x.detach().contiguous(), w=w.detach().contiguous(), y=y.long().contiguous(),
            target_logit=_row_data(target_logit),
            rule_threshold=None if rule is None else rule.threshold, rule_offset=None if rule is None else rule.offset,
            rule_quadratic=0.0 if rule is None else rule.quadratic, scale=kernel.scale,
            ignore_index=kernel.ignore_index, label_smoothing=kernel.label_smoothing, subcenters=kernel.subcenters,
            num_classes=kernel.num_classes, class_start=kernel.class_start, chunk=chunk,
            dx_splits=dx_splits(x.device, batch, dim, chunk),
            **{name: None if t is None else _row_data(t) for name, t in backward.items()}, **norms,
        )

    def forward_norms(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor,
                      kernel: KernelSettings) -> tuple[RowPartials, Tensor, Tensor]:
        """`partials`, and the inverse norms 1/max(‖v‖, 1e-12) of x's rows (B,) and of the shard's rows
        (R,), float32, that the forward computed on the way (for `gradients`)."""
        *partials, inv_x, inv_w = load(self.device_type).forward_partials(self._call(x, w, y, target_logit, kernel))
        return RowPartials(*partials), inv_x, inv_w

    def partials(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings) -> RowPartials:
        return self.forward_norms(x, w, y, target_logit, kernel)[0]

    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool,
                  need_w: bool, inv_x: Optional[Tensor] = None,
                  inv_w: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """`FusedBackend.gradients`; given the forward's inverse norms (`forward_norms`, both or
        neither), the extension reads them instead of computing them again."""
        lift = None
        if self.device_type == "cuda" and x.dtype == torch.float16:
            lift = gradient_tile_lift(x, w, upstream.float(), target_slope.float(), kernel.scale, kernel.negatives_rule,
                                      inv_x, inv_w)
        call = self._call(x, w, y, target_logit, kernel, inv_x, inv_w, target_slope=target_slope, row_max=lse.max,
                          log_sumexp=lse.log_sumexp, upstream=upstream, lift=lift)
        return load(self.device_type).backward(call, need_x=need_x, need_w=need_w)

    def forward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                kernel: KernelSettings, need_x: bool) -> tuple[RowPartials, ForwardSaved]:
        """The partials, and the inverse norms of x's rows and of the shard's rows that the extension
        computed on the way, kept for `backward` (no weighted centres: the backward recomputes each
        chunk)."""
        partials, inv_x, inv_w = self.forward_norms(x, w, y, target_logit, kernel)
        if not self.keeps_norms:
            return partials, ForwardSaved.nothing(x)
        return partials, ForwardSaved(x.new_empty(0, dtype=torch.float32), inv_x, inv_w)

    def saved_like(self, x: Tensor, w: Tensor, need_x: bool) -> ForwardSaved:
        """What `forward` keeps, empty: no weighted centres, (B,) and (R,) float32 inverse norms."""
        if not self.keeps_norms:
            return ForwardSaved.nothing(x)
        return ForwardSaved(x.new_empty(0, dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32),
                            w.new_empty(w.shape[0], dtype=torch.float32))

    def backward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                 lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool, need_w: bool,
                 saved: ForwardSaved) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """`gradients`, reading the forward's inverse norms where `saved` holds them (one per row of x
        and of this shard), else computing them."""
        kept = saved.inv_x.shape == (x.shape[0],) and saved.inv_w.shape == (w.shape[0],)
        norms = (saved.inv_x, saved.inv_w) if kept else (None, None)
        return self.gradients(x, w, y, target_logit, target_slope, lse, upstream, kernel, need_x, need_w, *norms)
