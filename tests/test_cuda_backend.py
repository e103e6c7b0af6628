"""The `cuda` backend: its sources compile with nvcc on any machine with nvcc (the CI machine has it;
this is `make check-cuda` run from the test suite), and, on a CUDA GPU, the truth checks of the
`cpu` backend repeated on CUDA tensors (GPU tests are skipped elsewhere by the `gpu` marker)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf
from marginfused.backends import extension

from helpers import (
    MARGINS, assert_matches_truth, check_float16_keeps_the_negative_classes_gradient, make_inputs,
    unit_embeddings_and_small_centres,
)

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "check_cuda.py"
sys.path.insert(0, str(CHECK.parent))
from check_cuda import find_nvcc  # noqa: E402

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine: the CUDA sources were not compiled")


def _check(*files: str, timeout: int = 480) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), *files], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@needs_nvcc
def test_cuda_sources_compile_for_sm80_and_sm90():
    """`make check-cuda`: every csrc/*.cu for sm_80 and sm_90, warnings as errors (~1 min)."""
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all CUDA sources compile" in result.stdout
    compiled = [line for line in result.stdout.splitlines() if line.startswith("$ ") and ".cu " in line]
    assert len(compiled) == len(list((ROOT / "csrc").glob("*.cu"))) >= 1


@needs_nvcc
def test_check_cuda_fails_on_a_warning(tmp_path):
    source = tmp_path / "warns.cu"
    source.write_text("__global__ void k(float* p) { int unused = 3; p[threadIdx.x] = 1.0f; }\n")
    result = _check(str(source), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unused" in result.stdout


def test_cuda_and_cpu_share_their_driver_and_bindings():
    """The chunked driver with the entry points' argument checks (driver.h) and the Python bindings
    of the one argument struct (bindings.h) are written once for both backends; each device file
    holds its device's row passes alone."""
    csrc = ROOT / "csrc"
    assert '#include "bindings.h"' in (csrc / "cpu.cpp").read_text()
    assert '#include "bindings.h"' in (csrc / "cuda_bindings.cpp").read_text()
    for name in ("cpu.cpp", "cuda.cu"):
        text = (csrc / name).read_text()
        assert '#include "driver.h"' in text, name
        assert "forward_partials<" in text and "backward<" in text, name
        assert "check_forward" not in text and "mm_out" not in text, f"{name} checks or multiplies on its own"


def test_the_float16_lift_counts_the_inverse_norms():
    """The cuda backend lifts its one gradient tile U_ij = u_i·∂ℓ_i/∂c_ij·q_i·r_j (q, r the inverse
    norms) by a power of two before the float16 cast. With unit embeddings against centres of norm
    0.01, U is 100× the gradient of the cosines: the lift must keep the largest entry of the lifted
    tile within float16's range (65504), and be the largest power of two whose bound allows it, a zero
    centre row (r = 1e12, whose entries multiply zeros) left out of that bound. Computed here exactly
    (float64) from the reference's cosines."""
    batch, classes, dim, scale = 64, 300, 32, 64.0
    x, w, y = unit_embeddings_and_small_centres(batch, classes, dim, seed=19)
    w[7] = 0.0
    upstream = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T).clamp(-1, 1).requires_grad_()
    target = cos.gather(1, y[:, None])
    margin = torch.cos(torch.acos(target.detach()) + 0.5)  # ArcFace, straight through: ∂z_iy/∂c_iy = s
    logits = (scale * cos).scatter(1, y[:, None], scale * (margin + target - target.detach()))
    (F.cross_entropy(logits, y, reduction="none") * upstream).sum().backward()
    inverse = 1 / x.norm(dim=1).clamp_min(1e-12), 1 / w.norm(dim=1).clamp_min(1e-12)
    tile = cos.grad * inverse[0][:, None] * inverse[1][None, :]
    tile[:, 7] = 0.0  # the zero row's entries: clamped to float16's range, they multiply its zeros

    lift, unlift = extension.gradient_tile_lift(x.half(), w.half(), upstream.float(), torch.full((batch,), scale),
                                                scale, None).double()
    assert lift * unlift == 1.0
    assert float(tile.abs().max() * lift) <= 65504.0
    bound = 2 * float(upstream.max()) * scale * float(inverse[0].max()) * 100.0  # |u|·2s·max q·max r, r ≤ 100
    assert bound * float(lift) <= 2.0**15 < 2 * bound * float(lift)


# --- on a GPU ----------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def cuda_ext():
    reason = extension.unavailable_reason("cuda")
    assert reason is None, f"the cuda extension did not build: {reason}"
    return extension.load("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_mode", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_cuda_every_margin_mode_and_dtype(cuda_ext, monkeypatch, margin, grad_mode, dtype):
    monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: 100)
    monkeypatch.setattr(extension, "forward_chunk_size", lambda device, batch, dim, dtype: 100)
    x, w, y = make_inputs(37, 1031, 96, ignored=3, seed=11, device="cuda")
    scale = 30.0 if dtype == torch.float32 else 64.0
    assert_matches_truth("cuda", x, w, y, dtype, margin=MARGINS[margin], margin_grad=grad_mode, scale=scale,
                         reduction="none", label_smoothing=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("subcenters", [1, 3])
def test_cuda_dx_gemm_split_over_its_depth(cuda_ext, monkeypatch, dtype, subcenters):
    """The dX GEMM split 4 ways over chunks of 96 rows (3 over the last, of 69: the most that divide
    it), into fp32 accumulators (ATen's out_dtype batched GEMM for 16-bit operands)."""
    monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: 96)
    monkeypatch.setattr(extension, "forward_chunk_size", lambda device, batch, dim, dtype: 96)
    monkeypatch.setattr(extension, "dx_splits", lambda device, batch, dim, chunk: 4)
    x, w, y = make_inputs(37, 453, 40, ignored=3, seed=12, device="cuda")
    y = torch.where(y >= 0, y % (453 // subcenters), y)
    scale = 30.0 if dtype == torch.float32 else 64.0
    assert_matches_truth("cuda", x, w, y, dtype, subcenters=subcenters, scale=scale, reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, classes, dim, chunk_classes",
    [(5, 1, 8, None), (6, 10, 7, None), (9, 50, 16, 7), (4, 33, 5, 16), (1, 64, 3, 64), (300, 129, 33, 1)],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_awkward_shapes(cuda_ext, monkeypatch, batch, classes, dim, chunk_classes, reduction):
    if chunk_classes is not None:
        monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: chunk_classes)
        monkeypatch.setattr(extension, "forward_chunk_size", lambda device, batch, dim, dtype: chunk_classes)
    x, w, y = make_inputs(batch, classes, dim, seed=batch + classes, device="cuda")
    assert_matches_truth("cuda", x, w, y, torch.float32, margin="sphereface", margin_grad="exact", scale=30.0,
                         reduction=reduction)


@pytest.mark.gpu
def test_cuda_all_rows_ignored_and_accuracy(cuda_ext):
    x, w, y = make_inputs(6, 50, 8, ignored=6, seed=4, device="cuda")
    assert_matches_truth("cuda", x, w, y, torch.float32, reduction="sum", scale=30.0)
    x, w, y = make_inputs(50, 97, 16, ignored=5, seed=3, device="cuda")
    _, acc = mf.margin_cross_entropy(x.float(), w.float(), y, backend="cuda", return_accuracy=True)
    _, ref = mf.margin_cross_entropy(x.float(), w.float(), y, backend="torch", return_accuracy=True)
    assert float(acc) == float(ref)


@pytest.mark.gpu
def test_cuda_memory_does_not_grow_with_classes(cuda_ext, monkeypatch):
    batch, dim = 256, 64
    extra = {}
    for classes in (200_000, 600_000):
        x, w, y = make_inputs(batch, classes, dim, seed=1, device="cuda")
        x, w = x.float().requires_grad_(), w.float().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        mf.margin_cross_entropy(x, w, y, backend="cuda").backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before - w.numel() * 4 - x.numel() * 4
        extra[classes] = peak
        assert peak < 4 * batch * classes, f"{peak} bytes: a B×C allocation"
    tile = 4 * batch * max(extension.chunk_size("cuda", batch, dim, torch.float32),
                           extension.forward_chunk_size("cuda", batch, dim, torch.float32))
    assert abs(extra[600_000] - extra[200_000]) < tile, f"working memory grows with C: {extra}"


@pytest.mark.gpu
def test_cuda_rejects_bad_inputs(cuda_ext):
    x, w, y = make_inputs(6, 20, 8, device="cuda")
    x, w = x.float(), w.float()
    b = 6

    def forward(**change):
        on_gpu = dict(device="cuda")
        fields = dict(x=x, w=w, y=y, target_logit=torch.zeros(b, **on_gpu), rule_threshold=None, rule_offset=None,
                      scale=64.0, ignore_index=-100, rule_quadratic=0.0, subcenters=1, class_start=0, chunk=8)
        cuda_ext.forward_partials(cuda_ext.Call(**{**fields, **change}))

    def backward(need_w=True, **change):
        on_gpu = dict(device="cuda")
        fields = dict(x=x, w=w, y=y, target_logit=torch.zeros(b, **on_gpu),
                      target_slope=torch.full((b,), 64.0, **on_gpu), row_max=torch.zeros(b, **on_gpu),
                      log_sumexp=torch.zeros(b, **on_gpu), upstream=torch.ones(b, **on_gpu), num_classes=20, chunk=8)
        return cuda_ext.backward(cuda_ext.Call(**{**fields, **change}), need_x=True, need_w=need_w)

    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        forward(x=x.cpu())
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        forward(x=x.double(), w=w.double())
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        forward(w=w.t().contiguous().t())
    with pytest.raises(RuntimeError, match="target_logit is on cpu but x is on cuda"):
        forward(target_logit=torch.zeros(b))
    with pytest.raises(RuntimeError, match="rule_threshold and rule_offset must be given together"):
        forward(rule_threshold=torch.zeros(b, device="cuda"))
    with pytest.raises(RuntimeError, match="log_sumexp is on cpu but x is on cuda"):
        backward(log_sumexp=torch.zeros(b))
    with pytest.raises(RuntimeError, match=r"lift must have shape \[2\]"):
        backward(lift=torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="inv_x is on cpu but x is on cuda"):
        backward(inv_x=torch.ones(b), inv_w=torch.ones(20, device="cuda"))
    with pytest.raises(RuntimeError, match=r"inv_w must have shape \[20\]"):
        backward(inv_x=torch.ones(b, device="cuda"), inv_w=torch.ones(21, device="cuda"))
    dx, dw = backward(need_w=False)
    assert dw is None and dx.shape == x.shape and dx.device == x.device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_the_backward_reads_the_forwards_inverse_norms(cuda_ext, dtype):
    """forward_partials returns the inverse norms of x's and W's rows (one kernel each, as the backward
    computes its own: bit-identical), and a backward given them gives the gradients it computes
    without them, bit for bit (one stream, the same kernels in the same order)."""
    x, w, y = make_inputs(37, 453, 40, ignored=3, seed=12, device="cuda")
    x, w = x.to(dtype), w.to(dtype)
    b = 37
    fields = dict(x=x, w=w, y=y, target_logit=torch.zeros(b, device="cuda"), scale=64.0, num_classes=453, chunk=96)
    out = cuda_ext.forward_partials(cuda_ext.Call(**fields))
    inv_x, inv_w = out[5], out[6]
    assert inv_x.shape == (b,) and inv_w.shape == (453,) and inv_x.dtype == inv_w.dtype == torch.float32
    backward = dict(fields, target_slope=torch.full((b,), 64.0, device="cuda"), row_max=torch.zeros(b, device="cuda"),
                    log_sumexp=torch.full((b,), 6.0, device="cuda"), upstream=torch.ones(b, device="cuda"))
    computed = cuda_ext.backward(cuda_ext.Call(**backward), need_x=True, need_w=True)
    read = cuda_ext.backward(cuda_ext.Call(**backward, inv_x=inv_x, inv_w=inv_w), need_x=True, need_w=True)
    assert torch.equal(read[0], computed[0]) and torch.equal(read[1], computed[1])


@pytest.mark.gpu
def test_cuda_float16_unit_embeddings_against_small_centres(cuda_ext):
    x, w, y = unit_embeddings_and_small_centres(1024, 5000, 64, seed=20, device="cuda")
    assert_matches_truth("cuda", x, w, y, torch.float16, scale=64.0, label_smoothing=0.1)


@pytest.mark.gpu
def test_cuda_float16_keeps_the_negative_classes_gradient():
    if mf.available_backends()["cuda"] is not None:
        pytest.skip(f"cuda: {mf.available_backends()['cuda']}")
    check_float16_keeps_the_negative_classes_gradient("cuda", "cuda")
