"""The fused backends' custom operators: correct gradients, registrations that pass PyTorch's
opcheck, and a training step traced by torch.compile(fullgraph=True) equal to eager."""

import pytest
import torch
import torch.nn.functional as F

import marginfused as mf
from marginfused.backends import REGISTRY as BACKENDS
from marginfused.backends import KernelSettings
from marginfused.backends.ops import FusedBackend, KernelFields
from marginfused.backends.torch import TorchBackend
from marginfused.negatives import NegativesRule
from marginfused.settings import LossSettings

from helpers import (
    LAMBDA, MARGINS, assert_close, assert_matches_truth, budgets, cosine_bound, make_inputs, shard_targets,
)


class ReferenceFused(TorchBackend):
    """The custom-operator path over the reference's own partials and gradients."""

    name = "reference-fused"
    per_row_loss = FusedBackend.per_row_loss


@pytest.fixture
def reference_fused(monkeypatch):
    monkeypatch.setitem(BACKENDS, ReferenceFused.name, ReferenceFused())
    return ReferenceFused.name


@pytest.fixture(params=["reference-fused", "cpu", "triton"])
def fused(request, monkeypatch):
    """The custom-operator path of each fused backend that runs on CPU tensors here."""
    if request.param == ReferenceFused.name:
        monkeypatch.setitem(BACKENDS, ReferenceFused.name, ReferenceFused())
        return request.param
    implementation = BACKENDS[request.param]
    reason = implementation.unavailable_reason() or implementation.unsupported_reason("cpu", torch.float32)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    return request.param


