"""marginfused.compat.insightface.load_partial_fc: arcface_torch's per-rank Partial FC checkpoints
into a single-process head and into sharded heads on other numbers of ranks.

The checkpoints are written here as arcface_torch's train_v2.py writes them: per rank, a dict of
epoch, global_step, the backbone's state_dict, the Partial FC module's state_dict ({"weight": its
rows of the centres, partial_fc_v2.py's split}), the optimizer's state_dict (a real torch SGD with
momentum 0.9, or AdamW, over [backbone parameters, Partial FC weight], after two steps on random
gradients) and a learning-rate scheduler's state_dict. The loaded rows are compared bit for bit
with the centres and optimizer state the writer trained.
"""

import copy
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

import marginfused as mf
from marginfused.compat.insightface import checkpoint_paths, load_partial_fc, partial_fc_range
from marginfused.distributed import ShardedMarginSoftmaxLoss, shard_range
from marginfused.optim import SparseMomentumSGD

from helpers import assert_close
from ranks import run_on_ranks

NUM_CLASSES, DIM, BACKBONE_INPUTS, BATCH = 23, 8, 6, 5
SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # train_v2.py's SGD
ADAMW_OPTIONS = dict(lr=0.001, weight_decay=0.1)  # train_v2.py's AdamW (configs/base.py's values)


class Run(NamedTuple):
    """A run's checkpoint directory and what its ranks trained: the whole (C, D) centres (every
    rank's Partial FC weight in rank order), the optimizer's per-row state for them, likewise
    whole, and its scalar state (AdamW's step) of rank 0."""

    directory: Path
    centres: Tensor
    rows_state: dict[str, Tensor]
    scalar_state: dict[str, Tensor]


class PartialFcWeight(nn.Module):
    """The parameters of arcface_torch's PartialFC_V2: its weight alone, (num_local, D) from N(0, 0.01²)."""

    def __init__(self, rows: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (rows, dim), generator=generator))


def _param_groups(layout: str, backbone: nn.Module, partial_fc: nn.Module) -> list[dict]:
    """train_v2.py's groups ("insightface": the backbone's, then the Partial FC's last), or one of
    two layouts the loader must refuse."""
    if layout == "insightface":
        return [{"params": backbone.parameters()}, {"params": partial_fc.parameters()}]
    if layout == "one group":
        return [{"params": [*backbone.parameters(), *partial_fc.parameters()]}]
    assert layout == "weight first"
    return [{"params": partial_fc.parameters()}, {"params": [backbone[0].weight]}]


def _save_rank(directory: Path, rank: int, world: int, kind: str, num_classes: int, dim: int, layout: str,
               steps: int) -> tuple[Tensor, dict]:
    """Train rank `rank` of an arcface_torch run for `steps` steps on random gradients and save its
    checkpoint; returns its Partial FC weight and that weight's optimizer state."""
    generator = torch.Generator().manual_seed(100 + rank)
    backbone = nn.Sequential(nn.Linear(BACKBONE_INPUTS, dim), nn.BatchNorm1d(dim))
    num_local = num_classes // world + int(rank < num_classes % world)  # partial_fc_v2.py
    partial_fc = PartialFcWeight(num_local, dim, generator)
    groups = _param_groups(layout, backbone, partial_fc)
    optimizer = torch.optim.SGD(groups, **SGD_OPTIONS) if kind == "sgd" else torch.optim.AdamW(groups, **ADAMW_OPTIONS)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=100)
    for _ in range(steps):
        for param in [*backbone.parameters(), partial_fc.weight]:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
        schedule.step()
    torch.save({
        "epoch": 1,
        "global_step": steps,
        "state_dict_backbone": backbone.state_dict(),
        "state_dict_softmax_fc": partial_fc.state_dict(),
        "state_optimizer": optimizer.state_dict(),
        "state_lr_scheduler": schedule.state_dict(),
    }, directory / f"checkpoint_gpu_{rank}.pt")
    return partial_fc.weight.detach(), optimizer.state[partial_fc.weight]


