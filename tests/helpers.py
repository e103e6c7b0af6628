"""The checking rule of DESIGN §4, written once, for every backend's tests.

Truth is the `torch` backend on float64 inputs. A backend computing in dtype d passes when, for the
loss and for each gradient,

    max |backend_d − truth|  ≤  2 · max |torch_d − truth|  +  ATOL[d]

i.e. it may be at most twice as wrong as the plain PyTorch reference in the same dtype, plus a
small absolute slack. For reduction="none" the backward pass takes a random upstream gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import marginfused as mf

MARGINS = {
    "cosface": mf.CosFace(0.35),
    "arcface": mf.ArcFace(0.5),
    "arcface-linear": mf.ArcFace(0.9, fallback="linear"),  # m = 0.9: the switch point is reached
    "arcface-easy": mf.ArcFace(0.5, fallback="easy"),
    "sphereface": mf.SphereFace(1.7),
    "sphereface4": mf.SphereFace(4.0),
    "expface": mf.ExpFace(0.7),
    "combined": mf.CombinedMargin(1.1, 0.3, 0.2),
}
"""Every margin kind and fallback, for the backends' truth tests."""

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
"""The absolute slack per input dtype."""


def make_inputs(
    batch: int,
    num_classes: int,
    dim: int,
    *,
    ignored: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Random float64 embeddings (norms spread over ~[0.5, 2]), class centres and labels, with
    `ignored` rows labelled -100; the last row's label is the last class (a target in the last
    partial tile of any tiling)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x = x * (0.5 + 1.5 * torch.rand(batch, 1, generator=g, dtype=torch.float64)) / dim**0.5
    w = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    y[-1] = num_classes - 1
    if ignored:
        y[torch.randperm(batch, generator=g)[:ignored]] = -100
    return x.to(device), w.to(device), y.to(device)


@dataclass
class Outcome:
    """Loss and gradients of one run, as float64."""

    loss: Tensor
    grad_embeddings: Tensor
    grad_weight: Tensor


def run(
    backend: str,
    x: Tensor,
    w: Tensor,
    y: Tensor,
    *,
    upstream: Optional[Tensor] = None,
    **kwargs,
) -> Outcome:
    """Forward and backward of `margin_cross_entropy` on fresh leaf copies of x and w."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = mf.margin_cross_entropy(x, w, y, backend=backend, **kwargs)
    grad = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    loss.backward(grad)
    return Outcome(loss.detach().double(), x.grad.double(), w.grad.double())


def max_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected|, with NaN where both are NaN counted as equal."""
    both_nan = actual.isnan() & expected.isnan()
    diff = (actual - expected).abs().masked_fill(both_nan, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(name: str, actual: Tensor, expected: Tensor, tolerance: float) -> None:
    """Fail with the first mismatching indices; NaN/Inf reported separately from plain error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad_finite = actual.isfinite() != expected.isfinite()
    bad_finite |= actual.isnan() != expected.isnan()
    if bool(bad_finite.any()):
        where = bad_finite.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad_finite.sum())} elements non-finite where the truth is not "
            f"(or the reverse), first at {where}: got {actual[bad_finite][:5].tolist()}, "
            f"expected {expected[bad_finite][:5].tolist()}"
        )
    error = max_error(actual, expected)
    if error > tolerance:
        diff = (actual - expected).abs().nan_to_num(0.0)
        where = (diff > tolerance).nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: max error {error:.3e} exceeds {tolerance:.3e}; "
            f"first mismatches at {where}: got {actual[diff > tolerance][:5].tolist()}, "
            f"expected {expected[diff > tolerance][:5].tolist()}"
        )


def assert_matches_truth(
    backend: str, x: Tensor, w: Tensor, y: Tensor, dtype: torch.dtype, slack: float = 0.0, **kwargs
) -> None:
    """Check `backend` in `dtype` against float64 truth by DESIGN §4's rule: loss, dX and dW.

    `slack` widens every budget by an absolute amount, for inputs where a correct computation
    in `dtype` can land further from the truth than the reference happened to (a test using it
    derives it from the math and says why)."""
    upstream = None
    if kwargs.get("reduction") == "none":
        upstream = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        upstream = upstream.to(x.device)
    truth = run("torch", x.double(), w.double(), y, upstream=upstream, **kwargs)
    reference = run("torch", x.to(dtype), w.to(dtype), y, upstream=upstream, **kwargs)
    candidate = run(backend, x.to(dtype), w.to(dtype), y, upstream=upstream, **kwargs)
    for field in ("loss", "grad_embeddings", "grad_weight"):
        expected = getattr(truth, field)
        budget = 2 * max_error(getattr(reference, field), expected) + ATOL[dtype] + slack
        assert_close(f"{backend}/{dtype}/{field}", getattr(candidate, field), expected, budget)


def usable_backends(device: str = "cpu") -> list[str]:
    """The backends that can run on float32 tensors of `device` here (the reference included)."""
    from marginfused.dispatch import BACKENDS

    return [
        name for name, backend in BACKENDS.items()
        if backend.unavailable_reason() is None and backend.unsupported_reason(device, torch.float32) is None
    ]


def skip_unless_supported(backend: str, x: Tensor, w: Tensor) -> None:
    """pytest.skip, with the backend's own reason, when it cannot take these tensors."""
    import pytest

    from marginfused.dispatch import BACKENDS

    reason = BACKENDS[backend].unsupported_reason(x.device.type, x.dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
