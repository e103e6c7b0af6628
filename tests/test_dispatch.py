"""Backend choice: available_backends(), "auto", and explicit names that cannot run."""

import re
import warnings

import pytest
import torch

import marginfused as mf
from marginfused.backends import AUTO_ORDER, REGISTRY as BACKENDS, select_backend
from marginfused.backends.cpu import CpuBackend

from helpers import make_inputs


def test_available_backends_reports_every_backend():
    available = mf.available_backends()
    assert list(available) == ["triton", "cuda", "cpu", "torch"]
    assert available["torch"] is None
    for name, reason in available.items():
        assert reason is None or (isinstance(reason, str) and reason)


def test_auto_picks_the_first_usable_backend_for_the_device():
    x, w, _ = make_inputs(3, 4, 5)
    expected = next(
        name for name in AUTO_ORDER["cpu"]
        if BACKENDS[name].unavailable_reason() is None
        and BACKENDS[name].unsupported_reason("cpu", torch.float32) is None
    )
    assert select_backend("auto", x.float()).name == expected


def test_auto_on_a_device_without_fused_backends_is_torch():
    x, w, _ = make_inputs(3, 4, 5)
    assert select_backend("auto", x.to("meta")).name == "torch"


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_an_unavailable_backend_named_explicitly_says_why(name):
    x, w, y = make_inputs(3, 4, 5)
    reason = mf.available_backends()[name]
    if reason is None:
        pytest.skip(f"{name} can run here")
    with pytest.raises(mf.BackendUnavailableError, match=re.escape(f"backend '{name}' cannot run here: {reason}")):
        mf.margin_cross_entropy(x.float(), w.float(), y, backend=name)


def test_the_torch_backend_runs_explicitly():
    x, w, y = make_inputs(3, 4, 5)
    assert torch.isfinite(mf.margin_cross_entropy(x, w, y, backend="torch"))


def test_explain_backend_says_why_faster_backends_were_passed_over():
    x, w, _ = make_inputs(3, 4, 5)
    text = mf.explain_backend(x)  # float64: no fused backend takes it
    chosen = select_backend("auto", x).name
    assert f"backend={chosen!r}" in text
    for name in AUTO_ORDER["cpu"]:
        if name == chosen:
            break
        assert f"passed over {name!r}: " in text and "float64" in text


def test_auto_logs_what_it_passed_over(caplog):
    x, w, y = make_inputs(3, 4, 5)
    with caplog.at_level("DEBUG", logger="marginfused"):
        mf.margin_cross_entropy(x, w, y)  # float64
    assert any("passed over 'cpu'" in record.getMessage() for record in caplog.records)


