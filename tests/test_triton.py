"""The `triton` backend against float64 truth (DESIGN §4).

Without a GPU these run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), in float32 and float16; the interpreter computes bfloat16 dots wrongly
(triton issue #11584), so bfloat16 is checked only by the `gpu`-marked tests. Shapes are small
because the interpreter is slow; the interpreter's blocks (kernels/configs.py: 16 rows, 32
classes, 32 dims, 3 class splits) make even these shapes cross many tile and split boundaries.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf
import marginfused.backends.triton as tb
from marginfused.partials import RowPartials, merge_partials, row_loss
from marginfused.settings import LossSettings

from allocations import AllocationTracker
from helpers import (
    MARGINS, shard_targets, assert_close, assert_matches_truth, assert_predictions_are_nearest, budgets, make_inputs, run,
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

INTERPRETER_DTYPES = [torch.float32, torch.float16]



@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def spread_inputs(batch, num_classes, dim, *, ignored=0, seed=0, device="cpu"):
    """Like `make_inputs`, but each row's target cosine is set, spread evenly over (−0.97, 0.97), so
    every branch of every margin (ArcFace's fallbacks, SphereFace's k > 0) is exercised."""
    x, w, y = make_inputs(batch, num_classes, dim, ignored=ignored, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.linspace(-0.97, 0.97, batch, dtype=torch.float64)[torch.randperm(batch, generator=g)]
    w_hat = F.normalize(w[y.clamp(min=0)], dim=1)
    noise = x - (x * w_hat).sum(1, keepdim=True) * w_hat
    noise = F.normalize(noise, dim=1)
    x = (t[:, None] * w_hat + (1 - t[:, None] ** 2).sqrt() * noise) * x.norm(dim=1, keepdim=True)
    return x.to(device), w.to(device), y.to(device)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS), ids=list(MARGINS))
def test_every_margin_and_gradient_mode(margin, margin_grad, dtype, device):
    x, w, y = spread_inputs(19, 150, 40, ignored=3, seed=7, device=device)
    assert_matches_truth("triton", x, w, y, dtype, margin=MARGINS[margin], margin_grad=margin_grad,
                         scale=30.0)


@pytest.mark.parametrize(
    "batch,num_classes,dim,dtype",
    [
        # no dimension a multiple of any block; 3 class splits, 33 class tiles, 3 D chunks
        (37, 1031, 96, torch.float32),
        (5, 1, 7, torch.float32),  # C = 1
        (20, 17, 33, torch.float32),  # C smaller than one class block, D one past a block
        # One row, in float16: with a handful of elements the float32 budget (2 × the reference's
        # max error + 1e-5) is luck: at s = 64 one ulp of a cosine moves a logit by 4e-6, and
        # the reference's few errors can all happen to be small.
        (1, 70, 16, torch.float16),
    ],
    ids=["37x1031x96", "C=1", "C<block", "B=1"],
)
def test_shapes_that_break_tiling(batch, num_classes, dim, dtype, device):
    # make_inputs puts the last row's target on the last class: in the last, partial class tile.
    x, w, y = make_inputs(batch, num_classes, dim, ignored=batch // 5, seed=1, device=device)
    assert_matches_truth("triton", x, w, y, dtype, margin="arcface", margin_grad="exact")


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_and_reductions(reduction, dtype, device):
    # A scalar reduction is checked on one number, a sum of signed per-row errors: whether the
    # reference's errors cancel in it is luck (with seed=2 the float16 reference's per-row errors,
    # max 0.033, three times the kernel's 0.012, sum to 0.008 against the kernel's 0.027). The
    # per-row check ("none") is the one that measures the kernel.
    x, w, y = make_inputs(21, 90, 24, ignored=4, seed=3, device=device)
    assert_matches_truth("triton", x, w, y, dtype, margin="cosface", reduction=reduction,
                         label_smoothing=0.1)


def test_ignore_index_that_is_a_class(device):
    """ignore_index inside [0, C): rows with that label are ignored, the class itself still counts."""
    x, w, y = make_inputs(21, 90, 24, seed=3, device=device)
    y[::4] = 5
    assert_matches_truth("triton", x, w, y, torch.float32, margin="sphereface", ignore_index=5,
                         reduction="none", label_smoothing=0.2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction, device):
    x, w, y = make_inputs(9, 40, 16, ignored=9, seed=4, device=device)
    assert_matches_truth("triton", x, w, y, torch.float32, margin="expface", reduction=reduction)


def test_zero_rows_follow_the_reference(device):
    """A zero embedding and a zero class centre: F.normalize's eps=1e-12 (the gradient of a zero row
    is g/eps, ~1e12 here, where a few float32 steps are ~1e5: beyond the first-order bound's reach,
    hence the slack of 4 steps of the largest value)."""
    x, w, y = make_inputs(9, 40, 16, seed=5, device=device)
    x[2] = 0.0
    w[7] = 0.0
    kwargs = dict(margin="arcface", margin_grad="exact", reduction="sum")
    truth = run("torch", x, w, y, **kwargs)
    largest = max(truth.grad_embeddings.abs().max().item(), truth.grad_weight.abs().max().item())
    assert largest > 1e9  # the eps branch is taken
    assert_matches_truth("triton", x, w, y, torch.float32, slack=4 * 2**-24 * largest, **kwargs)


def test_non_contiguous_weight_and_int32_labels(device):
    x, w, y = make_inputs(13, 60, 40, seed=6, device=device)
    w = w.T.contiguous().T  # column-major: stays so through the dtype cast and clone
    assert not w.is_contiguous()
    assert_matches_truth("triton", x, w, y.int(), torch.float32, margin="combined")


@pytest.mark.parametrize("needs", ["x", "w"])
def test_gradient_to_one_input_only(needs, device):
    """Either input may be a leaf without grad (the backward then skips that half of its work)."""
    x, w, y = make_inputs(11, 50, 24, ignored=2, seed=14, device=device)
    truth, limits = budgets(x, w, y, torch.float32, margin="arcface", margin_grad="exact")
    xb = x.float().requires_grad_(needs == "x")
    wb = w.float().requires_grad_(needs == "w")
    mf.margin_cross_entropy(xb, wb, y, "arcface", margin_grad="exact", backend="triton").backward()
    assert (xb.grad is None) == (needs != "x") and (wb.grad is None) == (needs != "w")
    field = "grad_embeddings" if needs == "x" else "grad_weight"
    leaf = xb if needs == "x" else wb
    assert_close("grad", leaf.grad.double(), getattr(truth, field), limits[field])


def test_module_head_runs_on_triton(device):
    head = mf.MarginSoftmaxLoss(24, 50, margin="cosface", backend="triton").to(device)
    x, _, y = make_inputs(11, 50, 24, seed=15, device=device)
    loss, accuracy = head(x.float(), y, return_accuracy=True)
    loss.backward()
    assert head.weight.grad is not None and bool(head.weight.grad.isfinite().all())
    assert loss.dtype == torch.float32 and 0.0 <= float(accuracy) <= 1.0


def test_accuracy_and_prediction(device):
    x, w, y = spread_inputs(30, 80, 24, ignored=3, seed=8, device=device)
    loss, accuracy = mf.margin_cross_entropy(x.float(), w.float(), y, backend="triton", return_accuracy=True)
    assert loss.dtype == torch.float32
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    prediction = tb.TritonBackend().per_row_loss(x.float(), w.float(), y, settings).prediction
    assert prediction.dtype == torch.int64
    assert_predictions_are_nearest(prediction, x, w, torch.float32)
    valid = y != -100
    assert 0.0 < float(accuracy) < 1.0  # the data make the check meaningful
    assert float(accuracy) == float(((prediction == y) & valid).sum() / valid.sum())


def test_prediction_takes_the_first_of_tied_classes(device):
    x, w, y = make_inputs(6, 100, 16, seed=9, device=device)
    w[70] = w[3]  # class 70 (another split under the interpreter) ties with class 3
    w[40] = w[3] * 2.0  # same direction, other norm: ties too
    x[:3] = w[3]
    settings = LossSettings.build("cosface", 64.0, "detached", -100, 0.0)
    prediction = tb.TritonBackend().per_row_loss(x.float(), w.float(), y, settings).prediction
    assert prediction[:3].tolist() == [3, 3, 3]


def test_every_output_element_is_written(monkeypatch, device):
    """Buffers the kernels must fill start as NaN (int64 buffers as −2⁶²): every element is written."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -(2**62), dtype=dtype, device=device)

    monkeypatch.setattr(tb, "_empty", poisoned)
    num_classes = 200 if tb._interpreting() else 1000  # several class splits on either configuration
    x, w, y = make_inputs(37, num_classes, 40, ignored=5, seed=10, device=device)
    settings = LossSettings.build("arcface", 64.0, "exact", -100, 0.1)
    logit, slope = shard_targets(x.float(), w.float(), y, settings)
    parts = tb._split_partials(x.float(), w.float(), y, logit.float(), settings, 0)
    assert parts.max.shape[0] > 1, "the test needs several class splits"
    for name, field in parts._asdict().items():
        if field.is_floating_point():
            assert bool(field.isfinite().all()), f"{name} has unwritten (NaN) elements"
        else:
            assert bool((field >= 0).all()), f"{name} has unwritten elements"
    totals = tb._merge_splits(parts)
    upstream = torch.randn(37, device=device)
    for dtype in INTERPRETER_DTYPES:
        dx, dw = tb.TritonBackend().backward(
            x.to(dtype), w.to(dtype), y, logit, slope, totals.max, totals.sumexp, upstream, settings, 0, num_classes
        )
        assert dx.dtype == dtype and dw.dtype == dtype
        assert bool(dx.isfinite().all()) and bool(dw.isfinite().all())
    assert_matches_truth("triton", x, w, y, torch.float16, margin="arcface", margin_grad="exact",
                         label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("bounds", [(0, 45, 100), (0, 1, 64, 100)])
def test_class_shards_merge_into_the_full_result(bounds, device):
    """row_partials over class ranges [a, b) with global labels, merged, give the loss; the shards'
    backward (global lse) sums to the gradient. Both the sharded and the whole computation are
    held to the float64 truth (their chunkings round differently)."""
    x, w, y = make_inputs(17, 100, 24, ignored=3, seed=11, device=device)
    options = dict(margin="sphereface", scale=30.0, margin_grad="exact", label_smoothing=0.1, reduction="none")
    upstream = torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth, limits = budgets(x, w, y, torch.float32, upstream, **options)
    settings = LossSettings.build(options["margin"], 30.0, "exact", -100, 0.1)
    x, w = x.float(), w.float()
    logit, slope = shard_targets(x, w, y, settings)
    backend = tb.TritonBackend()
    full = backend.row_partials(x, w, y, logit, settings, 0)
    pieces = [backend.row_partials(x, w[a:b], y, logit, settings, a) for a, b in zip(bounds, bounds[1:])]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged = merge_partials(merged, piece)
    for name, partials in (("sharded", merged), ("whole", full)):
        loss = row_loss(partials, logit, y, -100, 0.1, 100).double()
        assert_close(f"{name} loss", loss, truth.loss, limits["loss"])
        assert_predictions_are_nearest(partials.best_class, x, w, torch.float32)

    dx_full, dw_full = backend.backward(x, w, y, logit, slope, full.max, full.sumexp, upstream.float(), settings, 0, 100)
    dx_sum = torch.zeros_like(x)
    dw_pieces = []
    for a, b in zip(bounds, bounds[1:]):
        dx, dw = backend.backward(x, w[a:b], y, logit, slope, merged.max, merged.sumexp, upstream.float(), settings, a, 100)
        dx_sum += dx
        dw_pieces.append(dw)
    # the shards' dx add up in float32: one rounding per shard of values up to the gradient's size
    adds = (len(bounds) - 1) * 2**-24 * float(truth.grad_embeddings.abs().max())
    for name, dx, dw in (("sharded", dx_sum, torch.cat(dw_pieces)), ("whole", dx_full, dw_full)):
        assert_close(f"{name} dx", dx.double(), truth.grad_embeddings, limits["grad_embeddings"] + adds)
        assert_close(f"{name} dw", dw.double(), truth.grad_weight, limits["grad_weight"])


def test_split_merge_is_merge_partials_folded(device):
    """The host's one-shot merge of the kernel's splits equals folding `merge_partials`, ties included."""
    g = torch.Generator().manual_seed(16)
    n, batch = 5, 40
    parts = RowPartials(
        max=torch.randn(n, batch, generator=g) * 10,
        sumexp=torch.rand(n, batch, generator=g) + 1,
        logit_sum=torch.randn(n, batch, generator=g),
        best_cos=torch.randint(0, 3, (n, batch), generator=g).float() / 4,  # many ties
        best_class=torch.randint(0, 1000, (n, batch), generator=g),
    )
    parts = RowPartials(*(field.to(device) for field in parts))
    folded = RowPartials(*(field[0] for field in parts))
    for k in range(1, n):
        folded = merge_partials(folded, RowPartials(*(field[k] for field in parts)))
    merged = tb._merge_splits(parts)
    # Both add n terms in float32, each term at most the largest |part| (sumexp's terms are
    # rescaled by exp(≤ 0), rounded by ~2 ulps), in different orders: each sum is within
    # (n + 2)·2⁻²⁴·n·max|part| of the exact one, so they differ by at most twice that. max and
    # best_cos are exact either way.
    for name in ("max", "sumexp", "logit_sum", "best_cos"):
        largest = getattr(parts, name).abs().max().item()
        assert_close(name, getattr(merged, name), getattr(folded, name), 2 * (n + 2) * 2**-24 * n * largest)
    assert torch.equal(merged.best_class, folded.best_class)


def test_class_ids_past_two_to_the_31(device):
    """A shard whose classes start at 2³³: labels and best_class are int64 global ids all the way."""
    x, w, y = make_inputs(9, 50, 16, ignored=2, seed=17, device=device)
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    logit, _ = shard_targets(x.float(), w.float(), y, settings)
    start = 2**33
    shifted = torch.where(y == -100, y, y + start)
    # the same kernel on the same cosines, the class ids offset: the code guarantees equal results
    far = tb.TritonBackend().row_partials(x.float(), w.float(), shifted, logit, settings, start)
    near = tb.TritonBackend().row_partials(x.float(), w.float(), y, logit, settings, 0)
    assert torch.equal(far.best_class, near.best_class + start)
    for name in ("max", "sumexp", "logit_sum"):
        assert torch.equal(getattr(far, name), getattr(near, name)), name


def _largest_and_peak(batch, num_classes, dim, device):
    x, w, y = make_inputs(batch, num_classes, dim, ignored=2, seed=12, device=device)
    x = x.float().requires_grad_()
    w = w.float().requires_grad_()
    with AllocationTracker() as tracker:
        mf.margin_cross_entropy(x, w, y, "arcface", margin_grad="exact", label_smoothing=0.1,
                                backend="triton").backward()
    return tracker


def test_no_allocation_of_batch_times_classes(device):
    """Forward + backward allocate nothing of B×C elements (not even B×C bytes), and their
    working memory beyond W-shaped buffers does not grow with C."""
    batch, dim = 48, 8  # D·4 < B: W-shaped float32 buffers are smaller than B×C bytes
    small = _largest_and_peak(batch, 300, dim, device)
    assert small.largest_bytes < batch * 300, (small.largest_bytes, small.largest_shape)
    large = _largest_and_peak(batch, 600, dim, device)
    assert large.largest_bytes < batch * 600, (large.largest_bytes, large.largest_shape)
    # What may grow with C: W-shaped buffers (dW's float32 accumulator, W.grad), 2 × C·D·4 bytes.
    w_shaped = 2 * dim * 4
    assert large.peak_bytes - small.peak_bytes <= w_shaped * (600 - 300), (small.peak_bytes, large.peak_bytes)


def test_float64_explicitly_asked_for_says_why(device):
    x, w, y = make_inputs(4, 10, 8, device=device)
    with pytest.raises(mf.BackendUnavailableError, match=r"float64.*backend='torch'"):
        mf.margin_cross_entropy(x, w, y, backend="triton")


def test_bfloat16_under_the_interpreter_says_why():
    if not tb._interpreting():
        pytest.skip("only under TRITON_INTERPRET=1")
    x, w, y = make_inputs(4, 10, 8)
    with pytest.raises(mf.BackendUnavailableError, match="11584"):
        mf.margin_cross_entropy(x.bfloat16(), w.bfloat16(), y, backend="triton")


def test_unavailable_reasons(monkeypatch):
    backend = tb.TritonBackend()
    assert backend.unavailable_reason() is None
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert "triton cannot be imported" in backend.unavailable_reason()
    monkeypatch.undo()
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        reason = backend.unavailable_reason()
        assert "no CUDA GPU" in reason and "TRITON_INTERPRET=1" in reason
        assert "not implemented" not in str(mf.available_backends()["triton"])


def test_wrong_device_says_why():
    if not tb._interpreting():
        pytest.skip("only under TRITON_INTERPRET=1 (on a GPU, CPU tensors go to the CPU backends)")
    assert tb.TritonBackend().unsupported_reason("cpu", torch.float32) is None
    assert "CPU tensors only" in tb.TritonBackend().unsupported_reason("meta", torch.float32)


def test_kernels_compile_for_hopper_in_bfloat16():
    """What the interpreter cannot check: the kernels compile (LLVM, ptxas) for sm_90 with their
    default GPU configurations, in bfloat16, the dtype the interpreter cannot run. No GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run_ = subprocess.run(
        [sys.executable, "-m", "marginfused.kernels.compile_check", "--dtype", "bf16", "--no-report"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run_.returncode == 0, run_.stdout + run_.stderr
    assert run_.stdout.count("ok ") == 3, run_.stdout  # forward, backward, project


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS), ids=list(MARGINS))
def test_gpu_every_margin_on_larger_shapes(margin, margin_grad, dtype):
    x, w, y = spread_inputs(300, 5003, 200, ignored=17, seed=13, device="cuda")
    assert_matches_truth("triton", x, w, y, dtype, margin=MARGINS[margin], margin_grad=margin_grad,
                         label_smoothing=0.1, reduction="none")


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_cuda_tensors():
    x, w, y = make_inputs(8, 100, 32, device="cuda")
    from marginfused.backends import select_backend

    assert select_backend("auto", x.float()).name == "triton"