def write_run(directory: Path, world: int, kind: str = "sgd", *, num_classes: int = NUM_CLASSES, dim: int = DIM,
              layout: str = "insightface", steps: Optional[Sequence[int]] = None) -> Run:
    """An arcface_torch run of `world` ranks with optimizer `kind` ("sgd" or "adamw"), its
    checkpoints saved in `directory`; `steps` per rank (2 each by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    ranks = [_save_rank(directory, rank, world, kind, num_classes, dim, layout, (steps or [2] * world)[rank])
             for rank in range(world)]
    state = ranks[0][1]
    rows = {key: torch.cat([s[key] for _, s in ranks]) for key, value in state.items() if value.dim() > 0}
    scalars = {key: value for key, value in state.items() if value.dim() == 0}
    return Run(directory, torch.cat([weight for weight, _ in ranks]), rows, scalars)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, int], Run]:
    """The runs most tests load: SGD and AdamW, on 2 and on 3 ranks, 23 classes."""
    root = tmp_path_factory.mktemp("runs")
    return {(kind, world): write_run(root / f"{kind}-{world}", world, kind)
            for kind in ("sgd", "adamw") for world in (2, 3)}


def _backbone() -> nn.Module:
    return nn.Linear(BACKBONE_INPUTS, DIM)


def _optimizer(kind: str, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of a run continued with marginfused: InsightFace's kind and groups."""
    groups = [{"params": backbone.parameters()}, {"params": head.parameters()}]
    return torch.optim.SGD(groups, **SGD_OPTIONS) if kind == "sgd" else torch.optim.AdamW(groups, **ADAMW_OPTIONS)


