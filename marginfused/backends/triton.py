"""The `triton` backend: host launchers of the fused Triton kernels, as a Backend.

The kernels live in `marginfused.kernels` (kernels/ in the source tree; the math is written out
in kernels/forward.py, kernels/backward.py and kernels/project.py). They are imported on first
use, and `import marginfused` works where Triton is not installed.

Memory: forward O(n_splits·B) partials; backward an (n_splits, B, D) float32 buffer of the
embeddings' gradient partials, and W's gradient itself (written once per element, in W's dtype:
no (C, D) float32 buffer, no atomics). n_splits ≤ 256 does not grow with C (n_splits·B·D·4 bytes
≈ 35 MB at D = 512 on a 132-SM GPU, whatever B); nothing of B×C elements is ever allocated. The
backward is deterministic: every sum runs in a fixed order.
"""

from __future__ import annotations

import contextlib
import functools
import re
from types import SimpleNamespace
from typing import NamedTuple, Optional

import numpy
import torch
from torch import Tensor

from ..kernels import configs
from ..negatives import NegativesRule
from ..partials import LogSumExp, RowPartials
from . import lift
from .base import FUSED_DTYPES, KernelSettings, Requirements
from .ops import FusedBackend

CAPABILITY_REASON = ("the triton backend's configurations are compiled and checked for sm_80 and later "
                     "(kernels/compile_check.py); older GPUs (V100, T4) take the cuda backend")


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """The kernel modules, imported on first use (this imports triton)."""
    from ..kernels import backward, forward, norms, project

    return SimpleNamespace(forward=forward, backward=backward, project=project, norms=norms)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer a kernel fills, every element of it."""
    return torch.empty(shape, dtype=dtype, device=device)


def _arch(device: torch.device) -> int:
    """The compute capability of the tensors' GPU as 90 for sm_90 (0 for CPU tensors)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _on_the_tensors_device(method):
    """Run a backend method's launches on its embeddings' GPU, not the current one (a no-op for
    CPU tensors)."""

    @functools.wraps(method)
    def launch(self, x: Tensor, *args, **kwargs):
        with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
            return method(self, x, *args, **kwargs)

    return launch


def _inverse_norms(rows: Tensor) -> Tensor:
    """1/max(‖row‖, 1e-12) of every row, float32: the pre-pass (kernels/norms.py)."""
    tiles = configs.project_tiles()
    out = _empty((rows.shape[0],), torch.float32, rows.device)
    _kernels().norms.inverse_norms_kernel[(_cdiv(rows.shape[0], tiles.block_b),)](
        rows, out, rows.shape[0], rows.shape[1], rows.stride(0),
        BLOCK_R=tiles.block_b, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
    )
    return out


