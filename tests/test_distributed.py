"""The class-sharded loss over gloo equals the single-process loss over the concatenated shards.

Each world size spawns its processes once (tests/ranks.py); every rank runs every case against a
float64 single-process reference it computes itself.
"""

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.tensor import DTensor

import marginfused as mf
from marginfused.distributed import (
    ShardedMarginSoftmaxLoss, gather_centres, sample_classes, shard_range, sharded_margin_cross_entropy,
)

from helpers import UNIT_ROUNDOFF, assert_close, budgets, cosine_bound, make_inputs, working_dtype
from ranks import run_on_ranks

LOCAL_BATCH, NUM_CLASSES, DIM = 5, 23, 12
MARGINS = [mf.CosFace(), mf.ArcFace(fallback="linear"), mf.SphereFace(), mf.ExpFace(), mf.CombinedMargin()]


def test_shard_range_is_torch_chunks_split():
    """⌈C/R⌉ classes per rank, the last rank the rest: torch.chunk's split, which is DTensor's
    Shard(0), so that a checkpoint's shards are those DCP reshards."""
    for classes, world in [(23, 2), (23, 3), (24, 4), (5, 3), (1000, 7), (1, 1)]:
        ranges = [shard_range(classes, rank, world) for rank in range(world)]
        assert [stop - start for start, stop in ranges] == [len(c) for c in torch.arange(classes).chunk(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert shard_range(23, 0, 3) == (0, 8) and shard_range(23, 2, 3) == (16, 23)
    with pytest.raises(ValueError, match="leaves the last rank no class"):
        shard_range(9, 0, 4)  # ⌈9/4⌉ = 3: 3, 3, 3, 0
    with pytest.raises(ValueError, match="leaves the last rank no class"):
        shard_range(2, 0, 3)


def test_without_a_process_group_it_says_so():
    x, w, y = make_inputs(4, 6, 5)
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        sharded_margin_cross_entropy(x, w, y, class_start=0, num_classes=6)


def test_partial_fc_sampling_keeps_positives_and_the_rate():
    labels = torch.tensor([3, 3, 17, -100, 40])
    index = sample_classes(labels, class_start=2, shard_size=20, sample_rate=0.25, generator=torch.Generator().manual_seed(0))
    assert index.tolist() == sorted(set(index.tolist())) and len(index) == 5
    assert {1, 15} <= set(index.tolist())
    everything = sample_classes(labels, class_start=2, shard_size=20, sample_rate=0.01)
    assert everything.tolist() == [1, 15]


def _adaptive_margins() -> dict:
    """The adaptive margins and the negative-logit rules, as keyword arguments, their state away
    from its start."""
    adaface = mf.AdaFace()
    adaface.batch_mean.fill_(50.0)
    adaface.batch_std.fill_(30.0)
    curricular = mf.CurricularFace()
    curricular.t.fill_(0.3)
    return {"adaface": dict(margin=adaface), "magface": dict(margin=mf.MagFace()),
            "curricularface": dict(margin=curricular),
            "filtering": dict(margin=mf.ArcFace(), interclass_filtering=0.1)}


def _cases(backends):
    for backend, margin, margin_grad, reduction in itertools.product(backends, MARGINS, ["detached", "exact"], ["mean", "sum", "none"]):
        yield f"{backend}/{margin}/{margin_grad}/{reduction}", dict(
            backend=backend, margin=margin, margin_grad=margin_grad, reduction=reduction,
            label_smoothing=0.1 if reduction == "sum" else 0.0,
        )
    for backend, (name, options), reduction in itertools.product(backends, _adaptive_margins().items(),
                                                                 ["mean", "none"]):
        yield f"{backend}/{name}/{reduction}", dict(backend=backend, margin_grad="exact", reduction=reduction,
                                                     spread_norms=True, **options)
    for backend, reduction in itertools.product(backends, ["mean", "none"]):
        yield f"{backend}/subcenters/{reduction}", dict(backend=backend, margin="arcface", reduction=reduction,
                                                        subcenters=3, label_smoothing=0.1)


def _reference(x, w, y, upstream, dtype, world, **options):
    """The single-process float64 truth and, per field, how far a correct sharded run in `dtype`
    may be from it: the suite's budget (tests/helpers.py) plus the all-reduces' float rounding,
    `world` additions of values up to each field's largest (the loss's partials, the embeddings'
    gradient)."""
    truth, limits = budgets(x, w, y, dtype, upstream if options["reduction"] == "none" else None,
                            scale=30.0, **options)
    unit = UNIT_ROUNDOFF[working_dtype(dtype)]
    for field in limits:
        limits[field] += world * unit * float(getattr(truth, field).abs().nan_to_num(0.0).max())
    return truth, limits


def _sharded(x_full, w_full, y_full, upstream, rank, world, dtype, sample_rate=1.0, generator=None, device="cpu",
             **options):
    """This rank's loss and gradients (float64, on the CPU) from its rows and shard of the inputs."""
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    start, stop = shard_range(NUM_CLASSES, rank, world)
    per_class = options.get("subcenters", 1)
    x = x_full[rows].to(device, dtype).requires_grad_()
    w = w_full[start * per_class:stop * per_class].to(device, dtype).requires_grad_()
    loss = sharded_margin_cross_entropy(
        x, w, y_full[rows].to(device), class_start=start, num_classes=NUM_CLASSES, scale=30.0,
        sample_rate=sample_rate, generator=generator, **options,
    )
    loss.backward(upstream[rows].to(device, loss.dtype) if options["reduction"] == "none" else None)
    return loss.detach().double().cpu(), x.grad.double().cpu(), w.grad.double().cpu(), rows, (start, stop)


def _check_case(rank, world, backend, dtype, device="cpu", spread_norms=False, **options):
    """One case against the single-process truth; with `spread_norms` the embeddings' norms spread
    over [4, 130] (for the adaptive margins), whose statistics must then advance on every rank as in
    a single process's call on the whole batch (each float32 statistic rounded once per call)."""
    per_class = options.get("subcenters", 1)
    x_full, w_full, y_full = make_inputs(world * LOCAL_BATCH, NUM_CLASSES * per_class, DIM, ignored=2, seed=world)
    y_full = torch.where(y_full >= 0, y_full % NUM_CLASSES, y_full)
    if spread_norms:
        x_full = F.normalize(x_full, dim=1) * torch.linspace(4.0, 130.0, len(x_full), dtype=torch.float64)[:, None]
    upstream = torch.linspace(-1.0, 2.0, world * LOCAL_BATCH, dtype=torch.float64)
    truth, limits = _reference(x_full, w_full, y_full, upstream, dtype, world, **options)
    margin = options.get("margin")
    state = copy.deepcopy(margin.state_dict()) if isinstance(margin, nn.Module) else {}
    got_loss, got_gx, got_gw, rows, (start, stop) = _sharded(
        x_full, w_full, y_full, upstream, rank, world, dtype, backend=backend, device=device, **options
    )
    expected_loss = truth.loss[rows] if options["reduction"] == "none" else truth.loss
    assert_close("loss", got_loss, expected_loss, limits["loss"])
    assert_close("x grad", got_gx, world * truth.grad_embeddings[rows], world * limits["grad_embeddings"])
    assert_close("w grad", got_gw, truth.grad_weight[start * per_class:stop * per_class], limits["grad_weight"])
    if state:
        advanced = copy.deepcopy(margin.state_dict())
        margin.load_state_dict(state)
        mf.margin_cross_entropy(x_full, w_full, y_full, backend="torch", scale=30.0,
                                **{k: v for k, v in options.items() if k != "backend"})
        for name, value in margin.state_dict().items():
            # the statistic of float32 (or float64) inputs vs float64 ones: the norms' and cosines'
            # rounding moves means ≲ 100 by ≤ λ√D·u_w relative, and the buffer rounds once
            bound = (8 * DIM**0.5 * UNIT_ROUNDOFF[working_dtype(dtype)] + 2 * 2**-24) * (1 + float(value.abs()))
            assert_close(f"statistic {name}", advanced[name].double(), value.double(), bound)


def _check_sampling(rank, world, backend, dtype, subcenters=1):
    x_full, w_full, y_full = make_inputs(world * LOCAL_BATCH, NUM_CLASSES * subcenters, DIM, ignored=1,
                                         seed=world + 10)
    y_full = torch.where(y_full >= 0, y_full % NUM_CLASSES, y_full)
    upstream = torch.zeros(world * LOCAL_BATCH, dtype=torch.float64)
    start, stop = shard_range(NUM_CLASSES, rank, world)
    # the classes every rank samples, recomputed here from the same seeds, and their rows of W
    sampled = torch.cat([
        sample_classes(y_full, s, e - s, 0.5, generator=torch.Generator().manual_seed(100 + r)) + s
        for r, (s, e) in enumerate(shard_range(NUM_CLASSES, r, world) for r in range(world))
    ])
    sampled_rows = (sampled.unsqueeze(1) * subcenters + torch.arange(subcenters)).flatten()
    renumbered = torch.where(y_full == -100, y_full, torch.searchsorted(sampled, y_full.clamp(min=0)))
    options = dict(margin="arcface", reduction="mean", subcenters=subcenters)
    truth, limits = _reference(x_full, w_full[sampled_rows], renumbered, upstream, dtype, world, **options)
    got_loss, got_gx, got_gw, rows, _ = _sharded(
        x_full, w_full, y_full, upstream, rank, world, dtype, sample_rate=0.5,
        generator=torch.Generator().manual_seed(100 + rank), backend=backend, **options,
    )
    assert_close("loss", got_loss, truth.loss, limits["loss"])
    assert_close("x grad", got_gx, world * truth.grad_embeddings[rows], world * limits["grad_embeddings"])
    expected_gw = torch.zeros((stop - start) * subcenters, DIM, dtype=torch.float64)
    mine = (sampled_rows >= start * subcenters) & (sampled_rows < stop * subcenters)
    expected_gw[sampled_rows[mine] - start * subcenters] = truth.grad_weight[mine]
    assert_close("w grad (unsampled rows zero)", got_gw, expected_gw, limits["grad_weight"])


UNEVEN = {2: [5, 2], 3: [8, 5, 0]}
"""Rows per rank for the uneven-batch check (the last batch of an epoch; a rank with none)."""


def _check_uneven_batches(rank, world, backend, dtype, reduction, device="cpu"):
    sizes = UNEVEN[world]
    x_full, w_full, y_full = make_inputs(sum(sizes), NUM_CLASSES, DIM, ignored=2, seed=world + 40)
    upstream = torch.linspace(-1.0, 2.0, sum(sizes), dtype=torch.float64)
    truth, limits = _reference(x_full, w_full, y_full, upstream, dtype, world, margin="arcface",
                               reduction=reduction, label_smoothing=0.1)
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    start, stop = shard_range(NUM_CLASSES, rank, world)
    x = x_full[rows].to(device, dtype).requires_grad_()
    w = w_full[start:stop].to(device, dtype).requires_grad_()
    loss = sharded_margin_cross_entropy(x, w, y_full[rows].to(device), class_start=start, num_classes=NUM_CLASSES,
                                        scale=30.0, reduction=reduction, label_smoothing=0.1, backend=backend)
    loss.backward(upstream[rows].to(device, loss.dtype) if reduction == "none" else None)
    assert x.grad.shape == (sizes[rank], DIM)
    expected_loss = truth.loss[rows] if reduction == "none" else truth.loss
    assert_close("loss", loss.detach().double().cpu(), expected_loss, limits["loss"])
    assert_close("x grad", x.grad.double().cpu(), world * truth.grad_embeddings[rows], world * limits["grad_embeddings"])
    assert_close("w grad", w.grad.double().cpu(), truth.grad_weight[start:stop], limits["grad_weight"])


def _check_sampled_row_updates(rank, world):
    """sample_rate=0.5 with sparse_grad=True: over 3 steps, SparseMomentumSGD moves exactly the
    rows sampled at each step, as the rule of marginfused/optim.py applied by hand to the dense
    gradient of the same loss; unsampled rows and their momentum stay bit-identical. SparseAdam
    leaves never-sampled rows bit-identical too. float64, torch backend."""
    from marginfused.optim import SparseMomentumSGD

    start, stop = shard_range(NUM_CLASSES, rank, world)
    options = dict(scale=30.0, sample_rate=0.5, backend="torch", dtype=torch.float64)
    sparse = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, sparse_grad=True, **options)
    dense = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, **options)
    adam_head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, sparse_grad=True, **options)
    with torch.no_grad():
        dense.weight.copy_(sparse.weight)
        adam_head.weight.copy_(sparse.weight)
    initial = sparse.weight.detach().clone()
    optimizer = SparseMomentumSGD(sparse.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    adam = torch.optim.SparseAdam(adam_head.parameters(), lr=0.01)
    expected, velocity = initial.clone(), torch.zeros_like(initial)
    ever_sampled = torch.zeros(stop - start, dtype=torch.bool)
    for step in range(3):
        x, _, y = make_inputs(LOCAL_BATCH, NUM_CLASSES, DIM, seed=100 * step + rank)

        def seeded():
            return torch.Generator().manual_seed(1000 * step + rank)

        labels = torch.cat([make_inputs(LOCAL_BATCH, NUM_CLASSES, DIM, seed=100 * step + r)[2] for r in range(world)])
        rows = sample_classes(labels, start, stop - start, 0.5, generator=seeded())
        ever_sampled[rows] = True
        for head, optim in ((sparse, optimizer), (adam_head, adam)):
            optim.zero_grad()
            head(x, y, generator=seeded()).backward()
            assert head.weight.grad.is_sparse
            assert sorted(head.weight.grad.coalesce().indices()[0].tolist()) == rows.tolist()
            optim.step()
        dense.weight.grad = None
        with torch.no_grad():
            dense.weight.copy_(expected)  # the reference's own weights: its gradient is taken at them
        dense(x, y, generator=seeded()).backward()
        g = dense.weight.grad[rows] + 0.01 * expected[rows]
        velocity[rows] = 0.9 * velocity[rows] + g
        expected[rows] = expected[rows] - 0.5 * velocity[rows]
        unsampled = torch.ones(stop - start, dtype=torch.bool)
        unsampled[rows] = False
        assert torch.equal(sparse.weight.detach()[unsampled], expected[unsampled])  # untouched this step
        # the same float64 operations in the same order: a few float64 steps of the weights' size
        assert_close("sampled rows", sparse.weight.detach()[rows], expected[rows], 8 * 2.0**-53 * float(expected.abs().max()))
        buffer = optimizer.state[sparse.weight]["momentum_buffer"]
        assert torch.equal(buffer[~ever_sampled], torch.zeros_like(buffer[~ever_sampled]))
    assert torch.equal(adam_head.weight.detach()[~ever_sampled], initial[~ever_sampled])
    assert not torch.equal(adam_head.weight.detach()[ever_sampled], initial[ever_sampled])


def _check_errors(rank, world):
    x, w, y = make_inputs(LOCAL_BATCH, NUM_CLASSES, DIM, seed=1)
    start, stop = shard_range(NUM_CLASSES, rank, world)
    shard = w[start:stop]
    with pytest.raises(ValueError, match="no rows on any rank"):
        sharded_margin_cross_entropy(x[:0], shard, y[:0], class_start=start, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="w_shard must hold the classes|invalid inputs on rank"):
        sharded_margin_cross_entropy(x, w[start:stop - (rank == 1)], y, class_start=start, num_classes=NUM_CLASSES)
    bad = y.clone()
    bad[0] = NUM_CLASSES if rank == 0 else bad[0]
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {NUM_CLASSES}\)|invalid inputs on rank\(s\) \[0\]"):
        sharded_margin_cross_entropy(x, shard, bad, class_start=start, num_classes=NUM_CLASSES)
    head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, dtype=torch.float64)
    assert (head.class_start, head.class_start + len(head.weight)) == (start, stop)
    assert torch.isfinite(head(x, y))