def test_auto_warns_once_when_a_fused_backend_cannot_run_on_this_machine(monkeypatch):
    """A fused backend that cannot run here at all (a failed build, no compiler) is said where a
    user looks: one RuntimeWarning per process naming the backend, why, what runs instead and what
    that costs. Tensors the backend is not made for (float64 here) are no cause for one."""
    from marginfused.backends import extension, registry

    monkeypatch.delitem(extension._modules, "cpu", raising=False)
    monkeypatch.setitem(extension._failures, "cpu", "the cpu C++ extension could not be built or loaded: no compiler")
    monkeypatch.setattr(registry, "_warned", set())
    x, w, y = make_inputs(3, 4, 5)
    with pytest.warns(RuntimeWarning, match=r"cannot use the 'cpu' backend \(the cpu C\+\+ extension could not be "
                                             r"built or loaded: no compiler\) and runs 'torch' instead\. The torch "
                                             r"reference holds the batch × classes logits"):
        mf.margin_cross_entropy(x.float(), w.float(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.margin_cross_entropy(x.float(), w.float(), y)  # once per process
    monkeypatch.undo()
    monkeypatch.setattr(registry, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.margin_cross_entropy(x, w, y)  # float64: the cpu backend is built, just not for this dtype


def test_the_backend_that_runs_is_said_once_at_info(monkeypatch, caplog):
    from marginfused.backends import registry

    monkeypatch.setattr(registry, "_announced", set())
    x, w, y = make_inputs(3, 4, 5)
    with caplog.at_level("INFO", logger="marginfused"):
        mf.margin_cross_entropy(x, w, y, backend="torch")
        mf.margin_cross_entropy(x, w, y, backend="torch")
    said = [r.getMessage() for r in caplog.records if "runs the" in r.getMessage()]
    assert said == ["marginfused runs the 'torch' backend for cpu tensors of torch.float64 (backend='torch')"]


def test_a_build_is_announced_before_it_starts(monkeypatch, tmp_path, caplog):
    """The first use of an extension compiles it (tens of seconds): a message says so first; a
    build found in the cache is loaded without one."""
    import torch.utils.cpp_extension

    from marginfused.backends import extension

    built = []
    monkeypatch.setenv("MARGINFUSED_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: built.append(kwargs["name"]) or "module")
    with caplog.at_level("WARNING", logger="marginfused"):
        extension._build("cpu")
    assert built and any("building the cpu extension (~30 s, once" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (tmp_path / f"cpu-{extension.build_key('cpu')}" / f"{built[0]}.so").write_bytes(b"")
    with caplog.at_level("WARNING", logger="marginfused"):
        extension._build("cpu")
    assert not [r for r in caplog.records if "building" in r.getMessage()]


class _CpuTwin(CpuBackend):
    """A second fused backend for CPU tensors, so that `backend="auto"` has two to time."""

    name = "cpu_twin"


def _add_twin(order=("cpu", "cpu_twin", "torch")):
    """Register the twin after the cpu backend; returns a function undoing it."""
    from marginfused.backends import registry, timing

    saved = dict(order=registry.AUTO_ORDER["cpu"], measured=dict(timing._measured), latest=dict(timing._latest))
    BACKENDS["cpu_twin"] = _CpuTwin()
    registry.AUTO_ORDER["cpu"] = order
    timing._measured.clear()
    timing._latest.clear()

    def undo():
        del BACKENDS["cpu_twin"]
        registry.AUTO_ORDER["cpu"] = saved["order"]
        timing._measured.clear()
        timing._measured.update(saved["measured"])
        timing._latest.clear()
        timing._latest.update(saved["latest"])

    return undo


@pytest.fixture
def twin():
    undo = _add_twin()
    yield
    undo()


def _fake_times(monkeypatch, seconds):
    """Replace the timed step by `seconds[backend name]` (raising it if it is an exception); returns
    the list of (backend, B, D) timed."""
    from marginfused.backends import timing

    timed = []

    def step_seconds(backend, x, w, y, settings):
        timed.append((backend.name, x.shape[0], x.shape[1]))
        if isinstance(seconds[backend.name], Exception):
            raise seconds[backend.name]
        return seconds[backend.name]

    monkeypatch.setattr(timing, "step_seconds", step_seconds)
    return timed


def test_auto_times_the_fused_backends_once_per_shape_and_keeps_the_faster(twin, monkeypatch, caplog):
    timed = _fake_times(monkeypatch, {"cpu": 2e-3, "cpu_twin": 1e-3})
    head = mf.MarginSoftmaxLoss(6, 9, margin="arcface")
    x, y = torch.randn(5, 6), torch.randint(0, 9, (5,))
    with caplog.at_level("INFO", logger="marginfused"):
        head(x, y)
        head(torch.randn(7, 6), torch.randint(0, 9, (7,)))  # B = 7 rounds up to 8 as 5 does: the same bucket
    assert timed == [("cpu", 5, 6), ("cpu_twin", 5, 6)]
    assert head.backend_ran == "cpu_twin"
    said = [r.getMessage() for r in caplog.records if "timed" in r.getMessage()]
    assert len(said) == 1 and "cpu 2 ms, cpu_twin 1 ms" in said[0] and "runs 'cpu_twin'" in said[0]
    head(x[:3].clone(), y[:3].clone())  # B = 3: another bucket, timed again
    assert timed[2:] == [("cpu", 3, 6), ("cpu_twin", 3, 6)]
    head.double()(torch.randn(5, 6, dtype=torch.float64), y)  # float64: only the torch backend can run it
    assert len(timed) == 4 and head.backend_ran == "torch"


def test_a_backend_named_explicitly_is_never_timed(twin, monkeypatch):
    timed = _fake_times(monkeypatch, {"cpu": 2e-3, "cpu_twin": 1e-3})
    x, y = torch.randn(5, 6), torch.randint(0, 9, (5,))
    head = mf.MarginSoftmaxLoss(6, 9, backend="cpu")
    head(x, y)
    assert timed == [] and head.backend_ran == "cpu"


def test_a_backend_that_fails_to_time_is_not_chosen(twin, monkeypatch):
    _fake_times(monkeypatch, {"cpu": 2e-3, "cpu_twin": RuntimeError("out of shared memory")})
    head = mf.MarginSoftmaxLoss(6, 9)
    with pytest.warns(RuntimeWarning, match="could not time the 'cpu_twin' backend .out of shared memory.; it is not"):
        head(torch.randn(5, 6), torch.randint(0, 9, (5,)))
    assert head.backend_ran == "cpu"


def test_a_timed_step_changes_nothing_of_the_call(twin):
    """The timing runs the backend's forward and backward on the call's tensors, detached, with a
    plain margin: the tensors' gradients and an adaptive margin's statistics stay as they were."""
    from marginfused.backends import timing
    from marginfused.settings import LossSettings

    margin = mf.AdaFace()
    settings = LossSettings.build(margin, 64.0, "detached", -100, 0.0)
    x, w = torch.randn(5, 6, requires_grad=True), torch.randn(9, 6, requires_grad=True)
    before = {k: v.clone() for k, v in margin.state_dict().items()}
    seconds = timing.step_seconds(BACKENDS["cpu"], x, w, torch.randint(0, 9, (5,)), settings)
    assert seconds > 0
    assert x.grad is None and w.grad is None
    assert all(torch.equal(before[k], v) for k, v in margin.state_dict().items())


def test_a_first_call_without_gradients_still_times_both_backends(twin):
    """Under torch.no_grad() the timed steps still run their backward (gradients on for the step
    alone), so both backends are timed and none fails; under inference mode nothing is timed and the
    choice waits for a call outside it."""
    import warnings

    from marginfused.backends import timing

    head = mf.MarginSoftmaxLoss(6, 9)
    x, y = torch.randn(5, 6), torch.randint(0, 9, (5,))
    with torch.inference_mode():
        head(x, y)
    assert timing._measured == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a backend that could not be timed warns
        with torch.no_grad():
            head(x, y)
    assert list(timing._measured.values()) in (["cpu"], ["cpu_twin"])


def _ranks_choose_alike(rank, world, directory):
    """Each rank finds another backend faster; all must run the one whose slowest rank is fastest."""
    from marginfused.backends import timing
    from marginfused.distributed import ShardedMarginSoftmaxLoss

    _add_twin()
    seconds = [{"cpu": 1e-3, "cpu_twin": 2e-3}, {"cpu": 4e-3, "cpu_twin": 3e-3}][rank]
    timing.step_seconds = lambda backend, *args: seconds[backend.name]
    head = ShardedMarginSoftmaxLoss(6, 10)
    torch.manual_seed(rank)
    ran = []
    original = timing.fastest

    def fastest(*args, **kwargs):
        ran.append(original(*args, **kwargs).name)
        return BACKENDS[ran[-1]]

    timing.fastest = fastest

    def check():
        head(torch.randn(3 + rank, 6), torch.randint(0, 10, (3 + rank,)))  # the batches differ; the gathered one does not
        assert ran == ["cpu_twin"], ran

    return [("the ranks choose alike", check)]


def test_every_rank_of_a_group_chooses_the_same_backend(tmp_path):
    from ranks import run_on_ranks

    run_on_ranks(2, tmp_path, _ranks_choose_alike, tmp_path)


def test_a_traced_call_takes_the_backend_timed_eagerly(twin, monkeypatch):
    _fake_times(monkeypatch, {"cpu": 2e-3, "cpu_twin": 1e-3})
    head = mf.MarginSoftmaxLoss(6, 9)
    x, y = torch.randn(5, 6), torch.randint(0, 9, (5,))
    head(x, y)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module.forward

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(head, backend=capture, fullgraph=True)(x, y), head(x, y))
    assert "cpu_twin_partials" in graphs[0] and "cpu_partials" not in graphs[0].replace("cpu_twin_partials", "")