@pytest.mark.parametrize("margin_grad", ["detached", "exact"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_operator_gives_the_reference_gradients(reference_fused, margin_grad, reduction):
    x, w, y = make_inputs(7, 13, 10, ignored=2, seed=0)
    options = dict(margin="sphereface", margin_grad=margin_grad, reduction=reduction, label_smoothing=0.1)
    assert_matches_truth(reference_fused, x, w, y, torch.float32, **options)


@pytest.mark.parametrize("need_x", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("rule", [False, True], ids=["plain", "negatives-rule"])
def test_opcheck(fused, rule, need_x):
    """Both operators of a fused backend pass PyTorch's own checks of a custom operator: schema,
    fake (meta) shapes — what the forward keeps for the backward included — autograd registration,
    and the same results under torch.compile's paths."""
    x, w, y = make_inputs(5, 9, 8, ignored=1, seed=1)
    x, w = x.float(), w.float()
    settings = LossSettings.build(mf.ArcFace(fallback="easy"), 30.0, "exact", -100, 0.1)
    logit, slope = (t.float() for t in shard_targets(x, w, y, settings))
    negatives_rule = NegativesRule(torch.full((5,), 0.2), torch.full((5,), 0.3), 1.0) if rule else None
    fields = KernelFields.flat(KernelSettings.for_call(settings, 9, negatives_rule))
    operators = BACKENDS[fused].operators
    torch.library.opcheck(operators.partials, (x, w, y, logit, slope), dict(fields, need_x=need_x))
    row_max, sumexp, logit_sum, _, _, *saved = operators.partials(x, w, y, logit, slope, **fields, need_x=need_x)
    arguments = (x.requires_grad_(need_x), w.requires_grad_(), y, logit.requires_grad_(), slope, row_max, sumexp.log(),
                 logit_sum, *saved)
    torch.library.opcheck(operators.loss, arguments, fields)


def integer_network(seed: int, batch: int, dim_in: int, dim_out: int):
    """A bias-free linear layer and inputs with small integer entries: its output is exact in
    float32 whatever order a compiled or eager matmul sums in, so the loss head sees the same
    embeddings in both (and in the float64 truth)."""
    g = torch.Generator().manual_seed(seed)
    network = torch.nn.Linear(dim_in, dim_out, bias=False)
    with torch.no_grad():
        network.weight.copy_(torch.randint(-3, 4, (dim_out, dim_in), generator=g).float())
    x = torch.randint(-3, 4, (batch, dim_in), generator=g).float()
    return network, x


def check_step(network, head, x, y, step, **options) -> None:
    """The loss, the head's weight gradient and the network's weight gradient of one training step
    against the float64 truth: the head's by the suite's rule; the network's, Σ_i g_i x_iᵀ with g
    the embeddings' gradient, off by at most the error of g times Σ_i |x_i| plus the float32
    rounding of that sum (λ·√B·2⁻²⁴ times Σ_i |g_i||x_i|)."""
    embeddings = network(x).detach().double()
    truth, limits = budgets(embeddings, head.weight.detach().double(), y, torch.float32, **options)
    for parameter in [*network.parameters(), *head.parameters()]:
        parameter.grad = None
    loss, accuracy = step(x, y)
    loss.backward()
    assert_close("loss", loss.detach().double(), truth.loss, limits["loss"])
    assert_close("head weight grad", head.weight.grad.double(), truth.grad_weight, limits["grad_weight"])
    xd = x.double()
    expected = truth.grad_embeddings.T @ xd
    rounding = LAMBDA * x.shape[0] ** 0.5 * 2**-24 * (truth.grad_embeddings.abs().T @ xd.abs())
    bound = limits["grad_embeddings"] * xd.abs().sum(dim=0).max() + rounding.max()
    assert_close("network weight grad", network.weight.grad.double(), expected, float(bound))
    # accuracy: rows whose top two cosines are within the cosines' rounding may go either way
    cos = F.normalize(embeddings, dim=1) @ F.normalize(head.weight.detach().double(), dim=1).T
    cos = cos.unflatten(1, (-1, head.subcenters)).amax(dim=2)  # each class's best sub-centre
    top2 = cos.topk(2, dim=1).values
    undecided = int((top2[:, 0] - top2[:, 1] <= 2 * cosine_bound(torch.float32, embeddings.shape[1])).sum())
    expected_accuracy = float((cos.argmax(dim=1) == y).double().mean())
    assert abs(float(accuracy) - expected_accuracy) <= undecided / len(y) + 2**-24  # float32 accuracy


def test_compiled_training_step_equals_eager(fused):
    torch.manual_seed(0)
    network, x = integer_network(0, 12, 16, 8)
    head = mf.MarginSoftmaxLoss(8, 50, margin="arcface", margin_grad="exact", backend=fused)
    y = torch.randint(0, 50, (12,))

    def step(x, y):
        return head(network(x), y, return_accuracy=True)

    options = dict(margin="arcface", margin_grad="exact")
    check_step(network, head, x, y, step, **options)
    check_step(network, head, x, y, torch.compile(step, fullgraph=True), **options)


@pytest.mark.parametrize("case", ["adaface", "magface", "curricularface", "interclass-filtering", "subcentres"])
def test_compiled_step_with_adaptive_margins_rules_and_subcentres(fused, case):
    """Adaptive margins (their statistics' updates included), the negative-logit rule and
    sub-centres trace with no graph break."""
    torch._dynamo.reset()  # one step function per case: each case compiles afresh, not as a recompile
    torch.manual_seed(3)
    network, x = integer_network(3, 12, 16, 8)
    options = {
        "adaface": dict(margin=mf.AdaFace()), "magface": dict(margin=mf.MagFace()),
        "curricularface": dict(margin=mf.CurricularFace()),
        "interclass-filtering": dict(margin="arcface", interclass_filtering=0.3),
        "subcentres": dict(margin="arcface", subcenters=3),
    }[case]
    head = mf.MarginSoftmaxLoss(8, 40, backend=fused, **options)
    y = torch.randint(0, 40, (12,))
    step = torch.compile(lambda x, y: head(network(x), y, return_accuracy=True), fullgraph=True)
    check_step(network, head, x, y, step, **{**options, "margin": head.margin})


@pytest.mark.parametrize("margin", list(MARGINS))
def test_every_built_in_margin_compiles_without_a_graph_break(reference_fused, margin):
    """Every built-in margin, each kind and fallback, traces with fullgraph=True. The margin runs in
    the target pre-pass, the same PyTorch code whichever backend follows, so the operator over the
    reference's partials stands for them all."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    network, x = integer_network(4, 12, 16, 8)
    head = mf.MarginSoftmaxLoss(8, 40, margin=MARGINS[margin], margin_grad="exact", backend=reference_fused)
    y = torch.randint(0, 40, (12,))
    step = torch.compile(lambda x, y: head(network(x), y, return_accuracy=True), fullgraph=True)
    check_step(network, head, x, y, step, margin=MARGINS[margin], margin_grad="exact")


def test_elasticface_compiles_and_says_why_not_with_its_own_generator(reference_fused):
    """ElasticFace draws each row's margin in the traced graph (from torch's default generator):
    in eval mode its loss is the mean margin's; a generator of its own, which torch.compile cannot
    trace, is refused with the reason."""
    network, x = integer_network(5, 12, 16, 8)
    y = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(5))
    head = mf.MarginSoftmaxLoss(8, 40, margin=mf.ElasticFace(), backend=reference_fused)
    torch._dynamo.reset()
    step = torch.compile(lambda x, y: head(network(x), y, return_accuracy=True), fullgraph=True)
    loss, _ = step(x, y)  # training mode: margins drawn inside the graph
    assert bool(torch.isfinite(loss))
    head.eval()
    torch._dynamo.reset()
    check_step(network, head, x, y, step, margin=mf.ArcFace(0.5))
    head.train()
    head.margin.generator = torch.Generator().manual_seed(6)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="pass generator=None"):
        step(x, y)


@pytest.mark.parametrize("label", [-1, 40], ids=["negative", "num_classes"])
def test_a_compiled_call_refuses_a_label_out_of_range(fused, label):
    """Under torch.compile the labels are checked on the device (no host synchronisation): a label
    outside [0, C) that is not ignore_index fails the call with the eager check's words, instead of
    passing as a class or failing inside a compiled gather."""
    torch._dynamo.reset()
    head = mf.MarginSoftmaxLoss(8, 40, backend=fused)
    step = torch.compile(lambda x, y: head(x, y), fullgraph=True)
    x = torch.randn(5, 8)
    assert bool(torch.isfinite(step(x, torch.tensor([1, 2, 3, 4, -100]))))
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 40\) or equal ignore_index=-100"):
        step(x, torch.tensor([1, 2, label, 4, 5]))


def test_compiled_with_the_automatic_backend_choice():
    torch.manual_seed(1)
    network, x = integer_network(1, 10, 16, 8)
    head = mf.MarginSoftmaxLoss(8, 40)  # backend="auto"
    y = torch.randint(0, 40, (10,))
    check_step(network, head, x, y, torch.compile(lambda x, y: head(network(x), y, return_accuracy=True), fullgraph=True))


def test_compiled_step_with_a_callable_margin_in_exact_mode(fused):
    """A user's margin traces too: its slope comes from forward-mode autograd, which compiles."""
    torch.manual_seed(2)
    network, x = integer_network(2, 10, 16, 8)

    def margin(c):
        return torch.cos(torch.acos(c) + 0.3) - 0.1

    head = mf.MarginSoftmaxLoss(8, 40, margin=margin, margin_grad="exact", backend=fused)
    y = torch.randint(0, 40, (10,))
    step = torch.compile(lambda x, y: head(network(x), y, return_accuracy=True), fullgraph=True)
    check_step(network, head, x, y, step, margin=margin, margin_grad="exact")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["arcface", "curricularface", "subcentres"])
def test_gpu_compiled_training_step_with_triton_on_cuda_tensors(case):
    """torch.compile(fullgraph=True) of a training step whose head runs the Triton kernels on CUDA
    tensors (plain, with the negative-logit rule, with sub-centres): eager and compiled each held
    to the float64 truth."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    network, x = integer_network(4, 12, 16, 8)
    options = {
        "arcface": dict(margin="arcface", margin_grad="exact"),
        "curricularface": dict(margin=mf.CurricularFace()),
        "subcentres": dict(margin="arcface", subcenters=3),
    }[case]
    head = mf.MarginSoftmaxLoss(8, 40, backend="triton", **options).cuda()
    network, x, y = network.cuda(), x.cuda(), torch.randint(0, 40, (12,)).cuda()

    def step(x, y):
        return head(network(x), y, return_accuracy=True)

    check_step(network, head, x, y, step, **{**options, "margin": head.margin})
    check_step(network, head, x, y, torch.compile(step, fullgraph=True), **{**options, "margin": head.margin})
