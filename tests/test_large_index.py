"""Offsets past 2³¹ elements: C·D > 2³¹ on a GPU, with targets in the last rows of W."""

import pytest
import torch

import marginfused as mf
from marginfused.backends import REGISTRY

from helpers import LAMBDA, UNIT_ROUNDOFF, assert_close, cosine_bound, kernel_settings, shard_targets


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_class_centres_beyond_two_to_the_31_elements(backend):
    reason = REGISTRY[backend].unavailable_reason()  # this backend's alone: the others' builds are not needed
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
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


def test_cpu_backend_beyond_two_to_the_31_elements():
    # C·D > 2³¹ on the CPU (~4.3 GB of bf16 class centres, as much again for their gradient): every
    # row is one shared vector u except random rows at both ends, and the targets sit on the far
    # rows. The truth needs no 4 GB reference: the reference's partials and backward on the end
    # rows, merged with the analytic partials of the N identical middle rows (max s·c_u, sumexp N).
    if mf.available_backends()["cpu"] is not None:
        pytest.skip(f"cpu: {mf.available_backends()['cpu']}")
    from marginfused.backends.torch import TorchBackend, cosines
    from marginfused.partials import RowPartials, log_sum_exp, merge, row_loss
    from marginfused.settings import LossSettings

    dim, ends = 64, 512
    classes = 2**31 // dim + 2**17
    g = torch.Generator().manual_seed(0)
    u = torch.randn(dim, generator=g).bfloat16()
    w_head = torch.randn(ends, dim, generator=g).bfloat16()
    w_tail = torch.randn(ends, dim, generator=g).bfloat16()
    y = torch.tensor([classes - 1, classes - 2, classes - ends, 3])
    # embeddings at random, not near their centres: p_target ≈ 1 would leave the target gradient
    # s·(p − 1) below what float32 resolves next to 1
    x = torch.randn(4, dim, generator=g).bfloat16()

    w = torch.empty(classes, dim, dtype=torch.bfloat16)
    w.copy_(u.expand(classes, dim))
    w[:ends] = w_head
    w[classes - ends:] = w_tail
    w.requires_grad_()
    xl = x.clone().requires_grad_()
    loss = mf.margin_cross_entropy(xl, w, y, "arcface", backend="cpu", reduction="sum")
    loss.backward()
    far_grad = w.grad[classes - ends:].double()
    middle_grad = w.grad[ends:ends + 4].double()
    del w

    settings = LossSettings.build("arcface", 64.0, "detached", -100, 0.0)
    reference = TorchBackend()
    x64 = x.double()
    target_rows = torch.cat([w_tail[y[:3] - (classes - ends)], w_head[y[3:]]]).double()
    logit, slope = shard_targets(x64, target_rows, torch.arange(4), settings)
    middle = classes - 2 * ends
    c_u = cosines(x64, u.double()[None]).squeeze(1)
    middle_partials = RowPartials(
        max=64.0 * c_u, sumexp=torch.full_like(c_u, float(middle)), logit_sum=64.0 * middle * c_u, best_cos=c_u, best_class=torch.full_like(y, ends),
    )
    head = reference.partials(x64, w_head.double(), y, logit, kernel_settings(settings, classes, 0))
    tail = reference.partials(x64, w_tail.double(), y, logit, kernel_settings(settings, classes, classes - ends))
    merged = merge(RowPartials(*(torch.cat([a, b.unsqueeze(0), c]) for a, b, c in zip(head, middle_partials, tail))))
    lse = log_sum_exp(merged)
    expected_loss = row_loss(lse, merged.logit_sum, logit, y, -100, 0.0, classes).sum()
    ones = torch.ones(4, dtype=torch.float64)
    _, expected_far = reference.gradients(x64, w_tail.double(), y, logit, slope, lse, ones,
                                          kernel_settings(settings, classes, classes - ends), False, True)
    _, expected_middle = reference.gradients(x64, u.double().expand(4, dim), y, logit, slope, lse, ones,
                                             kernel_settings(settings, classes, ends), False, True)
    # The suite's first-order bound (tests/helpers.py) with the inputs already in bfloat16 (the
    # truth is computed from them; the cosines' bound includes one rounding of the product to
    # bfloat16): per row δℓ = 2δz + λ√C·u·(2s + |ℓ|); a gradient term moves by ρ relative, and a
    # row of W receives at most Σ_i s·(p_ij + t_ij) ≤ 2·4·s of terms over its norm (4 rows, p ≤ 1,
    # t ≤ 1).
    scale, unit = 64.0, 2.0**-24
    per_row = row_loss(lse, merged.logit_sum, logit, y, -100, 0.0, classes)
    delta_z = scale * float(mf.ArcFace().derivative(c_u).abs().clamp_min(1.0).max()) * cosine_bound(torch.bfloat16, dim)
    loss_bound = float((2 * delta_z + LAMBDA * classes**0.5 * unit * (2 * scale + per_row.abs())).sum())
    rho = 2 * delta_z + LAMBDA * (4 + classes + dim) ** 0.5 * unit + 3 * UNIT_ROUNDOFF[torch.bfloat16]
    smallest_norm = min(float(w_tail.double().norm(dim=1).min()), float(u.double().norm()))
    grad_bound = rho * 8 * scale / smallest_norm
    assert_close("loss", loss.detach().double(), expected_loss, loss_bound)
    assert_close("far rows of w grad", far_grad, expected_far, grad_bound)
    assert_close("middle rows of w grad", middle_grad, expected_middle, grad_bound)
    assert far_grad.abs().sum() > 0
