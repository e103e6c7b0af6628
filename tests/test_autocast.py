"""Under autocast the matmul takes the autocast dtype once; everything after it stays float32."""

import pytest
import torch

import marginfused as mf

from helpers import assert_close, make_inputs, skip_unless_supported


def check_autocast_equals_casting_the_inputs_once(backend, device):
    x, w, y = make_inputs(6, 11, 16, seed=0, device=device)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        embeddings = x * 1.0  # what an autocast backbone would hand over (float32 from a mul)
        loss = mf.margin_cross_entropy(embeddings, w, y, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32

    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    expected = mf.margin_cross_entropy(xb, wb, y, backend=backend)
    expected.backward()
    assert_close("loss", loss.detach().double(), expected.detach().double(), 0.0)
    assert_close("x grad", x.grad.double(), xb.grad.double(), 0.0)
    assert_close("w grad", w.grad.double(), wb.grad.double(), 0.0)


def test_cpu_autocast_equals_casting_the_inputs_once(backend):
    if backend.device != "cpu":
        pytest.skip(f"{backend.name} runs on {backend.device} tensors here")
    skip_unless_supported(backend.name, torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16))
    check_autocast_equals_casting_the_inputs_once(backend.name, "cpu")


def test_autocast_accepts_embeddings_and_weight_in_different_dtypes():
    x, w, y = make_inputs(6, 11, 16, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mf.margin_cross_entropy(x.bfloat16(), w.float(), y)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    with pytest.raises(TypeError, match="weight must have the dtype of embeddings"):
        mf.margin_cross_entropy(x.bfloat16(), w.float(), y)


def test_autocast_on_another_device_type_changes_nothing():
    x, w, y = make_inputs(6, 11, 16, seed=2)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        loss = mf.margin_cross_entropy(x.float(), w.float(), y)
    assert loss.item() == mf.margin_cross_entropy(x.float(), w.float(), y).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_cuda_autocast_equals_casting_the_inputs_once(backend):
    if mf.available_backends()[backend] is not None:
        pytest.skip(f"{backend}: {mf.available_backends()[backend]}")
    check_autocast_equals_casting_the_inputs_once(backend, "cuda")
