"""With torch.use_deterministic_algorithms(True), a backend is bit-identical run to run, or it
raises PyTorch's error naming its non-deterministic operation."""

import pytest
import torch

import marginfused as mf

from helpers import make_inputs, usable_backends


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def loss_and_grads(backend, device):
    x, w, y = make_inputs(33, 517, 40, ignored=3, seed=0, device=device)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    loss = mf.margin_cross_entropy(x, w, y, margin_grad="exact", label_smoothing=0.1, backend=backend)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def check_bit_identical_or_refused(backend, device):
    try:
        first = loss_and_grads(backend, device)
    except RuntimeError as error:
        assert "deterministic" in str(error)
        return
    second = loss_and_grads(backend, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", usable_backends("cpu"))
def test_cpu_backends_are_bit_identical(backend, deterministic):
    check_bit_identical_or_refused(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_backends_are_bit_identical_or_refuse(backend, deterministic):
    if mf.available_backends()[backend] is not None:
        pytest.skip(f"{backend}: {mf.available_backends()[backend]}")
    check_bit_identical_or_refused(backend, "cuda")