def _check_autocast(rank, world):
    """The sharded head under CPU bfloat16 autocast, as an autocast backbone feeds it (float32
    centres, bfloat16 embeddings): the bfloat16 loss and gradients by the suite's rule against the
    float64 single-process truth, the gradients in the original dtypes."""
    x_full, w_full, y_full = make_inputs(world * LOCAL_BATCH, NUM_CLASSES, DIM, ignored=1, seed=world + 20)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    start, stop = shard_range(NUM_CLASSES, rank, world)
    head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, scale=30.0)
    with torch.no_grad():
        head.weight.copy_(w_full[start:stop])
    x = x_full[rows].float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x.bfloat16(), y_full[rows])  # what an autocast backbone hands over
    loss.backward()
    assert loss.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    truth, limits = _reference(x_full, w_full, y_full, None, torch.bfloat16, world, margin="arcface", reduction="mean")
    assert_close("loss", loss.detach().double(), truth.loss, limits["loss"])
    assert_close("x grad", x.grad.double(), world * truth.grad_embeddings[rows], world * limits["grad_embeddings"])
    assert_close("w grad", head.weight.grad.double(), truth.grad_weight[start:stop], limits["grad_weight"])


def _check_margin_gradients(rank, world):
    """A per-row margin tensor of the local rows and a shared learnable parameter: each rank's
    gradients are world_size × its local rows' share of ∂L (the x_local convention), so averaged
    over ranks (as DDP averages) they are ∂L exactly. float64, torch backend:
    the bound is the contract's for ∂L/∂m (tests/test_contract.py) in float64, plus the all-reduces'
    rounding."""
    x_full, w_full, y_full = make_inputs(world * LOCAL_BATCH, NUM_CLASSES, DIM, ignored=1, seed=world + 30)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    start, stop = shard_range(NUM_CLASSES, rank, world)

    def loss_and_grads(x, w, y, m, shift, sharded):
        margin = lambda c: mf.ArcFace(m)(c) - shift  # noqa: E731
        if sharded:
            loss = sharded_margin_cross_entropy(x, w, y, margin, class_start=start, num_classes=NUM_CLASSES,
                                                scale=30.0, margin_grad="exact", backend="torch")
        else:
            loss = mf.margin_cross_entropy(x, w, y, margin, scale=30.0, margin_grad="exact", backend="torch")
        loss.backward()
        return m.grad, shift.grad

    m_full = torch.linspace(0.2, 0.6, world * LOCAL_BATCH, dtype=torch.float64)
    truth_m, truth_shift = loss_and_grads(x_full, w_full, y_full, m_full.clone().requires_grad_(),
                                          torch.tensor(0.05, dtype=torch.float64, requires_grad=True), False)
    got_m, got_shift = loss_and_grads(x_full[rows], w_full[start:stop], y_full[rows],
                                      m_full[rows].clone().requires_grad_(),
                                      torch.tensor(0.05, dtype=torch.float64, requires_grad=True), True)
    unit = 2.0**-53
    bound = 30.0 / len(y_full) * (2 * 30.0 * cosine_bound(torch.float64, DIM) + 16 * unit) + world * unit
    assert_close("per-row margin grad", got_m, world * truth_m[rows], world * bound)
    total = got_shift.clone()
    dist.all_reduce(total)
    assert_close("shared parameter grad, averaged over ranks", total / world, truth_shift, len(y_full) * bound)


