"""The `triton` backend: host launchers of the fused Triton kernels, as a Backend.

The kernels live in `marginfused.kernels` (kernels/ in the source tree; the math is written out
in kernels/forward.py and kernels/backward.py). They are imported on first use, and
`import marginfused` works where Triton is not installed.

Forward: the inverse norms of x and of the shard of W (kernels/norms.py), then the forward kernel
(partials per class split and, when x needs a gradient, the weighted centres O per split). Both are
kept for the backward (`ForwardSaved`), which assembles the embeddings' gradient from O in O(B·D)
(`_embeddings_grad`, with a second pass of the forward kernel for the smoothing term when ε > 0)
and runs the dW kernel (kernels/backward.py).

Memory: the forward's (n_splits, B, D) float32 weighted centres (merged to (B, D) and kept for the
backward), O(n_splits·B) partials, and W's gradient itself (written once per element, in W's dtype:
no (C, D) float32 buffer, no atomics). n_splits ≤ 256 does not grow with C, and n_splits·B·D·4 bytes
stays about one wave of programs' rows × D × 4 whatever B (kernels/configs.py MAX_SPLITS); nothing of B×C elements is ever allocated. Every sum
runs in a fixed order: forward and backward are deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from types import SimpleNamespace
from typing import NamedTuple, Optional

import numpy
import torch
from torch import Tensor

from ..kernels import configs
from ..negatives import NegativesRule
from ..partials import LogSumExp, RowPartials, merge_centres
from ..target import target_logit_grad
from . import lift
from .base import FUSED_DTYPES, ForwardSaved, KernelSettings, Requirements
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
    tiles = configs.norms_tiles()
    out = _empty((rows.shape[0],), torch.float32, rows.device)
    _kernels().norms.inverse_norms_kernel[(_cdiv(rows.shape[0], tiles.block_b),)](
        rows, out, rows.shape[0], rows.shape[1], rows.stride(0),
        BLOCK_R=tiles.block_b, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
    )
    return out


def _ones(device: torch.device) -> Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def _forward_lift(dtype: torch.dtype, target_slope: Tensor, scale: float, inv_w: Tensor,
                  rule: Optional[NegativesRule]) -> Tensor:
    """The fp16 lift (`lift.py`) of the forward kernel's P̃ = exp(z − m)·(∂z/∂c)/s·r_w (and of its
    smoothing pass's (∂z/∂c)/s·r_w); 1 for other dtypes."""
    if dtype != torch.float16:
        return _ones(inv_w.device)
    bound = lift.largest(lift.slope_ratio_bounds(target_slope, scale, rule)) * lift.largest(lift.nonzero_rows(inv_w))
    return lift.lift(bound)