def _gradient_lifts(dtype: torch.dtype, upstream: Tensor, target_slope: Tensor, scale: float, inv_x: Tensor,
                    inv_w: Tensor, rule: Optional[NegativesRule]) -> tuple[Tensor, Tensor]:
    """The fp16 lift (`lift.py`) of the embeddings' and of the class centres' backward kernel, whose
    dot operands are G·r_w and G·r_x (kernels/backward.py); both 1 for other dtypes."""
    if dtype != torch.float16:
        one = torch.ones(1, dtype=torch.float32, device=upstream.device)
        return one, one
    rows = lift.row_bounds(upstream, target_slope, scale, rule)
    return (lift.lift(lift.largest(rows) * lift.largest(lift.nonzero_rows(inv_w))),
            lift.lift(lift.largest(rows * lift.nonzero_rows(inv_x))))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision unless PyTorch itself allows TF32 for matmuls; 16-bit
    operands go to the tensor cores as they are ("tf32", Triton's default, changes nothing there)."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class _Plan(NamedTuple):
    """How one kernel is launched."""

    name: str  # "forward", "row_grad" or "class_grad"
    kernel: object  # the jitted kernel, or its autotuned wrapper
    meta: dict  # block sizes and warps (BLOCK_G only, when autotuning picks the others)
    tiles: configs.Tiles  # the fixed configuration
    autotuned: bool


_KERNELS = {
    "forward": ("forward", "row_partials_kernel", configs.forward_tiles),
    "row_grad": ("backward", "row_grad_kernel", configs.row_grad_tiles),
    "class_grad": ("backward", "class_grad_kernel", configs.class_grad_tiles),
}
"""Each kernel's module, name and fixed configuration."""


def _plan(kernel: str, x: Tensor, subcenters: int) -> _Plan:
    """The "forward", "row_grad" or "class_grad" kernel and its launch settings (for `subcenters`
    rows of W per class)."""
    module, name, fixed = _KERNELS[kernel]
    tiles = fixed(x.dtype, _arch(x.device), subcenters)
    sliced = {"BLOCK_G": tiles.block_g} if tiles.block_g else {}
    if configs.autotuning(x.dtype, subcenters):
        return _Plan(kernel, configs.autotuned(kernel), sliced, tiles, True)
    meta = {"BLOCK_B": tiles.block_b, "BLOCK_C": tiles.block_c, "BLOCK_D": tiles.block_d,
            "num_warps": tiles.num_warps, "num_stages": tiles.num_stages, **sliced}
    return _Plan(kernel, getattr(getattr(_kernels(), module), name), meta, tiles, False)


def _programs_per_wave(plan: _Plan, device: torch.device, launch: tuple, constexprs: dict) -> int:
    """Programs of the planned kernel that the GPU runs at once: its occupancy, from the compiled
    kernel's registers and shared memory (Triton compiles it here for the launch's arguments and
    caches it for the launch), times the SMs."""
    props = torch.cuda.get_device_properties(device)
    compiled = plan.kernel.warmup(*launch, grid=(1,), **constexprs, **plan.meta)
    compiled._init_handles()  # loads the binary: the driver reports its registers
    registers = getattr(props, "regs_per_multiprocessor", 65536)  # 64K on every target from sm_50 on
    per_sm = configs.programs_per_sm(
        compiled.n_regs, plan.meta["num_warps"], compiled.metadata.shared, registers,
        props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)
    return per_sm * props.multi_processor_count


def _class_splits(plan: _Plan, x: Tensor, num_classes: int, slices: int, launch: tuple,
                  constexprs: dict) -> tuple[int, int]:
    """(n_splits, classes_per_split) of a kernel with ⌈B/BLOCK_B⌉ × n_splits × `slices` programs:
    as many splits as fill one wave of the GPU (a fixed
    number under the interpreter), never growing with C; splits aligned to SPLIT_ALIGN, every
    split non-empty. `launch` holds the launch's arguments, with a tensor of the right dtype where
    an output depends on the splits and classes_per_split = SPLIT_ALIGN (the compiler specialises
    on nothing else of them).

    With autotuning the configuration comes with the launch: BLOCK_B is the smallest candidate's
    and the occupancy PROGRAMS_PER_SM."""
    align = configs.split_align()
    if configs.interpreting():
        wanted = configs.INTERPRET_SPLITS
    else:
        if plan.autotuned:
            block_b = min(t.block_b for t in configs.AUTOTUNE[plan.name])
            wave = configs.PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
        else:
            block_b = plan.tiles.block_b
            wave = _programs_per_wave(plan, x.device, launch, constexprs)
        wanted = configs.splits_for_one_wave(wave, _cdiv(x.shape[0], block_b) * slices)
    wanted = max(1, min(wanted, _cdiv(num_classes, align)))
    per_split = _cdiv(_cdiv(num_classes, wanted), align) * align
    return _cdiv(num_classes, per_split), per_split


def _bucket(batch: int) -> int:
    return 1 << max(0, (batch - 1).bit_length())


def _rule_arguments(rule: Optional[NegativesRule], target_logit: Tensor,
                    subcenters: int) -> tuple[tuple, float, dict]:
    """The kernels' (τ, a) pointers, q and variant constants: NEGATIVES_RULE for a negatives rule or
    none (then the pointers are never read: any float32 vector stands in), SUBCENTERS."""
    variant = {"NEGATIVES_RULE": rule is not None, "SUBCENTERS": subcenters}
    if rule is None:
        return (target_logit, target_logit), 0.0, variant
    return (rule.threshold, rule.offset), rule.quadratic, variant


def _split_partials(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings) -> RowPartials:
    """Per-split partials: each field (n_splits, B), splits in class order."""
    batch, dim = x.shape
    local = kernel.shard_classes(w)
    plan = _plan("forward", x, kernel.subcenters)
    inv_x, inv_w = _inverse_norms(x), _inverse_norms(w)
    rule, quadratic, variant = _rule_arguments(kernel.negatives_rule, target_logit, kernel.subcenters)
    scalars = (float(kernel.scale), int(kernel.ignore_index), quadratic)

    def arguments(outputs, per_split: int) -> tuple:
        return (x, w, y, inv_x, inv_w, target_logit, *rule, *outputs, batch, local, dim, x.stride(0), w.stride(0),
                kernel.class_start, per_split, _bucket(batch), *scalars)

    placeholders = (inv_x, inv_x, inv_x, inv_x, y)  # the outputs' dtypes, for the occupancy query
    precision = {"DOT_PRECISION": _dot_precision(x.dtype), **variant}
    n_splits, per_split = _class_splits(plan, x, local, 1, arguments(placeholders, configs.split_align()), precision)
    shape = (n_splits, batch)
    out = RowPartials(
        max=_empty(shape, torch.float32, x.device),
        sumexp=_empty(shape, torch.float32, x.device),
        logit_sum=_empty(shape, torch.float32, x.device),
        best_cos=_empty(shape, torch.float32, x.device),
        best_class=_empty(shape, torch.int64, x.device),
    )
    plan.kernel[lambda meta: (_cdiv(batch, meta["BLOCK_B"]), n_splits)](
        *arguments(out, per_split), **precision, **plan.meta,
    )
    return out


def _prepare(x: Tensor, w: Tensor, y: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """Contiguous inputs, int64 labels, and per-row float32 vectors, all detached."""
    return (x.detach().contiguous(), w.detach().contiguous(), y.contiguous().long(),
            *(r.detach().to(torch.float32).contiguous() for r in rows))


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels with the installed numpy, or None. Before
    Triton 3.7 it takes every loop bound with `int()` of a one-element array, which numpy 2.4 and
    later refuse (triton issue #9171): every kernel's first runtime loop fails. Compiled kernels on a
    GPU are not affected."""
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                f"{numpy.__version__} (triton issue #9171, fixed in Triton 3.7): install numpy<2.4 or Triton>=3.7")
    return None


class TritonBackend(FusedBackend):
    """Fused Triton kernels: forward and backward tiled over classes, never storing B×C.

    Runs on CUDA tensors; with TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter
    (slow; float32 and float16 only: the interpreter computes bfloat16 dots wrongly, triton
    issue #11584).
    """

    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except Exception as error:  # ImportError, or a broken install
            return f"triton cannot be imported ({type(error).__name__}: {error})"
        if configs.interpreting():
            return _interpreter_problem()
        if not torch.cuda.is_available():
            return (
                "no CUDA GPU is present and TRITON_INTERPRET=1 is not set "
                "(set it to run the kernels on CPU tensors through Triton's interpreter)"
            )
        return None

    @property
    def requirements(self) -> Requirements:
        """CUDA tensors of compute capability 8.0 or later, the targets whose configurations the
        compile check builds and reads (kernels/compile_check.py); under TRITON_INTERPRET=1, CPU
        tensors, and no bfloat16 (the interpreter computes bfloat16 dots wrongly, triton #11584)."""
        if configs.interpreting():
            return Requirements("cpu", (torch.float32, torch.float16))
        return Requirements("cuda", FUSED_DTYPES, (8, 0), CAPABILITY_REASON)

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if configs.interpreting() and device.type != "cpu":
            return f"under TRITON_INTERPRET=1 the kernels run on CPU tensors only, got {device.type} tensors"
        if configs.interpreting() and dtype == torch.bfloat16:
            return ("bfloat16 under TRITON_INTERPRET=1 is not supported: the interpreter computes "
                    "bfloat16 dot products wrongly (triton issue #11584); use a GPU or backend='torch'")
        if not configs.interpreting() and device.type != "cuda":
            return f"needs CUDA tensors, got {device.type} tensors (or set TRITON_INTERPRET=1 for CPU tensors)"
        return super().unsupported_reason(device, dtype)

    @_on_the_tensors_device
    def partials(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings) -> RowPartials:
        """Partials over the shard's classes, one per class split (y global labels; labels outside
        the shard contribute no target)."""
        x, w, y, target_logit = _prepare(x, w, y, target_logit)
        with torch.no_grad():
            return _split_partials(x, w, y, target_logit, kernel)

    @_on_the_tensors_device
    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool,
                  need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        x, w, y, target_logit, target_slope, row_max, log_sumexp, upstream = _prepare(
            x, w, y, target_logit, target_slope, lse.max, lse.log_sumexp, upstream)
        batch, dim = x.shape
        local = kernel.shard_classes(w)
        inv_x, inv_w = _inverse_norms(x), _inverse_norms(w)
        lift_for_x, lift_for_w = _gradient_lifts(x.dtype, upstream, target_slope, kernel.scale, inv_x, inv_w,
                                                 kernel.negatives_rule)
        rule, quadratic, variant = _rule_arguments(kernel.negatives_rule, target_logit, kernel.subcenters)
        inputs = (x, w, y, inv_x, inv_w, target_logit, target_slope, *rule, row_max, log_sumexp, upstream)
        shapes = (batch, local, dim, x.stride(0), w.stride(0), kernel.class_start)
        scalars = (float(kernel.scale), int(kernel.ignore_index), 1.0 - kernel.label_smoothing,
                   kernel.smoothing_per_class, quadratic)
        precision = _dot_precision(x.dtype)
        project = _kernels().project.project_kernel
        ptiles = configs.project_tiles()
        dx = dw = None

        if need_x:
            plan = _plan("row_grad", x, kernel.subcenters)
            slices = _cdiv(dim, plan.tiles.block_g)

            def arguments(partials: Tensor, per_split: int) -> tuple:
                return (*inputs, lift_for_x, partials, *shapes, per_split, _bucket(batch), *scalars)

            n_splits, per_split = _class_splits(plan, x, local, slices, arguments(inv_x, configs.split_align()),
                                                {"DOT_PRECISION": precision, **variant})
            dx_part = _empty((n_splits, batch, dim), torch.float32, x.device)
            plan.kernel[lambda meta: (_cdiv(batch, meta["BLOCK_B"]), n_splits, slices)](
                *arguments(dx_part, per_split), DOT_PRECISION=precision, **variant, **plan.meta,
            )
            dx = _empty((batch, dim), x.dtype, x.device)
            project[(_cdiv(batch, ptiles.block_b),)](
                dx_part, x, inv_x, dx, batch, dim, x.stride(0), n_splits,
                BLOCK_R=ptiles.block_b, BLOCK_D=ptiles.block_d, num_warps=ptiles.num_warps,
            )
        if need_w:
            plan = _plan("class_grad", x, kernel.subcenters)
            slices = _cdiv(dim, plan.tiles.block_g)
            dw = _empty(tuple(w.shape), w.dtype, w.device)
            plan.kernel[lambda meta: (_cdiv(local, meta["BLOCK_C"]), slices, kernel.subcenters)](
                *inputs, lift_for_w, dw, *shapes, _bucket(batch), *scalars,
                DOT_PRECISION=precision, **variant, **plan.meta,
            )
        return dx, dw
