"""With torch.use_deterministic_algorithms(True), a backend is bit-identical run to run, or it
raises PyTorch's error naming its non-deterministic operation. The fused backends never refuse:
every sum in them runs in a fixed order (no atomics), on any device."""

import pytest
import torch

import marginfused as mf
from marginfused.backends import REGISTRY, extension

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


def check_bit_identical(backend, device, classes=5170, runs=4):
    first = loss_and_grads(backend, device, classes)
    for _ in range(runs - 1):
        for a, b in zip(first, loss_and_grads(backend, device, classes)):
            assert torch.equal(a, b)


def check_bit_identical_or_refused(backend, device):
    """cuBLAS (the torch and cuda backends' GEMMs) refuses deterministic mode unless
    CUBLAS_WORKSPACE_CONFIG is set: PyTorch's own error is an acceptable answer there."""
    try:
        loss_and_grads(backend, device, 5170)
    except RuntimeError as error:
        assert "deterministic" in str(error)
        return
    check_bit_identical(backend, device)


def test_cpu_backends_are_bit_identical(backend, deterministic, monkeypatch):
    if backend.device != "cpu":
        pytest.skip(f"{backend.name} runs on {backend.device} tensors here")
    backend = backend.name
    # small chunks for the chunked backend: many chunks over the threads, as at large C
    monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        if backend == "triton":  # the interpreter runs the programs one after another: keep it small
            check_bit_identical(backend, "cpu", classes=517, runs=2)
        else:
            check_bit_identical(backend, "cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_cuda_backends_are_bit_identical_or_refuse(backend, deterministic):
    reason = REGISTRY[backend].unavailable_reason()  # this backend's alone: the others' builds are not needed
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    check_bit_identical_or_refused(backend, "cuda")


@pytest.mark.gpu
def test_the_triton_backend_is_bit_identical_on_a_gpu(deterministic):
    reason = REGISTRY["triton"].unavailable_reason()
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    check_bit_identical("triton", "cuda")