def _checks(rank, world, backends):
    dtypes = {name: torch.float64 if name == "torch" else torch.float32 for name in backends}
    checks = [(name, lambda o=options: _check_case(rank, world, dtype=dtypes[o["backend"]], **o))
              for name, options in _cases(backends)]
    checks += [(f"{b}/sampling/{k} subcentres", lambda b=b, k=k: _check_sampling(rank, world, b, dtypes[b], k))
               for b in backends for k in (1, 3)]
    checks += [(f"{b}/uneven/{r}", lambda b=b, r=r: _check_uneven_batches(rank, world, b, dtypes[b], r))
               for b in backends for r in ("mean", "none")]
    checks.append(("sampled-row updates", lambda: _check_sampled_row_updates(rank, world)))
    checks.append(("errors", lambda: _check_errors(rank, world)))
    checks.append(("autocast", lambda: _check_autocast(rank, world)))
    checks.append(("margin gradients", lambda: _check_margin_gradients(rank, world)))
    checks.append(("state dict and gathered centres", lambda: _check_state_dict(rank, world)))
    checks.append(("sub-centre state dict", lambda: _check_subcenter_state_dict(rank, world)))
    return checks


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_loss_equals_the_single_process_loss(world, tmp_path):
    backends = ["torch"] + [name for name in ("cpu",) if mf.available_backends()[name] is None]
    run_on_ranks(world, tmp_path, _checks, backends)


