"""Offsets past 2³¹ elements: C·D > 2³¹ on a GPU, with targets in the last rows of W."""

import pytest
import torch

import marginfused as mf

from helpers import assert_close


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_class_centres_beyond_two_to_the_31_elements(backend):
    if mf.available_backends()[backend] is not None:
        pytest.skip(f"{backend}: {mf.available_backends()[backend]}")
    dim, classes = 512, 2**31 // 512 + 4099  # the last rows start past element 2³¹
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(classes, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(8, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.tensor([classes - 1, classes - 2, classes - 4099, 0, 5, classes - 1, 7, classes - 3], device="cuda")
    x[:4] = w[y[:4]]  # embeddings on far centres: their target logits dominate

    results = {}
    for name in (backend, "torch"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = mf.margin_cross_entropy(xl, wl, y, backend=name, reduction="sum")
        loss.backward()
        far = wl.grad[classes - 4100:].float()
        results[name] = (loss.detach().double(), xl.grad.double(), far.double())
        del xl, wl
    for index, field in enumerate(("loss", "x grad", "far rows of w grad")):
        got, want = results[backend][index], results["torch"][index]
        assert_close(field, got, want, 0.05 * max(1.0, want.abs().max().item()))
    assert results[backend][2].abs().sum() > 0