def _train_step(head: nn.Module, backbone: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> Tensor:
    """One step of backbone and head on a random batch; returns the loss."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH, BACKBONE_INPUTS, generator=generator, dtype=head.weight.dtype)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    inputs, labels = inputs.to(head.weight.device), labels.to(head.weight.device)
    optimizer.zero_grad()
    loss = head(backbone(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _check_loaded(head: nn.Module, optimizer: torch.optim.Optimizer, run: Run, start: int, stop: int) -> None:
    """The head's rows, and its optimizer state, are the run's rows [start, stop) bit for bit
    (in the head's dtype), its step the run's."""
    dtype = head.weight.dtype
    assert torch.equal(head.weight.detach(), run.centres[start:stop].to(dtype))
    state = optimizer.state[head.weight]
    assert set(state) == set(run.rows_state) | set(run.scalar_state)
    for key, value in run.rows_state.items():
        assert state[key].dtype == dtype and torch.equal(state[key], value[start:stop].to(dtype)), key
    for key, value in run.scalar_state.items():
        assert torch.equal(state[key], value), key


def _check_continues(head: nn.Module, backbone: nn.Module, optimizer: torch.optim.Optimizer, kind: str,
                     seed: int) -> None:
    """A training step after loading: the loss is finite and the optimizer steps from the loaded
    state (SGD: the new momentum is 0.9 × the loaded one + the decayed gradient; AdamW: its step
    advances by one)."""
    before = {key: value.clone() for key, value in optimizer.state[head.weight].items()}
    weight = head.weight.detach().clone()
    loss = _train_step(head, backbone, optimizer, seed)
    assert torch.isfinite(loss)
    assert not torch.equal(head.weight.detach(), weight)
    state = optimizer.state[head.weight]
    if kind == "sgd":
        momentum = SGD_OPTIONS["momentum"] * before["momentum_buffer"]
        decayed = head.weight.grad + SGD_OPTIONS["weight_decay"] * weight
        # the same three float operations: a few roundings of the values' size
        bound = 4 * 2.0**-24 * float(momentum.abs().max() + decayed.abs().max())
        assert_close("momentum after a step", state["momentum_buffer"], momentum + decayed, bound)
    else:
        assert float(state["step"]) == float(before["step"]) + 1


# --- the split and the files -----------------------------------------------------------------------


def test_partial_fc_range_is_arcface_torchs_split():
    """⌊C/R⌋ classes per rank and one more for the first C mod R (partial_fc_v2.py's num_local and
    class_start), contiguous from 0 to C; unlike shard_range's ⌈C/R⌉ per rank."""
    for classes, world in [(23, 2), (23, 3), (22, 3), (5, 8), (1000, 7), (1, 1)]:
        ranges = [partial_fc_range(classes, rank, world) for rank in range(world)]
        counts = [classes // world + (r < classes % world) for r in range(world)]
        assert [stop - start for start, stop in ranges] == counts
        assert ranges[0][0] == 0 and ranges[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert [partial_fc_range(22, r, 3) for r in range(3)] == [(0, 8), (8, 15), (15, 22)]
    assert [shard_range(22, r, 3) for r in range(3)] == [(0, 8), (8, 16), (16, 22)]


def test_checkpoint_paths_in_rank_order_from_files_or_a_directory(runs, tmp_path):
    directory = runs["sgd", 3].directory
    expected = [directory / f"checkpoint_gpu_{rank}.pt" for rank in range(3)]
    assert checkpoint_paths(directory) == expected
    assert checkpoint_paths(str(directory)) == expected
    assert checkpoint_paths([expected[2], str(expected[0]), expected[1]]) == expected
    cases = [
        ([expected[0], expected[2]], "rank(s) [1] are missing"),
        ([expected[1], expected[2]], "rank(s) [0] are missing"),
        ([*expected, runs["sgd", 2].directory / "checkpoint_gpu_1.pt"], "two checkpoints of rank 1"),
        ([directory / "checkpoint_gpu_7.pt"], "is not a file"),
        ([directory / "checkpoint_gpu_01.pt"], "is not named checkpoint_gpu_{rank}.pt"),
        ([directory / "model.pt"], "is not named checkpoint_gpu_{rank}.pt"),
        ([], "no checkpoint_gpu_{rank}.pt file"),
        (tmp_path, "no checkpoint_gpu_{rank}.pt file"),
    ]
    for files, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            checkpoint_paths(files)


# --- into a single-process head ----------------------------------------------------------------------


@pytest.mark.parametrize("kind,world,dtype", [("sgd", 3, torch.float32), ("adamw", 3, torch.float32),
                                              ("sgd", 2, torch.float64)])
def test_files_into_a_single_process_head(runs, kind, world, dtype):
    """Every file's rows into a MarginSoftmaxLoss (in its dtype), the same Parameter; its optimizer
    state replaced by the checkpoints'; training continues."""
    run = runs[kind, world]
    head = mf.MarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch", dtype=dtype)
    backbone = _backbone().to(dtype)
    optimizer = _optimizer(kind, backbone, head)
    _train_step(head, backbone, optimizer, seed=0)  # state of its own, to be replaced
    weight = head.weight
    load_partial_fc(head, run.directory, optimizer)
    assert head.weight is weight and optimizer.param_groups[1]["params"][0] is weight
    _check_loaded(head, optimizer, run, 0, NUM_CLASSES)
    _check_continues(head, backbone, optimizer, kind, seed=1)


@pytest.mark.gpu
def test_into_a_cuda_head_with_a_fused_adamw(runs):
    """On a GPU: the rows and moments on the head's device, a fused AdamW's step there in float32
    (where its kernel keeps it), and a training step from them."""
    head = mf.MarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch", device="cuda")
    backbone = _backbone().cuda()
    groups = [{"params": backbone.parameters()}, {"params": head.parameters()}]
    optimizer = torch.optim.AdamW(groups, fused=True, **ADAMW_OPTIONS)
    load_partial_fc(head, runs["adamw", 3].directory, optimizer)
    state = optimizer.state[head.weight]
    assert all(value.device == head.weight.device for value in state.values())
    assert state["step"].dtype == torch.float32 and float(state["step"]) == float(runs["adamw", 3].scalar_state["step"])
    assert torch.equal(head.weight.detach().cpu(), runs["adamw", 3].centres)
    assert torch.equal(state["exp_avg_sq"].cpu(), runs["adamw", 3].rows_state["exp_avg_sq"])
    _check_continues(head, backbone, optimizer, "adamw", seed=5)


def test_without_an_optimizer_only_the_centres_load(runs):
    head = mf.MarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch")
    load_partial_fc(head, sorted(runs["adamw", 2].directory.iterdir(), reverse=True))
    assert torch.equal(head.weight.detach(), runs["adamw", 2].centres)


def test_a_sparse_momentum_optimizer_takes_sgds_momentum(runs):
    head = mf.MarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch")
    optimizer = SparseMomentumSGD(head.parameters(), lr=0.1, momentum=0.9)
    load_partial_fc(head, runs["sgd", 3].directory, optimizer)
    _check_loaded(head, optimizer, runs["sgd", 3], 0, NUM_CLASSES)


# --- refusals ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoint directories the loader must refuse (each but "unreadable" a real run's files)."""
    root = tmp_path_factory.mktemp("odd")
    odd = {
        "24 classes": write_run(root / "classes", 2, num_classes=NUM_CLASSES + 1).directory,
        "one group": write_run(root / "one-group", 2, layout="one group").directory,
        "weight first": write_run(root / "weight-first", 2, layout="weight first").directory,
        "steps differ": write_run(root / "steps", 2, "adamw", steps=[2, 3]).directory,
        "unreadable": root / "unreadable",
        "not arcface_torch": root / "model",
    }
    odd["unreadable"].mkdir()
    (odd["unreadable"] / "checkpoint_gpu_0.pt").write_bytes(b"not a checkpoint")
    odd["not arcface_torch"].mkdir()
    torch.save({"weight": torch.zeros(NUM_CLASSES, DIM)}, odd["not arcface_torch"] / "checkpoint_gpu_0.pt")
    return odd


def _sgd_file(runs: dict[tuple[str, int], Run], rank: int) -> Path:
    """Rank `rank`'s file of the 3-rank SGD run."""
    return runs["sgd", 3].directory / f"checkpoint_gpu_{rank}.pt"


REFUSALS = [
    # name, head keyword arguments, optimizer kind, files(runs, odd_runs), error type, message
    ("another class count", dict(num_classes=NUM_CLASSES + 1), "sgd", lambda runs, odd: runs["sgd", 3].directory,
     ValueError, "checkpoint_gpu_2.pt holds 7 classes where arcface_torch's split of num_classes=24 over 3 ranks "
     "gives rank 2 8: the checkpoint has another class count than head.num_classes=24"),
    ("fewer classes", {}, "sgd", lambda runs, odd: odd["24 classes"], ValueError,
     "checkpoint_gpu_1.pt holds 12 classes where arcface_torch's split of num_classes=23 over 2 ranks gives rank 1 11"),
    ("another embedding size", dict(embedding_dim=DIM + 1), "sgd", lambda runs, odd: runs["sgd", 3].directory,
     ValueError, "checkpoint_gpu_0.pt holds centres of embedding size 8; head.embedding_dim=9"),
    ("sub-centres", dict(subcenters=2), "sgd", lambda runs, odd: runs["sgd", 3].directory, ValueError,
     "head.subcenters=2: arcface_torch's Partial FC has one centre per class"),
    ("a missing rank", {}, "sgd", lambda runs, odd: [_sgd_file(runs, 0), _sgd_file(runs, 2)],
     ValueError, r"rank\(s\) \[1\] are missing"),
    ("the last rank missing", {}, "sgd", lambda runs, odd: [_sgd_file(runs, 0), _sgd_file(runs, 1)],
     ValueError, "or is of more ranks than the 2 files given"),
    ("an optimizer without head.weight", {}, "backbone only", lambda runs, odd: runs["sgd", 3].directory, ValueError,
     "the optimizer does not hold head.weight"),
    ("SGD's state into AdamW", {}, "adamw", lambda runs, odd: runs["sgd", 3].directory, ValueError,
     r"the optimizer's state for the Partial FC weight is \['momentum_buffer'\]; this AdamW keeps "
     r"\['exp_avg', 'exp_avg_sq', 'step'\]"),
    ("AdamW's state into SparseMomentumSGD", {}, "sparse momentum", lambda runs, odd: runs["adamw", 3].directory,
     ValueError, r"is \['exp_avg', 'exp_avg_sq', 'step'\]; this SparseMomentumSGD keeps \['momentum_buffer'\]"),
    ("momentum into SGD without momentum", {}, "plain sgd", lambda runs, odd: runs["sgd", 3].directory, ValueError,
     r"is \['momentum_buffer'\]; this SGD keeps none"),
    ("an optimizer of unknown state", {}, "rmsprop", lambda runs, odd: runs["sgd", 3].directory, TypeError,
     "RMSprop's state is not known here"),
    ("a last param group of several parameters", {}, "sgd", lambda runs, odd: odd["one group"], ValueError,
     "the optimizer's last param group holds 5 parameters; arcface_torch's holds the Partial FC weight alone"),
    ("a last param group of another shape", {}, "sgd", lambda runs, odd: odd["weight first"], ValueError,
     r"has momentum_buffer of shape \(8, 6\), not the Partial FC weight's \(12, 8\)"),
    ("steps that differ", {}, "adamw", lambda runs, odd: odd["steps differ"], ValueError,
     r"the checkpoints disagree on the optimizer's step \(checkpoint_gpu_0.pt: 2.0, checkpoint_gpu_1.pt: 3.0\)"),
    ("an unreadable file", {}, "sgd", lambda runs, odd: odd["unreadable"], ValueError,
     "checkpoint_gpu_0.pt cannot be read as a torch checkpoint"),
    ("not arcface_torch's", {}, "sgd", lambda runs, odd: odd["not arcface_torch"], ValueError,
     "checkpoint_gpu_0.pt is not an arcface_torch checkpoint"),
]


def _user_optimizer(kind: str, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a refusal case hands the loader."""
    if kind in ("sgd", "adamw"):
        return _optimizer(kind, backbone, head)
    if kind == "backbone only":
        return torch.optim.SGD(backbone.parameters(), **SGD_OPTIONS)
    if kind == "sparse momentum":
        return SparseMomentumSGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    if kind == "plain sgd":
        return torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
    assert kind == "rmsprop"
    return torch.optim.RMSprop([*backbone.parameters(), *head.parameters()], lr=0.1)


@pytest.mark.parametrize("name,head_options,kind,files,error,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_says_why_and_changes_nothing(runs, odd_runs, name, head_options, kind, files, error, message):
    head = mf.MarginSoftmaxLoss(**(dict(embedding_dim=DIM, num_classes=NUM_CLASSES, backend="torch") | head_options))
    backbone = nn.Linear(BACKBONE_INPUTS, head.embedding_dim)
    optimizer = _user_optimizer(kind, backbone, head)
    _train_step(head, backbone, optimizer, seed=2)  # optimizer state that must survive
    weight, state = head.weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    with pytest.raises(error, match=message):
        load_partial_fc(head, files(runs, odd_runs), optimizer)
    assert torch.equal(head.weight.detach(), weight)
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"] and after["state"].keys() == state["state"].keys()
    for index, entries in state["state"].items():
        assert entries.keys() == after["state"][index].keys()
        assert all(torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value))
                   for key, value in entries.items())


def test_a_head_of_another_kind_is_refused(runs):
    with pytest.raises(TypeError, match="head must be a MarginSoftmaxLoss or a ShardedMarginSoftmaxLoss"):
        load_partial_fc(nn.Linear(DIM, NUM_CLASSES), runs["sgd", 2].directory)


# --- into sharded heads -----------------------------------------------------------------------------------


def _check_whole_in_state_dict(optimizer: torch.optim.Optimizer, run: Run) -> None:
    """The loaded per-row state, in the optimizer's state_dict, is the DTensor of the whole run's
    (marginfused/distributed/checkpoint.py), so a continued run checkpoints like any other, even
    before its first step."""
    head_index = len(optimizer.param_groups[0]["params"])
    saved = optimizer.state_dict()["state"][head_index]
    for key, value in run.rows_state.items():
        assert torch.equal(saved[key].full_tensor(), value), key


def _sharded_checks(rank: int, world: int, runs: dict[str, Run], opened: dict[int, list[int]]) -> list:
    """On each rank of a `world`-rank group: each run loads into a sharded head, which reads just
    the files `opened[rank]` (memory-mapped) and holds its rows of the run bit for bit; before any
    step, the optimizer's state_dict holds the whole run's state; training continues."""

    def load(kind: str) -> None:
        run = runs[kind]
        head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch")
        backbone = _backbone()
        optimizer = _optimizer(kind, backbone, head)
        with mock.patch("torch.load", wraps=torch.load) as loads:
            load_partial_fc(head, run.directory, optimizer)
        assert [Path(call.args[0]).name for call in loads.call_args_list] == [
            f"checkpoint_gpu_{file}.pt" for file in opened[rank]]
        assert all(call.kwargs["mmap"] for call in loads.call_args_list)
        start, stop = shard_range(NUM_CLASSES, rank, world)
        _check_loaded(head, optimizer, run, start, stop)
        _check_whole_in_state_dict(optimizer, run)
        _check_continues(head, backbone, optimizer, kind, seed=4)

    return [(kind, lambda kind=kind: load(kind)) for kind in runs]


def _refused_together(rank: int, world: int, directory: Path) -> list:
    """Problems some ranks alone meet, on 3 ranks: every rank raises, naming the ranks that met
    them, and changes nothing.

    - 24-class files into a 23-class head: rank 0's classes [0, 8) come from file 0 alone, which
      fits; ranks 1 and 2 read file 1, which does not;
    - a file one rank cannot see (a node without it): rank 2 is given a path that does not exist.
    """

    def refuse(files, message: str) -> None:
        head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, backend="torch")
        optimizer = _optimizer("sgd", _backbone(), head)
        weight = head.weight.detach().clone()
        with pytest.raises(ValueError, match=message + r".*\(nothing was loaded on any rank\)"):
            load_partial_fc(head, files, optimizer)
        assert torch.equal(head.weight.detach(), weight) and head.weight not in optimizer.state

    seen = [directory / "checkpoint_gpu_0.pt",
            directory / ("checkpoint_gpu_1.pt" if rank < 2 else "elsewhere/checkpoint_gpu_1.pt")]
    return [
        ("another class count",
         lambda: refuse(directory, r"rank\(s\) \[1, 2\]: checkpoint_gpu_1.pt holds 12 classes")),
        ("a file one rank cannot see",
         lambda: refuse(seen, r"rank\(s\) \[2\]: .*checkpoint_gpu_1.pt is not a file")),
    ]


def _two_to_three(rank: int, world: int, runs: dict[str, Run], refused: Path) -> list:
    """2 files (classes [0, 12) and [12, 23)) into 3 ranks ([0, 8), [8, 16), [16, 23))."""
    return _sharded_checks(rank, world, runs, {0: [0], 1: [0, 1], 2: [1]}) + _refused_together(rank, world, refused)


def _three_to_one(rank: int, world: int, runs: dict[str, Run]) -> list:
    return _sharded_checks(rank, world, runs, {0: [0, 1, 2]})


def test_two_files_into_three_ranks(runs, tmp_path):
    refused = write_run(tmp_path / "24 classes", 2, num_classes=NUM_CLASSES + 1).directory
    run_on_ranks(3, tmp_path / "ranks", _two_to_three, {kind: runs[kind, 2] for kind in ("sgd", "adamw")}, refused)


def test_three_files_into_one_rank(runs, tmp_path):
    run_on_ranks(1, tmp_path / "ranks", _three_to_one, {kind: runs[kind, 3] for kind in ("sgd", "adamw")})
