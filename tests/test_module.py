"""MarginSoftmaxLoss: the class-centre head as an nn.Module."""

import io

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


def test_repr_names_the_configuration():
    text = repr(mf.MarginSoftmaxLoss(8, 13, margin="expface"))
    assert "num_classes=13" in text and "ExpFace(m=0.7)" in text


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(embedding_dim=0, num_classes=3), ValueError, "embedding_dim must be >= 1"),
        (dict(embedding_dim=4, num_classes=2.0), TypeError, "num_classes must be an int"),
        (dict(embedding_dim=4, num_classes=3, scale=-1.0), ValueError, "scale"),
        (dict(embedding_dim=4, num_classes=3, margin="lmcl"), ValueError, "margin"),
        (dict(embedding_dim=4, num_classes=3, reduction="avg"), ValueError, "reduction"),
        (dict(embedding_dim=4, num_classes=3, margin_grad="full"), ValueError, "margin_grad"),
    ],
)
def test_invalid_configuration_raises_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        mf.MarginSoftmaxLoss(**kwargs)
