"""The `triton` backend: host launchers of the fused Triton kernels, as a Backend.

The kernels live in `marginfused.kernels` (kernels/ in the source tree; the math is written out
in kernels/forward.py, kernels/backward.py and kernels/project.py). They are imported on first
use, and `import marginfused` works where Triton is not installed.

Memory: forward O(n_splits·B) partials; backward an (n_splits, B, D) float32 dX̂ buffer and a
(C, D) float32 dŴ buffer (W's shape; returned in place for float32 inputs). n_splits ≤ 256 does not
grow with C (n_splits·B·D·4 bytes ≈ 35 MB at D = 512 on a 132-SM GPU, whatever B); nothing of
B×C elements is ever allocated.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..kernels import configs
from ..partials import RowPartials
from ..settings import LossSettings
from .base import FUSED_DTYPES, RowGradients
from .ops import FusedBackend


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


FLOAT16_GRADIENT_CEILING = 2.0**15
"""float16 holds up to 65504: the gradient tile is scaled by the power of two that lifts its
largest possible entry to at most this, so no entry overflows and the small ones keep their bits."""


def _gradient_scale(dtype: torch.dtype, grad_rows: Tensor, target_slope: Tensor, scale: float) -> Tensor:
    """2^k (a 1-element float32 tensor, computed on the device: no host synchronisation) by which
    the backward scales its gradient tile before the cast to float16: |G_ij| ≤ 2·|g_i|·max(s, |σ_i|)
    (|p − t − ε/C| ≤ 2), so 2^k = 2^⌊log2(2¹⁵ / that)⌋, within [2⁻²⁴, 2²⁴]. 1 for other dtypes."""
    one = torch.ones(1, dtype=torch.float32, device=grad_rows.device)
    if dtype != torch.float16:
        return one
    largest = 2 * grad_rows.abs().amax() * torch.clamp(target_slope.abs().amax(), min=scale)
    return torch.exp2(torch.floor(torch.log2(FLOAT16_GRADIENT_CEILING / largest)).clamp(-24, 24)).reshape(1)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision unless PyTorch itself allows TF32 for matmuls; 16-bit
    operands go to the tensor cores as they are ("tf32", Triton's default, changes nothing there)."""
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _num_splits(batch_tiles: int, num_classes: int, device: torch.device) -> int:
    """How many class splits each batch tile is cut into (a small number, not growing with C)."""
    if configs.interpreting():
        wanted = configs.INTERPRET_SPLITS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = min(configs.MAX_SPLITS, max(1, _cdiv(configs.PROGRAMS_PER_SM * sms, batch_tiles)))
    return max(1, min(wanted, _cdiv(num_classes, configs.split_align())))


def _class_splits(batch: int, num_classes: int, device: torch.device, block_b: int) -> tuple[int, int]:
    """(n_splits, classes_per_split): splits aligned to SPLIT_ALIGN, every split non-empty."""
    align = configs.split_align()
    wanted = _num_splits(_cdiv(batch, block_b), num_classes, device)
    per_split = _cdiv(num_classes, wanted)
    per_split = _cdiv(per_split, align) * align
    return _cdiv(num_classes, per_split), per_split


class _Plan(NamedTuple):
    """How one pass (forward or backward) is launched."""

    kernel: object  # the jitted kernel, or its autotuned wrapper
    meta: dict  # block sizes and warps; empty when autotuning picks them
    n_splits: int
    per_split: int

    def grid(self, batch: int):
        return lambda meta: (_cdiv(batch, meta["BLOCK_B"]), self.n_splits)


def _plan(direction: str, x: Tensor, num_classes: int) -> _Plan:
    """The kernel, launch settings and class splits of the "forward" or "backward" pass."""
    kernels = _kernels()
    tuned = configs.autotuning(x.dtype)
    if direction == "forward":
        tiles, candidates = configs.forward_tiles(x.dtype, _arch(x.device)), configs.AUTOTUNE_FORWARD
        kernel = configs.autotuned_forward() if tuned else kernels.forward.row_partials_kernel
    else:
        tiles, candidates = configs.backward_tiles(x.dtype, _arch(x.device)), configs.AUTOTUNE_BACKWARD
        kernel = configs.autotuned_backward() if tuned else kernels.backward.grad_kernel
    # With autotuning, BLOCK_B varies by config: size the splits for the smallest one.
    block_b = min(t.block_b for t in candidates) if tuned else tiles.block_b
    n_splits, per_split = _class_splits(x.shape[0], num_classes, x.device, block_b)
    meta = {} if tuned else {
        "BLOCK_B": tiles.block_b,
        "BLOCK_C": tiles.block_c,
        "BLOCK_D": tiles.block_d,
        "num_warps": tiles.num_warps,
        "num_stages": tiles.num_stages,
    }
    return _Plan(kernel, meta, n_splits, per_split)


def _bucket(batch: int) -> int:
    return 1 << max(0, (batch - 1).bit_length())


def _split_partials(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, settings: LossSettings,
                    class_start: int) -> RowPartials:
    """Per-split partials: each field (n_splits, B)."""
    batch, dim = x.shape
    local = w.shape[0]
    plan = _plan("forward", x, local)
    shape = (plan.n_splits, batch)
    out = RowPartials(
        max=_empty(shape, torch.float32, x.device),
        sumexp=_empty(shape, torch.float32, x.device),
        logit_sum=_empty(shape, torch.float32, x.device),
        best_cos=_empty(shape, torch.float32, x.device),
        best_class=_empty(shape, torch.int64, x.device),
    )
    plan.kernel[plan.grid(batch)](
        x, w, y, _inverse_norms(x), _inverse_norms(w), target_logit, *out,
        batch, local, dim, x.stride(0), w.stride(0), class_start, plan.per_split, _bucket(batch),
        float(settings.scale), int(settings.ignore_index),
        DOT_PRECISION=_dot_precision(x.dtype),
        **plan.meta,
    )
    return out


