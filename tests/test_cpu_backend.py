"""The `cpu` backend (csrc/cpu.cpp, JIT-built on first use) against float64 truth (docs/design.md §4),
its memory bound, its C++ input checks, the shard API and how build failures are reported.

The `chunk` fixture forces small chunks so that small class counts span many chunks.

The float32 gradient checks use s = 30 (SphereFace-R, AM-Softmax). At s = 64 a row whose two top
classes are nearly tied (p ≈ 0.5 each) amplifies the ~1e-7 rounding of its cosines into gradient
errors that are a coin toss between any two fp32 implementations: on 15 random seeds at
B=23, C=300, D=40 the `cpu` backend's max gradient error exceeded 2× the torch backend's (the
§4 rule) in 3 (0 of 15 at s = 30), while on average it is 1.5× torch's. bf16/fp16 checks use s = 64.
"""

import subprocess
import sys

import pytest
import torch

import marginfused as mf
from marginfused.backends import BackendUnavailableError, cpu, extension, select_backend
from marginfused.backends.cpu import CpuBackend
from marginfused.normalize import inverse_norms
from marginfused.partials import RowPartials, log_sum_exp, merge
from marginfused.settings import LossSettings

from helpers import (
    arithmetic_bounds, assert_close, assert_matches_truth, assert_predictions_are_nearest, kernel_settings, make_inputs,
    shard_targets,
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
        monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: value)

    return set_chunk


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
        best = merge(CpuBackend().partials(x.float(), w.float(), y, logit, kernel_settings(settings, 50))).best_class
        assert_predictions_are_nearest(best, x, w, torch.float32)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=["bfloat16", "float32"], ids=["bf16-gemm", "fp32-gemm"])