def _triton_checks(rank, world, backends):
    """The triton backend's sharded head (its weighted centres rescaled from each rank's max to the
    global one, the targets of other ranks' classes left out): plain with smoothing, a negatives
    rule, sub-centres."""
    cases = [dict(margin="arcface", margin_grad="exact", reduction="none", label_smoothing=0.1),
             dict(margin_grad="exact", reduction="mean", spread_norms=True, **_adaptive_margins()["curricularface"]),
             dict(margin="arcface", reduction="mean", subcenters=3, label_smoothing=0.1)]
    return [(f"triton/{index}", lambda o=options: _check_case(rank, world, "triton", torch.float32, **o))
            for index, options in enumerate(cases)]


def test_sharded_loss_with_the_triton_kernels(tmp_path):
    """On 2 gloo ranks, CPU tensors through Triton's interpreter (on a GPU the NCCL test runs it)."""
    if mf.available_backends()["triton"] is not None or torch.cuda.is_available():
        pytest.skip(f"triton on CPU tensors: {mf.available_backends()['triton'] or 'a GPU is present'}")
    run_on_ranks(2, tmp_path, _triton_checks, ["triton"])


# --- checkpoints -----------------------------------------------------------------------------------


class ShiftedArcFace(nn.Module):
    """A margin with state, as an adaptive margin has running statistics: cos(θ + 0.5) − shift,
    `shift` a buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.zeros(()))

    def forward(self, cos):
        return mf.ArcFace(0.5)(cos) - self.shift


def _centres(seed, subcenters=1):
    return torch.randn(NUM_CLASSES * subcenters, DIM, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _head_holding(seed, device="cpu", subcenters=1):
    """A sharded head whose centres are _centres(seed) and whose margin's shift is seed / 8."""
    head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, ShiftedArcFace(), subcenters=subcenters, dtype=torch.float64,
                                    device=device)
    head.margin.to(device)
    with torch.no_grad():
        first = head.class_start * subcenters
        head.weight.copy_(_centres(seed, subcenters)[first:first + len(head.weight)])
        head.margin.shift.fill_(seed / 8)
    return head


