"""The `cpu` backend (csrc/cpu.cpp, JIT-built on first use) against float64 truth (DESIGN §4),
its memory bound, its C++ input checks, the shard API and how build failures are reported.

The `chunk` fixture forces small chunks so that small class counts span many chunks.

The float32 gradient checks use s = 30 (SphereFace-R, AM-Softmax). At s = 64 a row whose two top
classes are nearly tied (p ≈ 0.5 each) amplifies the ~1e-7 rounding of its cosines into gradient
errors that are a coin toss between any two fp32 implementations: on 15 random seeds at
B=23, C=300, D=40 the `cpu` backend's max gradient error exceeded 2× the torch backend's (the
§4 rule) in 3 (0 of 15 at s = 30), while on average it is 1.5× torch's. bf16/fp16 checks use s = 64.
"""

import math

import pytest
import torch

import marginfused as mf
from marginfused.backends import BackendUnavailableError, extension, select_backend
from marginfused.backends.cpu import CpuBackend
from marginfused.settings import LossSettings
from allocations import AllocationTracker
from marginfused.partials import merge_partials, row_loss

from helpers import (
    MARGINS, shard_targets, assert_close, assert_matches_truth, assert_predictions_are_nearest, budgets, make_inputs, run,
)



@pytest.fixture(scope="module")
def ext():
    """The built extension; the build (about 20 s on 2 cores, cached on disk) must succeed here."""
    reason = extension.unavailable_reason("cpu")
    assert reason is None, f"the cpu extension did not build: {reason}"
    return extension.load("cpu")


@pytest.fixture
def chunk(monkeypatch):
    """Set the classes per chunk for the test."""

    def set_chunk(value: int) -> None:
        monkeypatch.setattr(extension, "chunk_size", lambda device_type, batch: value)

    return set_chunk