def _weight_grad_lift(dtype: torch.dtype, upstream: Tensor, target_slope: Tensor, scale: float, inv_x: Tensor,
                      rule: Optional[NegativesRule]) -> Tensor:
    """The fp16 lift of the dW kernel's G·r_x (kernels/backward.py); 1 for other dtypes."""
    if dtype != torch.float16:
        return _ones(inv_x.device)
    return lift.lift(lift.largest(lift.row_bounds(upstream, target_slope, scale, rule) * lift.nonzero_rows(inv_x)))


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision unless PyTorch itself allows TF32 for matmuls; 16-bit
    operands go to the tensor cores as they are ("tf32", Triton's default, changes nothing there)."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _meta(tiles: configs.Tiles) -> dict:
    """A configuration's launch arguments."""
    return {"BLOCK_B": tiles.block_b, "BLOCK_C": tiles.block_c, "BLOCK_D": tiles.block_d,
            "BLOCK_G": tiles.block_g, "PARTS": tiles.parts, "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages}


def _programs_per_wave(kernel, tiles: configs.Tiles, device: torch.device, launch: tuple, constexprs: dict) -> int:
    """Programs of a kernel that the GPU runs at once: its occupancy, from the compiled kernel's
    registers and shared memory (Triton compiles it here for the launch's arguments and caches it
    for the launch), times the SMs."""
    props = torch.cuda.get_device_properties(device)
    compiled = kernel.warmup(*launch, grid=(1,), **constexprs, **_meta(tiles))
    compiled._init_handles()  # loads the binary: the driver reports its registers
    registers = getattr(props, "regs_per_multiprocessor", 65536)  # 64K on every target from sm_50 on
    per_sm = configs.programs_per_sm(
        compiled.n_regs, tiles.num_warps, compiled.metadata.shared, registers,
        props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)
    return per_sm * props.multi_processor_count


def _class_splits(kernel, tiles: configs.Tiles, x: Tensor, rows: int, num_classes: int, slices: int,
                  launch: tuple, constexprs: dict) -> tuple[int, int]:
    """(n_splits, classes_per_split) of a kernel with ⌈rows/BLOCK_B⌉ × n_splits × `slices`
    programs: as many splits as fill one wave of the GPU (a fixed number under the interpreter),
    never growing with C; splits aligned to SPLIT_ALIGN, every split non-empty. `launch` holds the
    launch's arguments, with a tensor of the right dtype where an output depends on the splits and
    classes_per_split = SPLIT_ALIGN (the compiler specialises on nothing else of them)."""
    align = configs.split_align()
    if configs.interpreting():
        wanted = configs.INTERPRET_SPLITS
    else:
        wave = _programs_per_wave(kernel, tiles, x.device, launch, constexprs)
        wanted = configs.splits_for_one_wave(wave, _cdiv(rows, tiles.block_b) * slices)
    wanted = max(1, min(wanted, _cdiv(num_classes, align)))
    per_split = _cdiv(_cdiv(num_classes, wanted), align) * align
    return _cdiv(num_classes, per_split), per_split


def _rule_arguments(rule: Optional[NegativesRule], placeholder: Tensor,
                    subcenters: int) -> tuple[tuple, float, dict]:
    """The kernels' (τ, a) pointers, q and variant constants: NEGATIVES_RULE for a negatives rule or
    none (then the pointers are never read: any float32 vector stands in), SUBCENTERS."""
    variant = {"NEGATIVES_RULE": rule is not None, "SUBCENTERS": subcenters}
    if rule is None:
        return (placeholder, placeholder), 0.0, variant
    return (rule.threshold, rule.offset), rule.quadratic, variant


def _launch_forward(x: Tensor, w: Tensor, y: Tensor, inv_x: Tensor, inv_w: Tensor, lift_: Tensor,
                    kernel: KernelSettings, rows: int, softmax: bool,
                    centres: bool) -> tuple[Optional[RowPartials], Optional[Tensor]]:
    """The forward kernel (kernels/forward.py) over the first `rows` rows of x, each row's target
    column left out: per-split partials (each field (n_splits, rows)) where `softmax`, and the
    weighted centres (n_splits, rows, D) where `centres` — the softmax's, or without it the
    smoothing pass's sums of (∂z/∂c)/s·ŵ_j."""
    dim = x.shape[1]
    local = kernel.shard_classes(w)
    tiles = configs.tiles("forward", x.dtype, _arch(x.device), dim, kernel.subcenters,
                         kernel.negatives_rule is not None)
    slices = tiles.slices(dim) if centres else 1
    owns = tiles.launches(slices)
    rule, quadratic, variant = _rule_arguments(kernel.negatives_rule, inv_x, kernel.subcenters)
    constexprs = {"DOT_PRECISION": _dot_precision(x.dtype), "SOFTMAX": softmax, "CENTRES": centres, "OWN": 0,
                  **variant}
    fn = _kernels().forward.forward_kernel

    def arguments(outputs, per_split: int) -> tuple:
        return (x, w, y, inv_x, inv_w, *rule, lift_, *outputs, rows, local, dim, x.stride(0), w.stride(0),
                kernel.class_start, per_split, float(kernel.scale), int(kernel.ignore_index), quadratic)

    placeholders = (inv_x, inv_x, inv_x, inv_x, y, inv_x)  # the outputs' dtypes, for the occupancy query
    n_splits, per_split = _class_splits(fn, tiles, x, rows, local, slices // len(owns),
                                        arguments(placeholders, configs.split_align()), constexprs)
    parts = weighted = None
    if softmax:
        shape = (n_splits, rows)
        parts = RowPartials(*(_empty(shape, torch.float32, x.device) for _ in range(4)),
                            best_class=_empty(shape, torch.int64, x.device))
    if centres:
        weighted = _empty((n_splits, rows, dim), torch.float32, x.device)
    outputs = (*(parts if softmax else placeholders[:5]), weighted if centres else inv_x)
    for own in owns:
        fn[(_cdiv(rows, tiles.block_b), n_splits, slices // len(owns))](
            *arguments(outputs, per_split), **{**constexprs, "OWN": own}, **_meta(tiles))
    return parts, weighted


class _Targets(NamedTuple):
    """Each row's target in the shard: whether it is there (`inside`: a valid label of one of the
    shard's classes), its local class, and the row of W its gradient goes to (the class's row, or
    its first sub-centre of largest cosine)."""

    inside: Tensor
    local: Tensor
    row: Tensor


def _targets(x: Tensor, w: Tensor, y: Tensor, inv_x: Tensor, inv_w: Tensor, kernel: KernelSettings,
             choose: bool = True) -> _Targets:
    """The rows' targets in the shard; with K sub-centres, each target's row chosen where `choose`
    (O(B·K·D)), its first sub-centre's otherwise."""
    local_classes, subcenters = kernel.shard_classes(w), kernel.subcenters
    local = y - kernel.class_start
    inside = (y != kernel.ignore_index) & (local >= 0) & (local < local_classes)
    local = torch.where(inside, local, torch.zeros_like(local))
    if subcenters == 1 or not choose:
        return _Targets(inside, local, local * subcenters)
    batch, dim = x.shape
    rows = local[:, None] * subcenters + torch.arange(subcenters, device=x.device)  # (B, K)
    dots = (w[rows.flatten()].float().view(batch, subcenters, dim) @ x.float()[:, :, None]).squeeze(2)
    cos = (dots * inv_x[:, None] * inv_w[rows]).clamp(-1.0, 1.0)
    return _Targets(inside, local, rows.gather(1, cos.argmax(dim=1, keepdim=True)).squeeze(1))


def _unit_rows(w: Tensor, inv_w: Tensor, rows: Tensor) -> Tensor:
    """ŵ of the given rows of W, float32 (w·r formed first: nothing overflows for huge rows)."""
    return w[rows].float() * inv_w[rows][:, None]


def _forward(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, kernel: KernelSettings,
             need_x: bool) -> tuple[RowPartials, ForwardSaved]:
    """Per-split partials and each row's target column as a range of its own, last (the kernel
    leaves it out: kernels/forward.py); the inverse norms and, where `need_x`, the splits' weighted
    centres relative to the merged max."""
    inv_x, inv_w = _inverse_norms(x), _inverse_norms(w)
    lift_ = _forward_lift(x.dtype, target_slope, kernel.scale, inv_w, kernel.negatives_rule) if need_x else _ones(
        x.device)
    parts, weighted = _launch_forward(x, w, y, inv_x, inv_w, lift_, kernel, x.shape[0], softmax=True, centres=need_x)
    inside = _targets(x, w, y, inv_x, inv_w, kernel, choose=False).inside
    target = RowPartials(
        max=torch.where(inside, target_logit, torch.full_like(target_logit, float("-inf"))),
        sumexp=inside.to(torch.float32), logit_sum=torch.where(inside, target_logit, torch.zeros_like(target_logit)),
        best_cos=torch.full_like(target_logit, float("-inf")),  # the kernel's best includes the target
        best_class=torch.full_like(y, kernel.class_start))
    splits = parts.max
    parts = RowPartials(*(torch.cat([field, extra[None]]) for field, extra in zip(parts, target)))
    centres = merge_centres(splits, weighted, parts.max.amax(dim=0)) if need_x else ForwardSaved.nothing(x)[0]
    return parts, ForwardSaved(centres, inv_x, inv_w)


def _target_grad(y: Tensor, target_logit: Tensor, target_slope: Tensor, lse: LogSumExp, upstream: Tensor,
                 kernel: KernelSettings, inside: Tensor) -> Tensor:
    """G_iy = u_i·σ_i·(p_iy − (1−ε) − ε/C) where the row's target is in the shard, else 0: the
    target column's gradient in its cosine (`marginfused.target.target_logit_grad`, p_iy from the
    log-sum-exp in two parts, times σ_i)."""
    grad = target_logit_grad(lse, target_logit, upstream, y, kernel.ignore_index, kernel.label_smoothing,
                             kernel.num_classes) * target_slope
    return torch.where(inside, grad, torch.zeros_like(grad))


def _plain_as_rule(kernel: KernelSettings, device: torch.device) -> KernelSettings:
    """The settings with a negatives rule no negative meets (τ = +∞ for the one row of the smoothing
    pass: every slope s), so that the plain smoothing pass runs as the rule variant, whose loop
    keeps the cosines' dot: the compile check cannot read the pipeline Triton builds on sm_100 for
    a loop whose only dot is O's (kernels/compile_check.py checks no plain smoothing pass)."""
    never = NegativesRule(torch.full((1,), float("inf"), device=device), torch.ones(1, device=device), 0.0)
    return dataclasses.replace(kernel, negatives_rule=never)


def _embeddings_grad(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, lse: LogSumExp,
                     upstream: Tensor, kernel: KernelSettings, saved: ForwardSaved) -> Tensor:
    """dx from the weighted centres of the classes but the targets (kernels/forward.py derives it):

        dX̂_i = u_i·s·exp(−log S_i)·O_i − u_i·(ε/C)·Σ_{j≠y_i} slope_ij·ŵ_j + G_iy·ŵ_{y_i}

    the target's term where its class is in the shard, the smoothing term's sum from a second pass
    of the forward kernel where ε > 0, then through the normalisation (kernels/project.py)."""
    inv_x, inv_w = saved.inv_x, saved.inv_w
    scale = float(kernel.scale)
    upstream = torch.where(y != kernel.ignore_index, upstream, torch.zeros_like(upstream))
    grad = saved.weighted_centres * (upstream * scale * torch.exp(-lse.log_sumexp))[:, None]
    targets = _targets(x, w, y, inv_x, inv_w, kernel)
    target_coefficient = _target_grad(y, target_logit, target_slope, lse, upstream, kernel, targets.inside)
    if kernel.label_smoothing > 0:
        per_row = kernel.negatives_rule is not None or kernel.subcenters > 1
        lift_ = _forward_lift(x.dtype, target_slope, scale, inv_w, kernel.negatives_rule)
        _, sums = _launch_forward(x, w, y, inv_x, inv_w, lift_, kernel if per_row else _plain_as_rule(kernel, x.device),
                                  x.shape[0] if per_row else 1, softmax=False, centres=True)
        smoothing = upstream * kernel.smoothing_per_class * scale
        sums = sums.sum(dim=0)  # Σ_{j≠y_i} (slope_ij/s)·ŵ_j per row, or Σ_{j≠y_0} ŵ_j for the shard
        if not per_row:  # Σ_j ŵ_j: row 0's target added back; each row's own target's s·ŵ_{y_i} taken out
            sums = sums + targets.inside[0] * _unit_rows(w, inv_w, targets.row[:1])
            target_coefficient = target_coefficient + torch.where(targets.inside, smoothing,
                                                                  torch.zeros_like(smoothing))
        grad = grad - smoothing[:, None] * sums  # u·(ε/C)·s·Σ_{j≠y_i} (slope_ij/s)·ŵ_j
    grad = grad + target_coefficient[:, None] * _unit_rows(w, inv_w, targets.row)
    tiles = configs.norms_tiles()
    dx = _empty(tuple(x.shape), x.dtype, x.device)
    _kernels().project.project_kernel[(_cdiv(x.shape[0], tiles.block_b),)](
        grad, x, inv_x, dx, x.shape[0], x.shape[1], x.stride(0),
        BLOCK_R=tiles.block_b, BLOCK_D=tiles.block_d, num_warps=tiles.num_warps,
    )
    return dx


def _weight_grad(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, lse: LogSumExp,
                 upstream: Tensor, kernel: KernelSettings, inv_x: Tensor, inv_w: Tensor) -> Tensor:
    """dW of the shard (kernels/backward.py), in W's dtype. Per row: lse in one float32 for the
    negatives, u·s, and the target column's gradient u·σ·(p_iy − (1−ε) − ε/C) from lse in its two
    parts (`marginfused.target.target_logit_grad`, whose ∂L/∂z_iy it is, times σ)."""
    batch, dim = x.shape
    local = kernel.shard_classes(w)
    tiles = configs.tiles("weight_grad", x.dtype, _arch(x.device), dim, kernel.subcenters,
                         kernel.negatives_rule is not None)
    rule, quadratic, variant = _rule_arguments(kernel.negatives_rule, inv_x, kernel.subcenters)
    lift_ = _weight_grad_lift(x.dtype, upstream, target_slope, kernel.scale, inv_x, kernel.negatives_rule)
    row_grad = torch.where(y != kernel.ignore_index, upstream * kernel.scale, torch.zeros_like(upstream))
    inside = _targets(x, w, y, inv_x, inv_w, kernel, choose=False).inside
    target_grad = _target_grad(y, target_logit, target_slope, lse, upstream, kernel, inside)
    target = torch.where(inside, y - kernel.class_start, torch.full_like(y, -1)).to(torch.int32)
    dw = _empty(tuple(w.shape), w.dtype, w.device)
    owns = tiles.launches(tiles.slices(dim))
    programs = _cdiv(local, tiles.block_c) * kernel.subcenters * tiles.slices(dim) // len(owns)
    log_sum_exp = lse.max + lse.log_sumexp
    for own in owns:
        _kernels().backward.weight_grad_kernel[(programs,)](
            x, w, inv_x, inv_w, log_sum_exp, row_grad, target_grad, target, *rule, lift_, dw,
            batch, local, dim, x.stride(0), w.stride(0), float(kernel.scale), kernel.smoothing_per_class, quadratic,
            DOT_PRECISION=_dot_precision(x.dtype), OWN=own, **variant, **_meta(tiles),
        )
    return dw


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
            return _forward(x, w, y, target_logit, target_logit, kernel, need_x=False)[0]

    @_on_the_tensors_device
    def forward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                kernel: KernelSettings, need_x: bool) -> tuple[RowPartials, ForwardSaved]:
        x, w, y, target_logit, target_slope = _prepare(x, w, y, target_logit, target_slope)
        with torch.no_grad():
            return _forward(x, w, y, target_logit, target_slope, kernel, need_x)

    def saved_like(self, x: Tensor, w: Tensor, need_x: bool) -> ForwardSaved:
        centres = x.new_empty(tuple(x.shape) if need_x else (0,), dtype=torch.float32)
        return ForwardSaved(centres, x.new_empty(x.shape[0], dtype=torch.float32),
                            w.new_empty(w.shape[0], dtype=torch.float32))

    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool,
                  need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """`backward` with nothing kept: its forward runs again first."""
        return self.backward(x, w, y, target_logit, target_slope, lse, upstream, kernel, need_x, need_w,
                             ForwardSaved.nothing(x))

    @_on_the_tensors_device
    def backward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                 lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool, need_w: bool,
                 saved: ForwardSaved) -> tuple[Optional[Tensor], Optional[Tensor]]:
        x, w, y, target_logit, target_slope, row_max, log_sumexp, upstream = _prepare(
            x, w, y, target_logit, target_slope, lse.max, lse.log_sumexp, upstream)
        lse = LogSumExp(row_max, log_sumexp)
        with torch.no_grad():
            if (need_x and not saved.weighted_centres.numel()) or not saved.inv_w.numel():
                # nothing kept (a direct call) or no weighted centres: the forward again, its centres
                # made relative to the given max
                parts, saved = _forward(x, w, y, target_logit, target_slope, kernel, need_x)
                saved = saved.relative_to(parts.max.amax(dim=0), row_max)
            dx = (_embeddings_grad(x, w, y, target_logit, target_slope, lse, upstream, kernel, saved) if need_x
                  else None)
            dw = (_weight_grad(x, w, y, target_logit, target_slope, lse, upstream, kernel, saved.inv_x, saved.inv_w)
                  if need_w else None)
        return dx, dw