def _check_subcenter_state_dict(rank, world):
    """With 3 sub-centres per class the state_dict's weight is a (C, 3, D) DTensor over this rank's
    rows (Shard(0) splits whole classes); loading takes it, the whole (C·3, D) or (C, 3, D) centres,
    or this rank's rows; gather_centres gives the (C·3, D) centres."""
    head = _head_holding(11, subcenters=3)
    weight = head.state_dict()["weight"]
    assert isinstance(weight, DTensor) and tuple(weight.shape) == (NUM_CLASSES, 3, DIM)
    assert weight.to_local().data_ptr() == head.weight.data_ptr()
    assert torch.equal(weight.full_tensor().reshape(-1, DIM), _centres(11, 3))
    mine = slice(head.class_start * 3, head.class_start * 3 + len(head.weight))
    for whole in (_centres(12, 3), _centres(12, 3).view(NUM_CLASSES, 3, DIM), _centres(12, 3)[mine]):
        head.load_state_dict({"weight": whole, "margin.shift": torch.tensor(0.0, dtype=torch.float64)})
        assert torch.equal(head.weight.detach(), _centres(12, 3)[mine])
    with pytest.raises(ValueError, match="do not fit this head"):
        head.load_state_dict({"weight": _centres(12, 2), "margin.shift": torch.tensor(0.0, dtype=torch.float64)})
    gathered = gather_centres(head, dst=0)
    assert torch.equal(gathered, _centres(12, 3)) if rank == 0 else gathered is None