def bfloat16_gemm(request):
    """Each path for bfloat16 inputs, whichever this CPU would take: GEMMs in bfloat16 (oneDNN;
    emulated, slowly, on CPUs without AVX512-BF16 or AMX) or on float32 copies."""
    before = cpu.bfloat16_gemm()
    cpu.use_native_bfloat16_gemm(request.param == "bfloat16")
    yield request.param
    cpu.use_native_bfloat16_gemm(before == "bfloat16")


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
def test_both_bfloat16_gemm_paths_hold_to_the_truth(ext, chunk, bfloat16_gemm, margin_grad):
    """bfloat16 inputs through either GEMM path, across many chunks and both threads, against
    float64 truth by the §4 rule (the torch backend's own bfloat16 error is the yardstick)."""
    chunk(37)
    x, w, y = make_inputs(23, 300, 40, ignored=3, seed=11)
    assert_matches_truth("cpu", x, w, y, torch.bfloat16, margin="arcface", margin_grad=margin_grad,
                         label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_dx_gemm_split_over_its_depth(ext, chunk, monkeypatch, dtype):
    """The dX GEMM of each chunk split over its depth (as the cuda backend splits it to fill a GPU)
    into separate accumulators: chunks of 12 rows in 4 ways, the last of 9 in 3 (the most that
    divide it), sub-centres included; the gradients hold to the truth."""
    chunk(12)
    monkeypatch.setattr(extension, "dx_splits", lambda device, batch, dim, chunk: 4)
    x, w, y = make_inputs(11, 45, 10, ignored=2, seed=5)
    scale = 30.0 if dtype == torch.float32 else 64.0
    assert_matches_truth("cpu", x, w, y, dtype, margin="arcface", scale=scale, reduction="none")
    y3 = torch.where(y >= 0, y % 15, y)
    assert_matches_truth("cpu", x, w, y3, dtype, subcenters=3, scale=scale, reduction="none")


def test_the_bfloat16_gemm_choice_is_made_once_per_process():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu.bfloat16_gemm() in ("bfloat16", "float32")
    script = "from marginfused.backends import cpu; print(cpu.bfloat16_gemm())"
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert fresh == ("bfloat16" if native else "float32")
    with pytest.raises(TypeError, match="must be a bool"):
        cpu.use_native_bfloat16_gemm("yes")


def test_dispatch(ext):
    x, w, y = make_inputs(4, 10, 8)
    assert select_backend("auto", x.float()).name == "cpu"
    assert select_backend("auto", x).name == "torch"  # float64: cpu does not take it
    with pytest.raises(BackendUnavailableError, match="float64 inputs are not supported"):
        mf.margin_cross_entropy(x, w, y, backend="cpu")
    assert mf.available_backends()["cpu"] is None


# --- the extension, called directly --------------------------------------------------------------

MISSING = object()


def _call(ext, inputs, **override):
    """A valid Call of the extension for inputs (x, w, y), a backward's fields set too, with
    `override` applied (a field given as MISSING is left out)."""
    x, w, y = inputs
    b = x.shape[0]
    fields = dict(
        x=x, w=w, y=y, target_logit=torch.zeros(b), rule_threshold=None, rule_offset=None,
        target_slope=torch.full((b,), 64.0), row_max=torch.zeros(b), log_sumexp=torch.zeros(b), upstream=torch.ones(b),
        lift=None, scale=64.0, ignore_index=-100, label_smoothing=0.0, rule_quadratic=0.0, subcenters=1,
        num_classes=w.shape[0], class_start=0, chunk=8,
    )
    fields.update(override)
    return ext.Call(**{name: value for name, value in fields.items() if value is not MISSING})


def _inputs32():
    x, w, y = make_inputs(6, 20, 8)
    return x.float(), w.float(), y


def test_the_call_is_built_by_keyword(ext):
    x, w, y = _inputs32()
    call = _call(ext, (x, w, y), scale=30.0, subcenters=2, rule_quadratic=1.0)
    assert (call.scale, call.subcenters, call.rule_quadratic, call.lift) == (30.0, 2, 1.0, None)
    assert call.x is not None and torch.equal(call.x, x)
    with pytest.raises(AttributeError):
        ext.Call(hard_threshold=None)
    with pytest.raises(TypeError):
        ext.Call(scale="large")


# What the C++ checks: the memory each entry point reads and writes (the extension can be called
# directly). The values (labels, finite inputs, the scalars' ranges) are checked by marginfused.
BAD_FORWARD = {
    "float64 x": (lambda x, w, y: dict(x=x.double(), w=w.double()), "x must be float32, float16 or bfloat16"),
    "x missing": (lambda x, w, y: dict(x=MISSING), "x is an undefined tensor"),
    "w dtype": (lambda x, w, y: dict(w=w.half()), "w must have dtype Float"),
    "w dim": (lambda x, w, y: dict(w=w[:, :5].contiguous()), r"w must have shape \[20, 8\]"),
    "w 3-D": (lambda x, w, y: dict(w=w[None]), "w must be a 2-D tensor"),
    "non-contiguous": (lambda x, w, y: dict(x=x.t().contiguous().t()), "x must be contiguous"),
    "int32 labels": (lambda x, w, y: dict(y=y.int()), "y must have dtype Long"),
    "labels length": (lambda x, w, y: dict(y=y[:3].contiguous()), r"y must have shape \[6\]"),
    "meta device": (lambda x, w, y: dict(x=x.to("meta")), "x must be a CPU tensor, got one on meta"),
    "w elsewhere": (lambda x, w, y: dict(w=w.to("meta")), "w is on meta but x is on cpu"),
    "target_logit size": (lambda x, w, y: dict(target_logit=torch.zeros(5)), r"target_logit must have shape \[6\]"),
    "rule without offsets": (lambda x, w, y: dict(rule_threshold=torch.zeros(6)),
                             "rule_threshold and rule_offset must be given together"),
    "rule threshold size": (lambda x, w, y: dict(rule_threshold=torch.zeros(5), rule_offset=torch.zeros(6)),
                            r"rule_threshold must have shape \[6\]"),
    "inv_x without inv_w": (lambda x, w, y: dict(inv_x=torch.ones(6)), "inv_x and inv_w must be given together"),
    "inv_w without inv_x": (lambda x, w, y: dict(inv_w=torch.ones(20)), "inv_x and inv_w must be given together"),
    "inv_x size": (lambda x, w, y: dict(inv_x=torch.ones(5), inv_w=torch.ones(20)), r"inv_x must have shape \[6\]"),
    "inv_w size": (lambda x, w, y: dict(inv_x=torch.ones(6), inv_w=torch.ones(19)), r"inv_w must have shape \[20\]"),
    "inv_w dtype": (lambda x, w, y: dict(inv_x=torch.ones(6), inv_w=torch.ones(20).double()),
                    "inv_w must have dtype Float"),
    "inv_x elsewhere": (lambda x, w, y: dict(inv_x=torch.ones(6, device="meta"), inv_w=torch.ones(20)),
                        "inv_x is on meta but x is on cpu"),
    "inv_w non-contiguous": (lambda x, w, y: dict(inv_x=torch.ones(6), inv_w=torch.ones(40)[::2]),
                             "inv_w must be contiguous"),
    "subcenters": (lambda x, w, y: dict(subcenters=0), "subcenters must be >= 1"),
    "rows not whole classes": (lambda x, w, y: dict(subcenters=3), "rows are not whole classes of 3 sub-centres"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARD))
def test_forward_rejects_bad_inputs(ext, case):
    x, w, y = _inputs32()
    change, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=message):
        ext.forward_partials(_call(ext, (x, w, y), **change(x, w, y)))