def _merge_splits(parts: RowPartials) -> RowPartials:
    """Fold `merge_partials` over the splits (dim 0) in a fixed number of torch ops, whatever
    n_splits is: the same merge (logaddexp of (max, sumexp); sums add; the first split holding the
    largest cosine wins, as merge_partials keeps `a` on ties)."""
    top = parts.max.amax(dim=0)
    best_cos = parts.best_cos.amax(dim=0)
    winner = (parts.best_cos == best_cos).to(torch.uint8).argmax(dim=0, keepdim=True)  # first max
    return RowPartials(
        max=top,
        sumexp=(parts.sumexp * torch.exp(parts.max - top)).sum(dim=0),
        logit_sum=parts.logit_sum.sum(dim=0),
        best_cos=best_cos,
        best_class=parts.best_class.gather(0, winner).squeeze(0),
    )


def _prepare(x: Tensor, w: Tensor, y: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """Contiguous inputs, int64 labels, and per-row float32 vectors, all detached."""
    return (x.detach().contiguous(), w.detach().contiguous(), y.contiguous().long(),
            *(r.detach().to(torch.float32).contiguous() for r in rows))


def _alert_atomic_adds() -> None:
    """dW is summed over batch tiles with float32 atomic adds, in whatever order the GPU runs them:
    refuse (or warn) the way PyTorch's own non-deterministic operations do."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "the triton backend's backward (dW summed with atomic adds) does not have a deterministic "
        "implementation, but you set 'torch.use_deterministic_algorithms(True)'; use backend='torch' "
        "for bit-identical runs"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message)
    else:
        raise RuntimeError(message)


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
            return None
        if not torch.cuda.is_available():
            return (
                "no CUDA GPU is present and TRITON_INTERPRET=1 is not set "
                "(set it to run the kernels on CPU tensors through Triton's interpreter)"
            )
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        if dtype not in FUSED_DTYPES:
            hint = "; use backend='torch'" if dtype == torch.float64 else ""
            return f"{dtype} inputs are not supported (float32, float16, bfloat16 only){hint}"
        if configs.interpreting():
            if device_type != "cpu":
                return f"under TRITON_INTERPRET=1 the kernels run on CPU tensors only, got {device_type} tensors"
            if dtype == torch.bfloat16:
                return (
                    "bfloat16 under TRITON_INTERPRET=1 is not supported: the interpreter computes "
                    "bfloat16 dot products wrongly (triton issue #11584); use a GPU or backend='torch'"
                )
        elif device_type != "cuda":
            return f"needs CUDA tensors, got {device_type} tensors (or set TRITON_INTERPRET=1 for CPU tensors)"
        return None

    @_on_the_tensors_device
    def row_partials(
        self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, settings: LossSettings, class_start: int
    ) -> RowPartials:
        """Partials over the classes [class_start, class_start + w.shape[0]), merged over the
        kernel's class splits (y global labels; labels outside the shard contribute no target)."""
        x, w, y, target_logit = _prepare(x, w, y, target_logit)
        with torch.no_grad():
            return _merge_splits(_split_partials(x, w, y, target_logit, settings, int(class_start)))

    @_on_the_tensors_device
    def backward(
        self, x: Tensor, w: Tensor, y: Tensor, rows: RowGradients, settings: LossSettings, class_start: int,
        num_classes: int, need_x: bool = True, need_w: bool = True,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        x, w, y, target_logit, target_slope, row_max, row_sumexp, grad_rows = _prepare(x, w, y, *rows)
        kernels = _kernels()
        batch, dim = x.shape
        local = w.shape[0]
        plan = _plan("backward", x, local)
        log_sumexp = torch.log(row_sumexp)

        dx_part = _empty((plan.n_splits, batch, dim), torch.float32, x.device) if need_x else row_max
        if need_w and x.device.type == "cuda":
            _alert_atomic_adds()
        dw_acc = torch.zeros((local, dim), dtype=torch.float32, device=x.device) if need_w else row_max
        eps = float(settings.label_smoothing)
        plan.kernel[plan.grid(batch)](
            x, w, y, _inverse_norms(x), _inverse_norms(w), target_logit, target_slope, row_max, log_sumexp,
            grad_rows, _gradient_scale(x.dtype, grad_rows, target_slope, settings.scale), dx_part, dw_acc,
            batch, local, dim, x.stride(0), w.stride(0), int(class_start), plan.per_split, _bucket(batch),
            float(settings.scale), int(settings.ignore_index), 1.0 - eps, eps / num_classes,
            NEED_DX=need_x,
            NEED_DW=need_w,
            DOT_PRECISION=_dot_precision(x.dtype),
            **plan.meta,
        )

        ptiles = configs.project_tiles()
        dx = dw = None
        if need_x:
            dx = _empty((batch, dim), x.dtype, x.device)
            kernels.project.project_kernel[(_cdiv(batch, ptiles.block_b),)](
                dx_part, x, dx, batch, dim, x.stride(0), plan.n_splits,
                BLOCK_R=ptiles.block_b, BLOCK_D=ptiles.block_d, num_warps=ptiles.num_warps,
            )
        if need_w:
            # float32: project in place (each element is read before its program writes it).
            dw = dw_acc if w.dtype == torch.float32 else _empty((local, dim), w.dtype, w.device)
            kernels.project.project_kernel[(_cdiv(local, ptiles.block_b),)](
                dw_acc, w, dw, local, dim, w.stride(0), 1,
                BLOCK_R=ptiles.block_b, BLOCK_D=ptiles.block_d, num_warps=ptiles.num_warps,
            )
        return dx, dw