def _check_state_dict(rank, world):
    """state_dict's weight is a DTensor of the whole centres over this rank's rows (the same memory);
    load_state_dict takes it back, the whole centres as one tensor, or this rank's rows, and refuses
    any other shape before loading anything; gather_centres assembles the whole centres on one rank."""
    head = _head_holding(1)
    weight = head.state_dict()["weight"]
    assert isinstance(weight, DTensor) and tuple(weight.shape) == (NUM_CLASSES, DIM)
    assert weight.to_local().data_ptr() == head.weight.data_ptr()
    assert torch.equal(weight.full_tensor(), _centres(1))
    other = _head_holding(2)
    other.load_state_dict(head.state_dict())
    assert torch.equal(other.weight.detach(), head.weight.detach()) and other.margin.shift.item() == 1 / 8
    other.load_state_dict({"weight": _centres(3), "margin.shift": torch.tensor(0.0, dtype=torch.float64)})
    assert torch.equal(other.weight.detach(), _centres(3)[head.class_start:head.class_start + len(head.weight)])
    before = other.weight.detach().clone()
    for wrong in (_centres(4)[:-1], _centres(4)[:, :-1], torch.zeros(len(head.weight) + 1, DIM, dtype=torch.float64)):
        with pytest.raises(ValueError, match="do not fit this head"):
            other.load_state_dict({"weight": wrong, "margin.shift": torch.tensor(5.0, dtype=torch.float64)})
        assert torch.equal(other.weight.detach(), before) and other.margin.shift.item() == 0.0
    gathered = gather_centres(head, dst=world - 1)
    if rank == world - 1:
        assert torch.equal(gathered, _centres(1))
    else:
        assert gathered is None