BAD_BACKWARD = {
    "row_max size": (lambda x, w, y: dict(row_max=torch.zeros(7)), r"row_max must have shape \[6\]"),
    "log_sumexp dtype": (lambda x, w, y: dict(log_sumexp=torch.zeros(6, dtype=torch.float64)),
                         "log_sumexp must have dtype Float"),
    "upstream dtype": (lambda x, w, y: dict(upstream=torch.ones(6, dtype=torch.float64)),
                       "upstream must have dtype Float"),
    "upstream missing": (lambda x, w, y: dict(upstream=MISSING), "upstream is an undefined tensor"),
    "target_slope dtype": (lambda x, w, y: dict(target_slope=torch.ones(6, dtype=torch.float64)),
                           "target_slope must have dtype Float"),
    "rule offset dtype": (lambda x, w, y: dict(rule_threshold=torch.zeros(6), rule_offset=torch.zeros(6).double()),
                          "rule_offset must have dtype Float"),
    "lift shape": (lambda x, w, y: dict(lift=torch.ones(3)), r"lift must have shape \[2\]"),
    "x elsewhere": (lambda x, w, y: dict(x=x.to("meta")), "x must be a CPU tensor"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD) + list(BAD_FORWARD))
def test_backward_rejects_bad_inputs(ext, case):
    x, w, y = _inputs32()
    change, message = {**BAD_FORWARD, **BAD_BACKWARD}[case]
    with pytest.raises(RuntimeError, match=message):
        ext.backward(_call(ext, (x, w, y), **change(x, w, y)), need_x=True, need_w=True)