@pytest.mark.parametrize("grad_mode", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS))
def test_every_margin_and_gradient_mode(ext, chunk, margin, grad_mode):
    chunk(100)  # 1031 classes: 10 full chunks and one of 31
    x, w, y = make_inputs(37, 1031, 96, ignored=3, seed=11)
    assert_matches_truth(
        "cpu", x, w, y, torch.float32, margin=MARGINS[margin], margin_grad=grad_mode, scale=30.0, reduction="none"
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_reductions_and_label_smoothing(ext, chunk, reduction, smoothing):
    chunk(64)
    x, w, y = make_inputs(23, 300, 40, ignored=4, seed=5)
    assert_matches_truth(
        "cpu", x, w, y, torch.float32, margin="arcface", margin_grad="exact", reduction=reduction,
        label_smoothing=smoothing, scale=30.0,
    )


@pytest.mark.parametrize(
    "batch, classes, dim, chunk_classes",
    [
        (5, 1, 8, None),  # C = 1
        (6, 10, 7, None),  # C below one chunk
        (9, 50, 16, 7),  # C not a multiple of the chunk
        (4, 33, 5, 16),  # a last chunk of one class, holding the last row's target
        (1, 64, 3, 64),  # B = 1, C exactly one chunk
        (70, 129, 33, 1),  # one class per chunk
    ],
)
def test_awkward_shapes(ext, chunk, batch, classes, dim, chunk_classes):
    if chunk_classes is not None:
        chunk(chunk_classes)
    x, w, y = make_inputs(batch, classes, dim, seed=batch + classes)
    assert y[-1] == classes - 1  # a target in the last chunk
    assert_matches_truth(
        "cpu", x, w, y, torch.float32, margin="sphereface", margin_grad="exact", reduction="none", scale=30.0
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts(ext, chunk, threads):
    """Chunks are dealt to threads and per-thread partials merged: any thread count gives the loss."""
    chunk(7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, y = make_inputs(10, 50, 12, ignored=1, seed=7)
        assert_matches_truth("cpu", x, w, y, torch.float32, margin="expface", scale=30.0, reduction="none")
        settings = LossSettings.build("expface", 30.0, "detached", -100, 0.0)
        logit, _ = shard_targets(x.float(), w.float(), y, settings)
        best = CpuBackend().row_partials(x.float(), w.float(), y, logit, settings, 0).best_class
        assert_predictions_are_nearest(best, x, w, torch.float32)
    finally:
        torch.set_num_threads(before)


def test_ignore_index_other_than_default(ext, chunk):
    chunk(8)
    x, w, y = make_inputs(12, 40, 16, seed=2)
    y[::3] = 7  # a class id used as ignore_index: those rows take no part
    kwargs = dict(margin="cosface", ignore_index=7, scale=30.0)
    assert_matches_truth("cpu", x, w, y, torch.float32, reduction="none", **kwargs)
    assert_matches_truth("cpu", x, w, y, torch.float32, label_smoothing=0.1, **kwargs)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_all_rows_ignored(ext, chunk, reduction):
    chunk(16)
    x, w, y = make_inputs(6, 50, 8, ignored=6, seed=4)
    out = run("cpu", x.float(), w.float(), y, reduction=reduction)
    assert torch.all(out.loss == 0)
    assert torch.all(out.grad_embeddings == 0) and torch.all(out.grad_weight == 0)
    assert_matches_truth("cpu", x, w, y, torch.float32, reduction=reduction, scale=30.0)


def test_all_rows_ignored_mean_is_nan_like_cross_entropy(ext):
    x, w, y = make_inputs(6, 50, 8, ignored=6, seed=4)
    assert math.isnan(float(mf.margin_cross_entropy(x.float(), w.float(), y, backend="cpu")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", ["arcface", "expface", "combined"])
def test_low_precision_inputs(ext, chunk, dtype, margin):
    chunk(50)
    x, w, y = make_inputs(19, 333, 64, ignored=2, seed=8)
    assert_matches_truth("cpu", x, w, y, dtype, margin=margin, margin_grad="exact", reduction="none",
                         label_smoothing=0.1)


def test_gradient_to_one_input_only(ext, chunk):
    chunk(32)
    x, w, y = make_inputs(8, 100, 12, seed=9)
    truth, limits = budgets(x, w, y, torch.float32, scale=30.0)
    for grad_x in (True, False):
        xs, ws = x.float().requires_grad_(grad_x), w.float().requires_grad_(not grad_x)
        mf.margin_cross_entropy(xs, ws, y, backend="cpu", scale=30.0).backward()
        got = xs.grad if grad_x else ws.grad
        field = "grad_embeddings" if grad_x else "grad_weight"
        assert got is not None and (ws.grad if grad_x else xs.grad) is None
        assert_close("grad", got.double(), getattr(truth, field), limits[field])


def test_accuracy_matches_reference(ext, chunk):
    chunk(10)
    x, w, y = make_inputs(50, 97, 16, ignored=5, seed=3)
    y[:20] = torch.cosine_similarity(x[:20, None, :], w[None], dim=2).argmax(1)  # some rows correct
    settings = LossSettings.build("cosface", 64.0, "detached", -100, 0.0)
    logit, _ = shard_targets(x.float(), w.float(), y, settings)
    prediction = CpuBackend().row_partials(x.float(), w.float(), y, logit, settings, 0).best_class
    assert_predictions_are_nearest(prediction, x, w, torch.float32)
    _, accuracy = mf.margin_cross_entropy(x.float(), w.float(), y, backend="cpu", return_accuracy=True, margin="cosface")
    valid = y != -100
    assert float(accuracy) == float(((prediction == y) & valid).sum() / valid.sum()) > 0


def test_dispatch(ext):
    x, w, y = make_inputs(4, 10, 8)
    assert select_backend("auto", x.float()).name == "cpu"
    assert select_backend("auto", x).name == "torch"  # float64: cpu does not take it
    with pytest.raises(BackendUnavailableError, match="float64 inputs are not supported"):
        mf.margin_cross_entropy(x, w, y, backend="cpu")
    assert mf.available_backends()["cpu"] is None


def _live_allocations(run_once):
    """Every storage allocated while `run_once` runs: (shape, bytes) in order."""
    seen = []

    class Recorder(AllocationTracker):
        def _count(self, tensor):
            key = id(tensor.untyped_storage())
            if key not in self._counted:
                seen.append((tuple(tensor.shape), tensor.untyped_storage().nbytes()))
            super()._count(tensor)

    with Recorder() as tracker:
        run_once()
    return seen, tracker


def test_no_batch_by_classes_allocation(ext, monkeypatch):
    batch, dim = 64, 16
    largest = {}
    for classes in (20_000, 60_000):
        x, w, y = make_inputs(batch, classes, dim, seed=1)
        x, w = x.float().requires_grad_(), w.float().requires_grad_()

        def run_once():
            mf.margin_cross_entropy(x, w, y, margin="arcface", backend="cpu").backward()

        seen, tracker = _live_allocations(run_once)
        chunk_classes = extension.chunk_size("cpu", batch)
        # The tracker sees the C++ extension's own ATen allocations (here the B×chunk tile).
        assert ((batch * chunk_classes,), 4 * batch * chunk_classes) in seen
        others = [nbytes for shape, nbytes in seen if shape not in (tuple(w.shape), tuple(x.shape))]
        assert max(others) < 4 * batch * classes, f"an allocation of B×C size: {seen}"
        largest[classes] = max(others)
    assert largest[20_000] == largest[60_000], f"working allocations grow with C: {largest}"


# --- the C++ checks, called directly -------------------------------------------------------------


def _forward_args(x, w, y, **override):
    """Valid arguments of the extension's forward_partials, with `override` applied."""
    b = x.shape[0]
    args = dict(
        x=x, w=w, y=y, target_logit=torch.zeros(b), class_start=0, chunk=8, scale=64.0,
        ignore_index=-100, out_max=torch.empty(b), out_sumexp=torch.empty(b),
        out_logit_sum=torch.empty(b), out_best_cos=torch.empty(b), out_best_class=torch.empty(b, dtype=torch.long),
    )
    args.update(override)
    return args


def _backward_args(x, w, y, **override):
    """Valid arguments of the extension's backward, with `override` applied."""
    b = x.shape[0]
    args = dict(
        x=x, w=w, y=y, target_logit=torch.zeros(b), target_slope=torch.full((b,), 64.0),
        lse=torch.zeros(b, dtype=torch.float64), grad_rows=torch.ones(b), class_start=0, num_classes=w.shape[0],
        chunk=8, scale=64.0, label_smoothing=0.0,
        ignore_index=-100, grad_x=torch.empty_like(x), grad_w=torch.empty_like(w),
    )
    args.update(override)
    return args


def _inputs32():
    x, w, y = make_inputs(6, 20, 8)
    return x.float(), w.float(), y


BAD_FORWARD = {
    "float64 embeddings": (lambda x, w, y: dict(x=x.double(), w=w.double()), "must be float32, float16 or bfloat16"),
    "weight dtype": (lambda x, w, y: dict(w=w.half()), "weight must have dtype Float"),
    "weight dim": (lambda x, w, y: dict(w=w[:, :5].contiguous()), "weight must have size 8 in dim 1"),
    "weight 3-D": (lambda x, w, y: dict(w=w[None]), "weight must be 2-D"),
    "non-contiguous": (lambda x, w, y: dict(x=x.t().contiguous().t()), "embeddings must be contiguous"),
    "int32 labels": (lambda x, w, y: dict(y=y.int()), "labels must have dtype Long"),
    "labels length": (lambda x, w, y: dict(y=y[:3].contiguous()), "labels must have size 6"),
    "meta device": (lambda x, w, y: dict(x=x.to("meta")), "embeddings must be a CPU tensor, got one on meta"),
    "output size": (lambda x, w, y: dict(out_max=torch.empty(5)), "out_max must have size 6"),
    "output dtype": (lambda x, w, y: dict(out_best_class=torch.empty(6)), "out_best_class must have dtype Long"),
    "chunk": (lambda x, w, y: dict(chunk=0), "chunk must be > 0"),
    "class_start": (lambda x, w, y: dict(class_start=-1), "class_start must be >= 0"),
    "target_logit size": (lambda x, w, y: dict(target_logit=torch.zeros(5)), "target_logit must have size 6"),
    "scale": (lambda x, w, y: dict(scale=0.0), "scale must be > 0"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_inputs(ext, case):
    x, w, y = _inputs32()
    change, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=message):
        args = _forward_args(x, w, y)
        args.update(change(x, w, y))
        ext.forward_partials(**args)


BAD_BACKWARD = {
    "lse size": (lambda x, w, y: dict(lse=torch.zeros(7, dtype=torch.float64)), "lse must have size 6"),
    "lse dtype": (lambda x, w, y: dict(lse=torch.zeros(6)), "lse must have dtype Double"),
    "grad_rows dtype": (lambda x, w, y: dict(grad_rows=torch.ones(6, dtype=torch.float64)), "grad_rows must have dtype Float"),
    "grad_x dtype": (lambda x, w, y: dict(grad_x=torch.empty_like(x).bfloat16()), "grad_x must have dtype Float"),
    "grad_w shape": (lambda x, w, y: dict(grad_w=torch.empty(19, 8)), "grad_w must have size 20 in dim 0"),
    "grad_w non-contiguous": (lambda x, w, y: dict(grad_w=torch.empty(8, 20).t()), "grad_w must be contiguous"),
    "num_classes": (lambda x, w, y: dict(num_classes=10), r"num_classes \(10\) must cover"),
    "smoothing": (lambda x, w, y: dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    "target_slope dtype": (lambda x, w, y: dict(target_slope=torch.ones(6, dtype=torch.float64)),
                           "target_slope must have dtype Float"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
def test_backward_rejects_bad_inputs(ext, case):
    x, w, y = _inputs32()
    change, message = BAD_BACKWARD[case]
    with pytest.raises(RuntimeError, match=message):
        args = _backward_args(x, w, y)
        args.update(change(x, w, y))
        ext.backward(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(ext, dtype):
    x, w, y = make_inputs(13, 45, 9, ignored=2)
    x, w = x.to(dtype), w.to(dtype)
    forward = _forward_args(x, w, y, chunk=7)
    for name in ("out_max", "out_sumexp", "out_logit_sum", "out_best_cos"):
        forward[name].fill_(float("nan"))
    forward["out_best_class"].fill_(-12345)
    ext.forward_partials(**forward)
    for name in ("out_max", "out_sumexp", "out_logit_sum", "out_best_cos"):
        assert torch.isfinite(forward[name]).all(), name
    assert ((forward["out_best_class"] >= 0) & (forward["out_best_class"] < 45)).all()
    backward = _backward_args(x, w, y, chunk=7, lse=torch.full((13,), 5.0, dtype=torch.float64), grad_rows=torch.randn(13))
    backward["grad_x"].fill_(float("nan"))
    backward["grad_w"].fill_(float("nan"))
    ext.backward(**backward)
    assert torch.isfinite(backward["grad_x"]).all() and torch.isfinite(backward["grad_w"]).all()


# --- shards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_shards_merge_into_the_full_loss_and_gradients(ext, chunk, smoothing):
    """Shards' partials merge into the loss and their backwards add up to the gradients; the
    sharded and the whole computation are each held to the float64 truth (their chunkings round
    differently)."""
    chunk(9)
    x, w, y = make_inputs(11, 70, 12, ignored=2, seed=6)
    margin = mf.ArcFace(0.4, fallback="easy")
    options = dict(margin=margin, scale=32.0, margin_grad="exact", label_smoothing=smoothing, reduction="sum")
    truth, limits = budgets(x, w, y, torch.float32, **options)
    per_row_truth, per_row_limits = budgets(x, w, y, torch.float32, **{**options, "reduction": "none"})
    settings = LossSettings.build(margin, 32.0, "exact", -100, smoothing)
    xf, wf = x.float(), w.float()
    logit, slope = shard_targets(xf, wf, y, settings)
    backend = CpuBackend()
    bounds = [0, 13, 14, 50, 70]
    parts = [backend.row_partials(xf, wf[a:b], y, logit, settings, a) for a, b in zip(bounds, bounds[1:])]
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_partials(merged, part)
    whole = backend.row_partials(xf, wf, y, logit, settings, 0)
    for name, partials in (("sharded", merged), ("whole", whole)):
        loss = row_loss(partials, logit, y, -100, smoothing, 70).double()
        assert_close(f"{name} loss", loss, per_row_truth.loss, per_row_limits["loss"])
        assert_predictions_are_nearest(partials.best_class, x, w, torch.float32)

    grad_rows = torch.ones(11)
    grads = [backend.backward(xf, wf[a:b], y, logit, slope, merged.max, merged.sumexp, grad_rows, settings, a, 70)
             for a, b in zip(bounds, bounds[1:])]
    grad_x = sum(g[0] for g in grads)
    grad_w = torch.cat([g[1] for g in grads])
    # the shards' grad_x add up in float32: one rounding per shard of values up to the gradient's size
    adds = (len(bounds) - 1) * 2**-24 * float(truth.grad_embeddings.abs().max())
    assert_close("sharded grad_x", grad_x.double(), truth.grad_embeddings, limits["grad_embeddings"] + adds)
    assert_close("sharded grad_w", grad_w.double(), truth.grad_weight, limits["grad_weight"])


# --- building ----------------------------------------------------------------------------------


def test_build_is_cached_in_an_explicit_directory(ext):
    build_dir = extension.build_root() / f"cpu-{extension.build_key('cpu')}"
    assert list(build_dir.glob("*.so")), f"no built library in {build_dir}"
    assert (build_dir / "src" / "cpu.cpp").read_bytes() == (extension.source_dir() / "cpu.cpp").read_bytes()


def test_build_failure_is_reported_once_and_auto_moves_on(monkeypatch):
    calls = []

    def failing_build(kind):
        calls.append(kind)
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setattr(extension, "_modules", {})
    monkeypatch.setattr(extension, "_failures", {})
    monkeypatch.setattr(extension, "_build", failing_build)
    reason = mf.available_backends()["cpu"]
    assert reason is not None and "g++: command not found" in reason
    x, w, y = make_inputs(4, 10, 8)
    with pytest.raises(BackendUnavailableError, match="g\\+\\+: command not found"):
        mf.margin_cross_entropy(x.float(), w.float(), y, backend="cpu")
    mf.margin_cross_entropy(x.float(), w.float(), y)  # auto: falls back to torch
    assert mf.available_backends()["cpu"] == reason
    assert calls == ["cpu"], "a failed build must be recorded, not retried"


def test_cuda_backend_says_why_it_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    reason = mf.available_backends()["cuda"]
    assert reason is not None and ("without CUDA" in reason or "no CUDA GPU" in reason)
    x, w, y = make_inputs(4, 10, 8)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        mf.margin_cross_entropy(x.float(), w.float(), y, backend="cuda")
