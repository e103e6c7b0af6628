"""The fused backends' custom operators: correct gradients, registrations that pass PyTorch's
opcheck, and a training step traced by torch.compile(fullgraph=True) equal to eager."""

import pytest
import torch

import marginfused as mf
from marginfused.config import LossConfig
from marginfused.dispatch import BACKENDS
from marginfused.fused import FusedBackend, _settings, margin_loss
from marginfused.reference import TorchBackend

from helpers import assert_close, make_inputs, run, usable_backends


class ReferenceFused(FusedBackend):
    """The custom-operator path over the reference's own partials and backward."""

    name = "reference-fused"
    unavailable_reason = TorchBackend.unavailable_reason
    unsupported_reason = TorchBackend.unsupported_reason
    row_partials = TorchBackend.row_partials
    shard_backward = TorchBackend.shard_backward
    _range_logits = TorchBackend._range_logits


@pytest.fixture
def reference_fused(monkeypatch):
    monkeypatch.setitem(BACKENDS, ReferenceFused.name, ReferenceFused())
    return ReferenceFused.name


FUSED = [name for name in usable_backends() if isinstance(BACKENDS[name], FusedBackend)]


@pytest.fixture(params=["reference-fused", *FUSED])
def fused(request, monkeypatch):
    if request.param == ReferenceFused.name:
        monkeypatch.setitem(BACKENDS, ReferenceFused.name, ReferenceFused())
    return request.param


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_operator_gives_the_reference_gradients(reference_fused, margin_grad, reduction):
    x, w, y = make_inputs(7, 13, 10, ignored=2, seed=0)
    options = dict(margin="sphereface", margin_grad=margin_grad, reduction=reduction, label_smoothing=0.1)
    upstream = torch.linspace(-1, 1, 7, dtype=torch.float64) if reduction == "none" else None
    got = run(reference_fused, x.float(), w.float(), y, upstream=upstream, **options)
    expected = run("torch", x.float(), w.float(), y, upstream=upstream, **options)
    for field in ("loss", "grad_embeddings", "grad_weight"):
        assert_close(field, getattr(got, field), getattr(expected, field), 1e-5)


def test_opcheck(reference_fused):
    x, w, y = make_inputs(5, 9, 8, ignored=1, seed=1)
    config = LossConfig.build(mf.ArcFace(fallback="easy"), 30.0, "exact", -100, 0.1)
    args = (x.float().requires_grad_(), w.float().requires_grad_(), y, reference_fused, *_settings(config))
    torch.library.opcheck(margin_loss, args)


def test_compiled_training_step_equals_eager(fused):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    head = mf.MarginSoftmaxLoss(8, 50, margin="arcface", margin_grad="exact", backend=fused)
    x = torch.randn(12, 16)
    y = torch.randint(0, 50, (12,))

    def step(x, y):
        return head(network(x), y, return_accuracy=True)

    def loss_and_grads(fn):
        for parameter in [*network.parameters(), *head.parameters()]:
            parameter.grad = None
        loss, accuracy = fn(x, y)
        loss.backward()
        return [loss.detach(), accuracy] + [p.grad.clone() for p in [*network.parameters(), head.weight]]

    eager = loss_and_grads(step)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True))
    for index, (got, want) in enumerate(zip(compiled, eager)):
        assert_close(f"output {index}", got.double(), want.double(), 1e-4 * max(1.0, want.abs().max().item()))


def test_compiled_with_the_automatic_backend_choice():
    torch.manual_seed(1)
    network = torch.nn.Linear(16, 8)
    head = mf.MarginSoftmaxLoss(8, 40)  # backend="auto"
    x, y = torch.randn(10, 16), torch.randint(0, 40, (10,))
    compiled = torch.compile(lambda x, y: head(network(x), y), fullgraph=True)
    assert_close("loss", compiled(x, y).detach().double(), head(network(x), y).detach().double(), 1e-4)