@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_forward_returns_its_inverse_norms_and_the_backward_reads_them(ext, dtype, subcenters):
    """forward_partials returns 1/max(|v|, 1e-12) of x's rows and W's (float32; a zero row's 1e12
    exactly), each within the float32 bound of two computations of it (a sum of D squares, a square
    root and a division each: (D/2 + 2)·2^-24 relative); a backward given them reads them instead of
    computing its own (the same function of the same rows): its gradients bit-identical to those it
    computes without them, and different where the norms given differ (the values given are used)."""
    x, w, y = make_inputs(13, 45, 9, ignored=2)
    x[4] = 0.0
    w[7] = 0.0
    y = torch.where(y >= 0, y % (45 // subcenters), y)
    x, w = x.to(dtype), w.to(dtype)
    out = ext.forward_partials(_call(ext, (x, w, y), chunk=7, subcenters=subcenters))
    assert len(out) == 7
    inv_x, inv_w = out[5], out[6]
    assert inv_x.dtype == inv_w.dtype == torch.float32 and inv_x.shape == (13,) and inv_w.shape == (45,)
    relative = (9 + 4) * 2.0**-24  # twice (D/2 + 2)·2^-24, D = 9
    for got, rows in ((inv_x, x), (inv_w, w)):
        truth = inverse_norms(rows).double()
        assert ((got.double() - truth).abs() <= relative * truth).all(), (got, truth)
    assert inv_x[4] == inv_w[7] == 1 / torch.tensor(1e-12)
    fields = dict(chunk=7, subcenters=subcenters, upstream=torch.linspace(0.5, 1.5, 13))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # each thread's chunks the same on every call: dX added in one order
    try:
        computed = ext.backward(_call(ext, (x, w, y), **fields), need_x=True, need_w=True)
        read = ext.backward(_call(ext, (x, w, y), inv_x=inv_x, inv_w=inv_w, **fields), need_x=True, need_w=True)
        doubled = ext.backward(_call(ext, (x, w, y), inv_x=inv_x, inv_w=2 * inv_w, **fields), need_x=True,
                               need_w=True)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(read[0], computed[0]) and torch.equal(read[1], computed[1])
    assert not torch.equal(doubled[0], computed[0]) and not torch.equal(doubled[1], computed[1])


def test_the_backend_can_keep_the_forwards_inverse_norms_for_its_backward(ext, chunk, monkeypatch):
    """Where an extension backend keeps them (the cuda backend; the cpu backend's backward computes its
    own, chunk by chunk, as a pass that brings the chunk into cache for its GEMM), its forward keeps
    the extension's inverse norms (ForwardSaved: no weighted centres, inv_x (B,), inv_w (R,) float32,
    the fake's shapes too), and a training step computes them in its forward alone: the backward,
    given them through the loss operator, runs no inverse-norm pass."""
    assert not CpuBackend.keeps_norms and extension.ExtensionBackend.keeps_norms
    monkeypatch.setattr(CpuBackend, "keeps_norms", True)
    chunk(16)
    x, w, y = make_inputs(13, 90, 9, ignored=2)
    x32, w32 = x.float(), w.float()
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    logit, slope = shard_targets(x32, w32, y, settings)
    backend = CpuBackend()
    partials, saved = backend.forward(x32, w32, y, logit.float(), slope.detach().float(), kernel_settings(settings, 90),
                                      True)
    assert saved.weighted_centres.numel() == 0
    assert saved.inv_x.shape == (13,) and saved.inv_w.shape == (90,)
    like = backend.saved_like(x32, w32, True)
    assert [(t.shape, t.dtype) for t in like] == [(t.shape, t.dtype) for t in saved]

    def norm_passes(prof) -> int:
        return sum(e.count for e in prof.key_averages() if e.key == "marginfused::cpu_inverse_norms")

    x32, w32 = x32.requires_grad_(), w32.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as forward:
        loss = mf.margin_cross_entropy(x32, w32, y, "arcface", backend="cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as backward:
        loss.backward()
    assert norm_passes(forward) >= 1
    assert norm_passes(backward) == 0


def test_backward_computes_what_is_needed(ext):
    x, w, y = _inputs32()
    call = _call(ext, (x, w, y))
    assert ext.backward(call, need_x=False, need_w=False) == (None, None)
    dx, dw = ext.backward(call, need_x=True, need_w=False)
    assert dw is None and dx.shape == x.shape and dx.dtype == x.dtype
    dx, dw = ext.backward(call, need_x=False, need_w=True)
    assert dx is None and dw.shape == w.shape and dw.dtype == w.dtype


@pytest.mark.parametrize("subcenters", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(ext, chunk, dtype, subcenters):
    """Chunks of 7 rows (6 with 3 sub-centres: whole classes) over 45 rows of W, one split each:
    every split's partials are folded from its own chunk (a split starts at the empty range's
    -inf), its best class in its own classes; and the gradients hold to the truth everywhere."""
    x, w, y = make_inputs(13, 45, 9, ignored=2)
    y = torch.where(y >= 0, y % (45 // subcenters), y)
    rows_per_chunk = 7 // subcenters * subcenters
    call = _call(ext, (x.to(dtype), w.to(dtype), y), chunk=7, subcenters=subcenters)
    partials = RowPartials(*ext.forward_partials(call)[:5])
    splits = -(-45 // rows_per_chunk)
    assert partials.max.shape == (splits, 13)
    for name in ("max", "sumexp", "logit_sum", "best_cos"):
        assert torch.isfinite(getattr(partials, name)).all(), name
    split_of_best = partials.best_class // (rows_per_chunk // subcenters)
    assert torch.equal(split_of_best, torch.arange(splits)[:, None].expand(splits, 13))
    chunk(7)
    scale = 30.0 if dtype == torch.float32 else 64.0
    assert_matches_truth("cpu", x, w, y, dtype, subcenters=subcenters, scale=scale, reduction="none")


def test_a_lift_is_undone_exactly(ext):
    """The fp16 lift (2^k, 2^-k) multiplies the gradient tile and divides the GEMMs' products by
    powers of two, which is exact: given one on float32 inputs (Python passes one for the cuda
    backend's float16 GEMMs alone), dW is bit-identical to dW without it, and dX, added up in
    another order, within twice the arithmetic bound of a correct computation of it."""
    x, w, y = make_inputs(13, 45, 9, ignored=2)
    x32, w32 = x.float(), w.float()
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    logit, slope = shard_targets(x32, w32, y, settings)
    partials = RowPartials(*ext.forward_partials(_call(ext, (x32, w32, y), target_logit=logit.float(), chunk=7))[:5])
    lse = log_sum_exp(merge(partials))
    fields = dict(target_logit=logit.float(), target_slope=slope.detach().float(), row_max=lse.max,
                  log_sumexp=lse.log_sumexp, upstream=torch.ones(13), chunk=7)
    plain = ext.backward(_call(ext, (x32, w32, y), **fields), need_x=True, need_w=True)
    lifted = ext.backward(_call(ext, (x32, w32, y), lift=torch.tensor([32.0, 1 / 32]), **fields),
                          need_x=True, need_w=True)
    assert torch.equal(lifted[1], plain[1])
    bound = arithmetic_bounds(x, w, y, torch.float32, reduction="sum")["grad_embeddings"]
    assert_close("lifted dx", lifted[0].double(), plain[0].double(), 2 * bound)


# --- shards ------------------------------------------------------------------------------------


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
