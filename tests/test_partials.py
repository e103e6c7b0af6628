"""Partials and gradients over class ranges combine into the reference loss and its gradients (the
fused backends' and the sharded loss's building block), computed by the torch backend in float64
and held to the float64 truth of the whole computation by the suite's rule (tests/helpers.py)."""

import pytest
import torch

import marginfused as mf
from marginfused.backends.torch import TorchBackend
from marginfused.partials import RowPartials, log_sum_exp, merge, row_loss
from marginfused.settings import LossSettings

from helpers import assert_close, assert_predictions_are_nearest, budgets, kernel_settings, make_inputs, shard_targets


def ranges(x, w, y, logit, settings, bounds):
    """The torch backend's partials of the class ranges between `bounds`, stacked in class order."""
    pieces = [TorchBackend().partials(x, w[a:b], y, logit, kernel_settings(settings, w.shape[0], a))
              for a, b in zip(bounds, bounds[1:])]
    return RowPartials(*(torch.cat(fields) for fields in zip(*pieces)))


@pytest.mark.parametrize("bounds", [(0, 61), (0, 1, 61), (0, 13, 40, 61)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_merged_partials_give_the_reference_loss(bounds, smoothing):
    x, w, y = make_inputs(9, 61, 16, ignored=2, seed=3)
    settings = LossSettings.build(mf.SphereFace(), 30.0, "detached", -100, smoothing)
    logit, _ = shard_targets(x, w, y, settings)
    merged = merge(ranges(x, w, y, logit, settings, bounds))
    truth, limits = budgets(x, w, y, torch.float64, margin=mf.SphereFace(), scale=30.0,
                            label_smoothing=smoothing, reduction="none")
    loss = row_loss(log_sum_exp(merged), merged.logit_sum, logit, y, -100, smoothing, 61)
    assert_close("loss", loss, truth.loss, limits["loss"])
    assert_predictions_are_nearest(merged.best_class, x, w, torch.float64)


def test_the_merge_takes_the_first_range_holding_the_largest_cosine():
    """Ties in the best cosine go to the first range (the smallest class), as argmax does."""
    g = torch.Generator().manual_seed(16)
    parts = RowPartials(max=torch.randn(5, 40, generator=g) * 10, sumexp=torch.rand(5, 40, generator=g) + 1,
                        logit_sum=torch.randn(5, 40, generator=g),
                        best_cos=torch.randint(0, 3, (5, 40), generator=g).float() / 4,  # many ties
                        best_class=torch.arange(5).repeat_interleave(40).view(5, 40) * 100)
    merged = merge(parts)
    first = (parts.best_cos == parts.best_cos.amax(dim=0)).float().argmax(dim=0)
    assert torch.equal(merged.best_class, first * 100)
    assert torch.equal(merged.max, parts.max.amax(dim=0))


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_shard_gradients_add_up_to_the_gradient_of_the_whole_loss(margin_grad, smoothing):
    x, w, y = make_inputs(9, 61, 16, ignored=2, seed=4)
    settings = LossSettings.build(mf.ArcFace(fallback="linear"), 30.0, margin_grad, -100, smoothing)
    logit, slope = shard_targets(x, w, y, settings)
    backend = TorchBackend()
    upstream = torch.linspace(-1.0, 1.5, 9, dtype=torch.float64)
    truth, limits = budgets(x, w, y, torch.float64, upstream, margin=settings.margin, scale=30.0,
                            margin_grad=margin_grad, label_smoothing=smoothing, reduction="none")

    bounds = (0, 20, 61)
    lse = log_sum_exp(merge(ranges(x, w, y, logit, settings, bounds)))
    grads = [backend.gradients(x, w[a:b], y, logit, slope, lse, upstream, kernel_settings(settings, 61, a), True, True)
             for a, b in zip(bounds, bounds[1:])]
    # the two shards' dx add up in float64: one more rounding of values up to the gradient's size
    adds = 2**-53 * float(truth.grad_embeddings.abs().max())
    assert_close("dx", grads[0][0] + grads[1][0], truth.grad_embeddings, limits["grad_embeddings"] + adds)
    assert_close("dw", torch.cat([grads[0][1], grads[1][1]]), truth.grad_weight, limits["grad_weight"])
