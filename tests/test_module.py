"""MarginSoftmaxLoss: the class-centre head as an nn.Module."""

import io

import numpy as np
import pytest
import torch

import marginfused as mf

from helpers import make_inputs


def test_forward_is_the_functional_loss_with_the_modules_settings():
    head = mf.MarginSoftmaxLoss(8, 13, margin="cosface", scale=30.0, margin_grad="exact", label_smoothing=0.1)
    x, _, y = make_inputs(6, 13, 8, ignored=1, seed=0)
    x = x.float()
    expected = mf.margin_cross_entropy(
        x, head.weight, y, mf.CosFace(), scale=30.0, margin_grad="exact", label_smoothing=0.1
    )
    torch.testing.assert_close(head(x, y), expected)
    loss, accuracy = head(x, y, return_accuracy=True)
    assert 0 <= accuracy.item() <= 1


def test_weight_is_the_only_parameter_and_gets_gradients():
    head = mf.MarginSoftmaxLoss(8, 13)
    assert [name for name, _ in head.named_parameters()] == ["weight"]
    assert head.weight.shape == (13, 8)
    x, _, y = make_inputs(6, 13, 8, seed=1)
    head(x.float(), y).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_weight_init_is_small_gaussian_and_seeded():
    torch.manual_seed(0)
    head = mf.MarginSoftmaxLoss(64, 500)
    w = head.weight.detach().clone()
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(0.01, rel=0.05)
    torch.manual_seed(0)
    assert torch.equal(mf.MarginSoftmaxLoss(64, 500).weight, head.weight)
    head.reset_parameters()
    assert not torch.equal(head.weight.detach(), w)


def test_dtype_and_device_of_the_weight():
    head = mf.MarginSoftmaxLoss(4, 3, dtype=torch.float64, device="cpu")
    assert head.weight.dtype == torch.float64 and head.weight.device.type == "cpu"


@pytest.mark.parametrize("margin", ["adaface", "curricularface"])
def test_an_adaptive_margins_state_follows_the_heads_dtype(margin):
    """A float64 head keeps its margin's running statistics in float64 too, as .to() does."""
    head = mf.MarginSoftmaxLoss(4, 3, margin=margin, dtype=torch.float64)
    assert {buffer.dtype for buffer in head.margin.buffers()} == {torch.float64}
    head.float()
    assert {buffer.dtype for buffer in head.margin.buffers()} == {torch.float32}


def test_state_dict_round_trip():
    torch.manual_seed(1)
    head = mf.MarginSoftmaxLoss(8, 13, margin=mf.ArcFace(0.4, fallback="easy"))
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    restored = mf.MarginSoftmaxLoss(8, 13, margin=mf.ArcFace(0.4, fallback="easy"))
    assert not torch.equal(restored.weight, head.weight)
    restored.load_state_dict(torch.load(buffer))
    assert list(head.state_dict()) == ["weight"]
    assert torch.equal(restored.weight, head.weight)
    x, _, y = make_inputs(5, 13, 8, seed=3)
    assert torch.equal(restored(x.float(), y), head(x.float(), y))


def test_repr_names_the_configuration_and_after_a_call_the_backend_that_ran():
    head = mf.MarginSoftmaxLoss(8, 13, margin="expface", backend="torch")
    text = repr(head)
    assert "num_classes=13" in text and "ExpFace(m=0.7)" in text and "ran=" not in text
    x, _, y = make_inputs(5, 13, 8, seed=3)
    head(x.float(), y)
    assert "backend='torch', ran='torch'" in repr(head)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(embedding_dim=0, num_classes=3), ValueError, "embedding_dim must be >= 1"),
        (dict(embedding_dim=4, num_classes=2.0), TypeError, "num_classes must be an int"),
        (dict(embedding_dim=4, num_classes=3, scale=-1.0), ValueError, "scale"),
        (dict(embedding_dim=4, num_classes=3, margin="lmcl"), ValueError, "margin"),
        (dict(embedding_dim=4, num_classes=3, reduction="avg"), ValueError, "reduction"),
        (dict(embedding_dim=4, num_classes=3, margin_grad="full"), ValueError, "margin_grad"),
        (dict(embedding_dim=4, num_classes=3, backend="foo"), ValueError, "backend must be one of auto"),
        (dict(embedding_dim=4, num_classes=3, sample_rate=2.0), ValueError, r"sample_rate must be in \(0, 1\]"),
        (dict(embedding_dim=4, num_classes=3, sample_rate=0.0), ValueError, r"sample_rate must be in \(0, 1\]"),
    ],
)
def test_invalid_configuration_raises_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        mf.MarginSoftmaxLoss(**kwargs)


