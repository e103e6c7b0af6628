"""Partials over class ranges merge into exactly the reference loss (the fused backends' and the
sharded loss's building block)."""

import pytest
import torch

import marginfused as mf
from marginfused.config import LossConfig
from marginfused.partials import RowPartials, merge_partials, row_loss
from marginfused.reference import TorchBackend, cosines, margin_logits

from helpers import assert_close, make_inputs


def partials_of_range(x, w, y, config, start, stop) -> RowPartials:
    """Partials of classes [start, stop), computed from the reference's full logits."""
    cos = cosines(x, w)
    z = margin_logits(cos, y, config)[:, start:stop]
    c = cos[:, start:stop]
    top = z.max(dim=1).values
    inside = (y >= start) & (y < stop)
    target = torch.where(inside, z.gather(1, (y.clamp(start, stop - 1) - start)[:, None]).squeeze(1), 0.0)
    best = c.max(dim=1)
    return RowPartials(top, torch.exp(z - top[:, None]).sum(1), target, z.sum(1), best.values, best.indices + start)


@pytest.mark.parametrize("bounds", [(0, 61), (0, 1, 61), (0, 13, 40, 61)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_merged_partials_give_the_reference_loss(bounds, smoothing):
    x, w, y = make_inputs(9, 61, 16, ignored=2, seed=3)
    config = LossConfig.build(mf.SphereFace(), 30.0, "detached", -100, smoothing)
    pieces = [partials_of_range(x, w, y, config, a, b) for a, b in zip(bounds, bounds[1:])]
    merged = pieces[0]
    for piece in pieces[1:]:
        merged = merge_partials(merged, piece)
    expected = TorchBackend().per_row_loss(x, w, y, config)
    assert_close("loss", row_loss(merged, y, -100, smoothing, 61), expected.loss, 1e-12)
    assert torch.equal(merged.best_class, expected.prediction)
