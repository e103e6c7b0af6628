"""marginfused.optim.SparseMomentumSGD: torch's SGD on dense gradients, rows-only on sparse ones."""

import pytest
import torch

from marginfused.optim import SparseMomentumSGD

from helpers import assert_close


@pytest.mark.parametrize("nesterov", [False, True])
def test_dense_gradients_follow_torch_sgd(nesterov):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    options = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    mine, reference = SparseMomentumSGD([ours], **options), torch.optim.SGD([theirs], **options)
    for _ in range(4):
        grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    # the same float64 operations, possibly in another order: a few float64 steps of the values
    assert_close("parameters", ours.detach(), theirs.detach(), 16 * 2.0**-53 * float(theirs.detach().abs().max()))


def test_a_sparse_gradient_moves_its_rows_only():
    weight = torch.randn(5, 3, dtype=torch.float64).requires_grad_()
    before = weight.detach().clone()
    optimizer = SparseMomentumSGD([weight], lr=0.1, momentum=0.9, weight_decay=0.1)
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]), torch.ones(3, 3, dtype=torch.float64), (5, 3),
                                          check_invariants=True)
    optimizer.step()
    untouched = torch.tensor([0, 2, 4])
    assert torch.equal(weight.detach()[untouched], before[untouched])
    assert torch.equal(optimizer.state[weight]["momentum_buffer"][untouched], torch.zeros(3, 3, dtype=torch.float64))
    # row 1 appears twice: its gradient is the sum, 2; plus weight decay; first step: v = g
    expected = before[1] - 0.1 * (2.0 + 0.1 * before[1])
    assert_close("row 1", weight.detach()[1], expected, 4 * 2.0**-53 * float(expected.abs().max()))


@pytest.mark.parametrize("options, words", [
    (dict(lr=-1.0), "lr must be"),
    (dict(lr=0.1, momentum=-0.5), "momentum must be"),
    (dict(lr=0.1, weight_decay=-1.0), "weight_decay must be"),
    (dict(lr=0.1, nesterov=True), "nesterov momentum needs momentum > 0"),
])
def test_bad_settings_say_which(options, words):
    with pytest.raises(ValueError, match=words):
        SparseMomentumSGD([torch.zeros(2, requires_grad=True)], **options)