def test_numpy_scalars_are_numbers():
    """numpy's scalars (a float32 scale from a config, an int64 class count) are accepted wherever a
    number is, and give the same loss as Python's."""
    x, w, y = make_inputs(6, 10, 8, seed=5)
    head = mf.MarginSoftmaxLoss(np.int64(8), np.int64(10), margin=mf.ArcFace(np.float32(0.5)), scale=np.float32(32),
                                label_smoothing=np.float64(0.1), ignore_index=np.int32(-100), subcenters=np.int64(1),
                                sample_rate=np.float64(1.0), backend="torch", dtype=torch.float64)
    assert head.num_classes == 10 and isinstance(head.num_classes, int) and head.scale == 32.0
    with torch.no_grad():
        head.weight.copy_(w)
    expected = mf.margin_cross_entropy(x, w, y, margin=mf.ArcFace(0.5), scale=32.0, label_smoothing=0.1,
                                       backend="torch")
    assert torch.equal(head(x, y), expected)


def test_elasticface_is_a_name():
    x, w, y = make_inputs(6, 10, 8, seed=6)
    head = mf.MarginSoftmaxLoss(8, 10, margin="elasticface", backend="torch", dtype=torch.float64)
    assert isinstance(head.margin, mf.ElasticFace)
    head.eval()
    with torch.no_grad():
        head.weight.copy_(w)
    assert torch.equal(head(x, y), mf.margin_cross_entropy(x, w, y, margin=mf.ArcFace(0.5), backend="torch"))
    assert torch.isfinite(mf.margin_cross_entropy(x, w, y, margin="elasticface", backend="torch"))


def test_partial_fc_in_one_process_is_the_loss_over_the_sampled_classes():
    """sample_rate < 1 in training: the loss, gradients and accuracy are exactly those of the loss
    over the classes `marginfused.sampling.sample_classes` keeps (the labels' classes and random
    others); rows of W not sampled get no gradient; in eval mode every class counts."""
    from marginfused.sampling import sample_classes

    x, w, y = make_inputs(12, 60, 8, ignored=2, seed=7)
    head = mf.MarginSoftmaxLoss(8, 60, margin="arcface", sample_rate=0.25, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    loss, accuracy = head(x, y, return_accuracy=True, generator=torch.Generator().manual_seed(8))
    loss.backward()
    index = sample_classes(y, 0, 60, 0.25, -100, torch.Generator().manual_seed(8))
    assert len(index) == 15 and set(y[y >= 0].tolist()) <= set(index.tolist())
    sampled = w[index].clone().requires_grad_()
    local = torch.where(y >= 0, torch.searchsorted(index, y.clamp(min=0)), y)
    expected, expected_accuracy = mf.margin_cross_entropy(x, sampled, local, margin="arcface", backend="torch",
                                                          return_accuracy=True)
    expected.backward()
    assert torch.equal(loss.detach(), expected.detach()) and torch.equal(accuracy, expected_accuracy)
    assert torch.equal(head.weight.grad[index], sampled.grad)
    others = torch.ones(60, dtype=torch.bool)
    others[index] = False
    assert not bool(head.weight.grad[others].any())
    head.eval()
    assert torch.equal(head(x, y).detach(), mf.margin_cross_entropy(x, w, y, margin="arcface", backend="torch"))


def test_a_partial_fc_label_out_of_range_is_refused_before_sampling():
    x, _, y = make_inputs(4, 10, 8, seed=9)
    head = mf.MarginSoftmaxLoss(8, 10, sample_rate=0.5, backend="torch")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        head(x.float(), torch.tensor([1, 2, 10, 3]))
