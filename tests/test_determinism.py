"""With torch.use_deterministic_algorithms(True), a backend is bit-identical run to run, or it
raises PyTorch's error naming its non-deterministic operation."""

import pytest
import torch

import marginfused as mf
from marginfused.backends import extension

from helpers import make_inputs


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def loss_and_grads(backend, device, classes):
    x, w, y = make_inputs(33, classes, 40, ignored=3, seed=0, device=device)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    loss = mf.margin_cross_entropy(x, w, y, margin_grad="exact", label_smoothing=0.1, backend=backend)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def check_bit_identical_or_refused(backend, device, classes=5170, runs=4):
    try:
        first = loss_and_grads(backend, device, classes)
    except RuntimeError as error:
        assert "deterministic" in str(error)
        return
    for _ in range(runs - 1):
        for a, b in zip(first, loss_and_grads(backend, device, classes)):
            assert torch.equal(a, b)


def test_cpu_backends_are_bit_identical(backend, deterministic, monkeypatch):
    if backend.device != "cpu":
        pytest.skip(f"{backend.name} runs on {backend.device} tensors here")
    backend = backend.name
    # small chunks for the chunked backend: many chunks over the threads, as at large C
    monkeypatch.setattr(extension, "chunk_size", lambda device_type, batch: 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        if backend == "triton":  # the interpreter runs the programs one after another: keep it small
            check_bit_identical_or_refused(backend, "cpu", classes=517, runs=2)
        else:
            check_bit_identical_or_refused(backend, "cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_backends_are_bit_identical_or_refuse(backend, deterministic):
    if mf.available_backends()[backend] is not None:
        pytest.skip(f"{backend}: {mf.available_backends()[backend]}")
    check_bit_identical_or_refused(backend, "cuda")


def test_the_triton_backward_refuses_deterministic_mode_on_a_gpu(deterministic):
    # on CUDA tensors its backward calls this before summing dW with atomic adds
    from marginfused.backends.triton import _alert_atomic_adds

    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        _alert_atomic_adds()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="atomic adds"):
        _alert_atomic_adds()
    torch.use_deterministic_algorithms(False)
    _alert_atomic_adds()