def _checkpoint_legs(rank, world, load_from, expect_seed, save_to, save_seed, device="cpu"):
    """Load the checkpoint `load_from` (saved on any number of ranks) into a head built here with
    other centres: every rank gets exactly its rows of _centres(expect_seed) and the margin's state;
    a head of other num_classes or embedding_dim refuses it, unchanged. Then save _centres(save_seed).
    Each for a head of one centre per class and of 3 sub-centres (checkpoint ids with "-k3")."""

    def load(subcenters):
        head = _head_holding(expect_seed + 100, device, subcenters)
        state = head.state_dict()
        dcp.load({"head": state}, checkpoint_id=load_from + ("-k3" if subcenters > 1 else ""))
        head.load_state_dict(state)
        start, stop = shard_range(NUM_CLASSES, rank, world)
        expected = _centres(expect_seed, subcenters)[start * subcenters:stop * subcenters]
        assert torch.equal(head.weight.detach().cpu(), expected)
        assert head.margin.shift.item() == expect_seed / 8

    def refuse_other_shapes():
        for classes, dim in ((NUM_CLASSES + 1, DIM), (NUM_CLASSES, DIM + 1)):
            head = ShardedMarginSoftmaxLoss(dim, classes, ShiftedArcFace(), dtype=torch.float64, device=device)
            head.margin.to(device)
            before = head.weight.detach().clone()
            with pytest.raises(CheckpointException, match="Size mismatch"):  # a BaseException
                dcp.load({"head": head.state_dict()}, checkpoint_id=load_from)
            assert torch.equal(head.weight.detach(), before)

    def save(subcenters):
        state = _head_holding(save_seed, device, subcenters).state_dict()
        dcp.save({"head": state}, checkpoint_id=save_to + ("-k3" if subcenters > 1 else ""))

    checks = [("load", lambda: load(1)), ("load with sub-centres", lambda: load(3)),
              ("refuse other shapes", refuse_other_shapes)] if load_from else []
    return checks + [("save", lambda: save(1)), ("save with sub-centres", lambda: save(3))]


def test_checkpoints_move_between_world_sizes(tmp_path):
    """torch.distributed.checkpoint: saved on 2 ranks, loaded on 3, saved again and loaded on 2:
    the centres and the margin's state arrive exactly."""
    first, second = str(tmp_path / "two"), str(tmp_path / "three")
    run_on_ranks(2, tmp_path / "save on 2", _checkpoint_legs, None, None, first, 5)
    run_on_ranks(3, tmp_path / "load on 3", _checkpoint_legs, first, 5, second, 6)
    run_on_ranks(2, tmp_path / "load on 2", _checkpoint_legs, second, 6, str(tmp_path / "again"), 7)


# --- the same on NCCL, where two GPUs exist --------------------------------------------------------


def _nccl_checks(rank, world, backends, checkpoint):
    """The loss cases and uneven batches on this rank's GPU for every GPU backend, then one leg
    of the checkpoint round trip (`checkpoint`: _checkpoint_legs's arguments)."""
    device = f"cuda:{rank}"
    checks = []
    if world == 2:
        checks = [(name, lambda o=options: _check_case(rank, world, dtype=torch.float32, device=device, **o))
                  for name, options in _cases(backends)]
        checks += [(f"{b}/uneven/{r}", lambda b=b, r=r: _check_uneven_batches(rank, world, b, torch.float32, r, device))
                   for b in backends for r in ("mean", "none")]
    return checks + _checkpoint_legs(rank, world, *checkpoint, device=device)


@pytest.mark.gpu
def test_nccl_sharded_loss_and_checkpoints(tmp_path):
    """On two GPUs over NCCL: the sharded loss equals the single-process float64 truth for every GPU
    backend, and a checkpoint saved on 2 ranks loads on 1, and back."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    backends = [name for name in ("torch", "triton", "cuda") if mf.available_backends()[name] is None]
    first, second = str(tmp_path / "two"), str(tmp_path / "one")
    run_on_ranks(2, tmp_path / "save on 2", _nccl_checks, backends, (None, None, first, 5), process_group="nccl")
    run_on_ranks(1, tmp_path / "load on 1", _nccl_checks, backends, (first, 5, second, 6), process_group="nccl")
    run_on_ranks(2, tmp_path / "load on 2", _nccl_checks, backends, (second, 6, str(tmp_path / "again"), 7),
                 process_group="nccl")
