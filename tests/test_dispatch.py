"""Backend choice: available_backends(), "auto", and explicit names that cannot run."""

import re
import warnings

import pytest
import torch

import marginfused as mf
from marginfused.backends import AUTO_ORDER, REGISTRY as BACKENDS, select_backend

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
