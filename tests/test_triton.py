"""What only the `triton` backend has: its launchers' buffers and class splits and its reasons for
not running (its compiled code: tests/test_compile_check.py). What every backend must do is
tests/test_contract.py.

Without a GPU these run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), in float32 and float16 (bfloat16, whose dots the interpreter computes wrongly,
triton issue #11584, through the conftest's patch in tests/test_contract.py). The interpreter's
blocks (kernels/configs.py: 16 rows, 32 classes, 32 dims, 3 class splits) make even small shapes
cross many tile and split boundaries.
"""

import sys
from types import SimpleNamespace

import pytest
import torch

import marginfused as mf
import marginfused.backends.triton as tb
from marginfused.backends import KernelSettings
from marginfused.partials import log_sum_exp, merge
from marginfused.settings import LossSettings
from marginfused.target import target_cosines, target_logits

from helpers import (
    MARGINS, assert_close, assert_matches_truth, check_float16_keeps_the_negative_classes_gradient, kernel_settings, make_inputs,
    shard_targets, spread_inputs,
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

INTERPRETER_DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_every_output_element_is_written(monkeypatch, device):
    """Buffers the kernels must fill start as NaN (int64 buffers as −2⁶²): every element is written."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -(2**62), dtype=dtype, device=device)

    monkeypatch.setattr(tb, "_empty", poisoned)
    num_classes = 200 if tb.configs.interpreting() else 1000  # several class splits on either configuration
    x, w, y = make_inputs(37, num_classes, 40, ignored=5, seed=10, device=device)
    settings = LossSettings.build("arcface", 64.0, "exact", -100, 0.1)
    logit, slope = shard_targets(x.float(), w.float(), y, settings)
    kernel = kernel_settings(settings, num_classes)
    parts = tb.TritonBackend().partials(x.float(), w.float(), y, logit.float(), kernel)
    assert parts.max.shape[0] > 1, "the test needs several class splits"
    for name, field in parts._asdict().items():
        if field.is_floating_point():  # the targets' range holds −inf where a row has no target
            assert not bool(field.isnan().any()), f"{name} has unwritten (NaN) elements"
        else:
            assert bool((field >= 0).all()), f"{name} has unwritten elements"
    lse = log_sum_exp(merge(parts))
    upstream = torch.randn(37, device=device)
    for dtype in INTERPRETER_DTYPES:
        dx, dw = tb.TritonBackend().gradients(x.to(dtype), w.to(dtype), y, logit, slope, lse, upstream, kernel,
                                              True, True)
        assert dx.dtype == dtype and dw.dtype == dtype
        assert bool(dx.isfinite().all()) and bool(dw.isfinite().all())
    assert_matches_truth("triton", x, w, y, torch.float16, margin="arcface", margin_grad="exact",
                         label_smoothing=0.1, reduction="none")


def test_occupancy_is_the_scarcest_of_registers_shared_memory_and_threads():
    h100 = dict(regs_per_sm=65536, shared_per_sm=233472, threads_per_sm=2048)
    # 230 registers round up to 232 per thread: 232 × 256 threads leave room for one program
    assert tb.configs.programs_per_sm(230, 8, 65536, **h100) == 1
    # registers: 65536 / (128 × 128) = 4; shared memory: 233472 / (36864 + 1024) = 6
    assert tb.configs.programs_per_sm(128, 4, 36864, **h100) == 4
    # shared memory: 233472 / (100000 + 1024) = 2; registers would allow 8
    assert tb.configs.programs_per_sm(64, 4, 100000, **h100) == 2
    # threads: 2048 / 32 = 64
    assert tb.configs.programs_per_sm(8, 1, 0, **h100) == 64


def test_class_splits_fill_one_wave_of_the_compiled_kernel(monkeypatch):
    """On a GPU the number of class splits comes from the compiled kernel's occupancy: batch tiles ×
    splits × slices of D fill one wave and no more. A stand-in GPU and compiled kernel here."""
    props = SimpleNamespace(multi_processor_count=132, regs_per_multiprocessor=65536,
                            shared_memory_per_multiprocessor=233472, max_threads_per_multi_processor=2048)
    compiled = SimpleNamespace(n_regs=230, metadata=SimpleNamespace(shared=65536), _init_handles=lambda: None)
    compiled_with = {}

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            compiled_with.update(kwargs)
            return compiled

    monkeypatch.setattr(tb.configs, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    tiles = tb.configs.Tiles(64, 64, 0, 8, 2, block_g=256, parts=2, max_dim=512)
    x = torch.zeros(1024, 512)
    n_splits, per_split = tb._class_splits(Kernel(), tiles, x, 1024, 1_000_000, 2, (), {"DOT_PRECISION": "ieee"})
    # one program per SM (230 registers × 256 threads): 132 per wave; 16 batch tiles × 2 slices = 32 per split
    assert n_splits == 132 // 32
    assert per_split % tb.configs.SPLIT_ALIGN_GPU == 0 and (n_splits - 1) * per_split < 1_000_000 <= n_splits * per_split
    assert compiled_with["DOT_PRECISION"] == "ieee" and compiled_with["num_warps"] == 8
    assert compiled_with["PARTS"] == 2 and compiled_with["BLOCK_G"] == 256


@pytest.mark.parametrize("dim, parts", [(24, 1), (40, 2), (96, 0)], ids=["one-part", "two-parts", "streamed"])
@pytest.mark.parametrize("case", ["plain", "rule", "subcentres"])
def test_every_way_of_taking_d(dim, parts, case, device):
    """The kernels keep their own operand resident in one or two parts of D, or stream D
    (kernels/tiles.py); the interpreter's configurations switch at D = 32 and 64, so each way runs
    here, in the plain and the rule variant (sub-centres stream D at every D, as on a GPU), with the
    smoothing term's second pass (ε > 0) and the exact slopes."""
    assert tb.configs.tiles("forward", torch.float32, 0, dim).parts == parts
    x, w, y = make_inputs(21, 75, dim, ignored=3, seed=31, device=device)
    options = dict(margin="arcface", margin_grad="exact", label_smoothing=0.1, reduction="none")
    if case == "rule":
        options.update(margin="cosface", interclass_filtering=0.05)
    if case == "subcentres":
        y = torch.where(y >= 0, y % 25, y)
        options.update(subcenters=3)
    assert_matches_truth("triton", x, w, y, torch.float32, **options)


@pytest.mark.parametrize("case", ["plain", "rule", "subcentres"])
def test_the_backward_from_the_forwards_centres_is_the_backward_that_recomputes_them(case, device):
    """The loss operator's backward takes the weighted centres the forward kept; a direct call of
    `gradients` runs the forward again. In one process both are relative to the same max, so the
    code guarantees the same gradients, bit for bit."""
    x, w, y = make_inputs(19, 60, 40, ignored=2, seed=32, device=device)
    subcenters = 3 if case == "subcentres" else 1
    if subcenters > 1:
        y = torch.where(y >= 0, y % 20, y)
    options = dict(margin="arcface", margin_grad="exact", label_smoothing=0.1, reduction="none",
                   subcenters=subcenters, interclass_filtering=0.05 if case == "rule" else None)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    upstream = torch.linspace(-1.0, 2.0, 19, device=device)
    mf.margin_cross_entropy(x, w, y, backend="triton", **options).backward(upstream)
    settings = LossSettings.build("arcface", 64.0, "exact", -100, 0.1, 0.05 if case == "rule" else None, subcenters)
    valid = y != -100
    target = target_logits(target_cosines(x.detach(), w.detach(), y, valid, subcenters), valid, settings, x.detach())
    kernel = KernelSettings.for_call(settings, 60 // subcenters, target.negatives_rule)
    backend = tb.TritonBackend()
    lse = log_sum_exp(merge(backend.partials(x.detach(), w.detach(), y, target.logit, kernel)))
    dx, dw = backend.gradients(x.detach(), w.detach(), y, target.logit, target.slope, lse, upstream, kernel, True, True)
    assert torch.equal(dx, x.grad) and torch.equal(dw, w.grad)


def test_the_forward_keeps_the_centres_only_for_the_embeddings_gradient(device):
    """The weighted centres (B × D float32) are made where x needs a gradient, and not otherwise;
    the inverse norms always."""
    x, w, y = make_inputs(9, 50, 24, ignored=1, seed=33, device=device)
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    logit, slope = shard_targets(x.float(), w.float(), y, settings)
    backend = tb.TritonBackend()
    for need_x in (True, False):
        parts, saved = backend.forward(x.float(), w.float(), y, logit, slope, kernel_settings(settings, 50), need_x)
        like = backend.saved_like(x.float(), w.float(), need_x)
        assert saved.weighted_centres.shape == ((9, 24) if need_x else (0,))
        assert like.weighted_centres.shape == ((9, 24) if need_x else (0,))
        assert saved.inv_x.shape == like.inv_x.shape == (9,) and saved.inv_w.shape == like.inv_w.shape == (50,)


def test_class_ids_past_two_to_the_31(device):
    """A shard whose classes start at 2³³: labels and best_class are int64 global ids all the way."""
    x, w, y = make_inputs(9, 50, 16, ignored=2, seed=17, device=device)
    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    logit, _ = shard_targets(x.float(), w.float(), y, settings)
    start = 2**33
    shifted = torch.where(y == -100, y, y + start)
    # the same kernel on the same cosines, the class ids offset: the code guarantees equal results
    far = merge(tb.TritonBackend().partials(x.float(), w.float(), shifted, logit, kernel_settings(settings, 50, start)))
    near = merge(tb.TritonBackend().partials(x.float(), w.float(), y, logit, kernel_settings(settings, 50)))
    assert torch.equal(far.best_class, near.best_class + start)
    for name in ("max", "sumexp", "logit_sum"):
        assert torch.equal(getattr(far, name), getattr(near, name)), name


def test_float64_explicitly_asked_for_says_why(device):
    x, w, y = make_inputs(4, 10, 8, device=device)
    with pytest.raises(mf.BackendUnavailableError, match=r"float64.*backend='torch'"):
        mf.margin_cross_entropy(x, w, y, backend="triton")


def test_bfloat16_under_the_interpreter_says_why():
    if not tb.configs.interpreting():
        pytest.skip("only under TRITON_INTERPRET=1")
    x, w, y = make_inputs(4, 10, 8)
    with pytest.raises(mf.BackendUnavailableError, match="11584"):
        mf.margin_cross_entropy(x.bfloat16(), w.bfloat16(), y, backend="triton")


def test_unavailable_reasons(monkeypatch):
    backend = tb.TritonBackend()
    assert backend.unavailable_reason() == (tb._interpreter_problem() if tb.configs.interpreting() else None)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert "triton cannot be imported" in backend.unavailable_reason()
    monkeypatch.undo()
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        reason = backend.unavailable_reason()
        assert "no CUDA GPU" in reason and "TRITON_INTERPRET=1" in reason
        assert "not implemented" not in str(mf.available_backends()["triton"])


def test_an_interpreter_that_cannot_run_with_this_numpy_says_why(monkeypatch):
    """Before Triton 3.7 the interpreter takes loop bounds with int() of a one-element array, which
    numpy 2.4 refuses (triton #9171): under TRITON_INTERPRET=1 the backend says so, and how to
    avoid it, instead of failing inside the first kernel."""
    import numpy

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, refused in [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                   ("3.7.1", "2.4.6", False), ("3.6.0", "2.5.2", True)]:
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        reason = tb.TritonBackend().unavailable_reason()
        if refused:
            assert "9171" in reason and "numpy<2.4" in reason and "Triton>=3.7" in reason
        else:
            assert reason is None, (triton_version, numpy_version, reason)


def test_wrong_device_says_why():
    if not tb.configs.interpreting():
        pytest.skip("only under TRITON_INTERPRET=1 (on a GPU, CPU tensors go to the CPU backends)")
    assert tb.TritonBackend().unsupported_reason("cpu", torch.float32) is None
    assert "CPU tensors only" in tb.TritonBackend().unsupported_reason("meta", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("margin", list(MARGINS), ids=list(MARGINS))
def test_gpu_every_margin_on_larger_shapes(margin, margin_grad, dtype):
    x, w, y = spread_inputs(300, 5003, 200, ignored=17, seed=13, device="cuda")
    assert_matches_truth("triton", x, w, y, dtype, margin=MARGINS[margin], margin_grad=margin_grad,
                         label_smoothing=0.1, reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_subcentres_on_larger_shapes(dtype):
    """The SUBCENTERS variant with the GPU configurations: 1667 classes of 3 sub-centres, the last
    row's target in the last partial class tile."""
    x, w, y = make_inputs(300, 5001, 200, ignored=17, seed=14, device="cuda")
    y = torch.where(y >= 0, y % 1667, y)
    y[-1] = 1666
    assert_matches_truth("triton", x, w, y, dtype, margin="arcface", margin_grad="exact", subcenters=3,
                         label_smoothing=0.1, reduction="none")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", ["curricularface", "interclass-filtering"])
def test_gpu_negative_logit_rules(case, dtype):
    """The HARD_NEGATIVES variant with the GPU configurations (inputs whose negatives lie clear of
    the rules' thresholds, as on the CPU)."""
    from test_contract import adaptive_cases, rule_inputs

    x, w, y = rule_inputs("cuda")
    assert_matches_truth("triton", x, w, y, dtype, margin_grad="exact", **adaptive_cases()[case])


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_cuda_tensors():
    x, w, y = make_inputs(8, 100, 32, device="cuda")
    from marginfused.backends import select_backend

    assert select_backend("auto", x.float()).name == "triton"


def test_float16_keeps_the_negative_classes_gradient(device):
    check_float16_keeps_the_negative_classes_gradient("triton", device)


@pytest.mark.gpu
def test_gpu_launches_go_to_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the launches follow the tensors (a launch on the
    current device would read cuda:1's memory from cuda:0: an illegal address)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w, y = make_inputs(37, 1031, 96, ignored=3, seed=1, device="cuda:1")
    with torch.cuda.device(0):
        assert_matches_truth("triton", x, w, y, torch.float32, margin="arcface", margin_grad="exact")
