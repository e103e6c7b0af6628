"""The checking rule of tests/helpers.py passes a correct backend and catches a wrong one."""

import pytest
import torch

from marginfused.backends import REGISTRY as BACKENDS
from marginfused.backends.torch import TorchBackend

from helpers import assert_close, assert_matches_truth, make_inputs


class ShiftedBackend(TorchBackend):
    """The reference with a small error in the loss."""

    name = "shifted"

    def per_row_loss(self, x, w, y, settings):
        loss, prediction = super().per_row_loss(x, w, y, settings)
        return loss + 1e-3, prediction


@pytest.fixture
def shifted(monkeypatch):
    monkeypatch.setitem(BACKENDS, "shifted", ShiftedBackend())
    return "shifted"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_reference_passes_its_own_rule(dtype):
    x, w, y = make_inputs(7, 19, 12, ignored=2)
    assert_matches_truth("torch", x, w, y, dtype, margin="arcface", reduction="none")


def test_a_wrong_loss_fails(shifted):
    x, w, y = make_inputs(7, 19, 12)
    with pytest.raises(AssertionError, match="shifted/torch.float32/loss: max error"):
        assert_matches_truth(shifted, x, w, y, torch.float32)


def test_nan_where_the_truth_is_finite_is_reported_as_such():
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close("g", torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), 1.0)
    assert_close("g", torch.tensor([float("nan")]), torch.tensor([float("nan")]), 0.0)
