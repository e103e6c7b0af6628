"""Partials and backwards over class ranges combine into the reference loss and its gradients (the
fused backends' and the sharded loss's building block), computed by the torch backend in float64
and held to the float64 truth of the whole computation by the suite's rule (tests/helpers.py)."""

import pytest
import torch

import marginfused as mf
from marginfused.backends import RowGradients
from marginfused.backends.torch import TorchBackend
from marginfused.partials import merge_partials, row_loss
from marginfused.settings import LossSettings

from helpers import assert_close, assert_predictions_are_nearest, budgets, make_inputs, shard_targets


@pytest.mark.parametrize("bounds", [(0, 61), (0, 1, 61), (0, 13, 40, 61)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_merged_partials_give_the_reference_loss(bounds, smoothing):
    x, w, y = make_inputs(9, 61, 16, ignored=2, seed=3)
    settings = LossSettings.build(mf.SphereFace(), 30.0, "detached", -100, smoothing)
    logit, _ = shard_targets(x, w, y, settings)
    pieces = [TorchBackend().row_partials(x, w[a:b], y, logit, settings, a) for a, b in zip(bounds, bounds[1:])]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged = merge_partials(merged, piece)
    truth, limits = budgets(x, w, y, torch.float64, margin=mf.SphereFace(), scale=30.0,
                            label_smoothing=smoothing, reduction="none")
    assert_close("loss", row_loss(merged, logit, y, -100, smoothing, 61), truth.loss, limits["loss"])
    assert_predictions_are_nearest(merged.best_class, x, w, torch.float64)


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_shard_backwards_add_up_to_the_gradient_of_the_whole_loss(margin_grad, smoothing):
    x, w, y = make_inputs(9, 61, 16, ignored=2, seed=4)
    settings = LossSettings.build(mf.ArcFace(fallback="linear"), 30.0, margin_grad, -100, smoothing)
    logit, slope = shard_targets(x, w, y, settings)
    backend = TorchBackend()
    upstream = torch.linspace(-1.0, 1.5, 9, dtype=torch.float64)
    truth, limits = budgets(x, w, y, torch.float64, upstream, margin=settings.margin, scale=30.0,
                            margin_grad=margin_grad, label_smoothing=smoothing, reduction="none")

    bounds = (0, 20, 61)
    pieces = [backend.row_partials(x, w[a:b], y, logit, settings, a) for a, b in zip(bounds, bounds[1:])]
    merged = merge_partials(*pieces)
    rows = RowGradients(logit, slope, merged.max, merged.sumexp, upstream)
    grads = [backend.backward(x, w[a:b], y, rows, settings, a, 61)
             for a, b in zip(bounds, bounds[1:])]
    # the two shards' dx add up in float64: one more rounding of values up to the gradient's size
    adds = 2**-53 * float(truth.grad_embeddings.abs().max())
    assert_close("dx", grads[0][0] + grads[1][0], truth.grad_embeddings, limits["grad_embeddings"] + adds)
    assert_close("dw", torch.cat([grads[0][1], grads[1][1]]), truth.grad_weight, limits["grad_weight"])
