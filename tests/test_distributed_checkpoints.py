"""PyTorch's standard checkpoint recipe carries a sharded head and its optimizer state across world
sizes: `get_state_dict(model, optimizer)` and `dcp.save` on R ranks, then `dcp.load` and
`set_state_dict` on R′ ranks restore the head's rows and their optimizer state bit for bit (SGD's
momentum, Adam's moments, SparseMomentumSGD's buffers after sampled-row updates), with the
backbone beside them in the same checkpoint, C not divisible by either world size.

Each leg trains a few steps, saves, and writes every rank's rows of the head and of its optimizer
state as they are (the truth the next leg compares with, assembled from the ranks' own tensors,
not through the code under test)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from marginfused.distributed import ShardedMarginSoftmaxLoss
from marginfused.optim import SparseMomentumSGD

from ranks import run_on_ranks

NUM_CLASSES, DIM, INPUTS, LOCAL_BATCH = 23, 8, 5, 6
VARIANTS = {
    "sgd": (dict(), lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adam": (dict(), lambda params: torch.optim.Adam(params, lr=0.01)),
    "sampled rows": (dict(sample_rate=0.3, sparse_grad=True),
                     lambda params: SparseMomentumSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)),
}
"""Per variant: the head's options and its optimizer."""


class Model(nn.Module):
    """A backbone (replicated, under DDP) and a sharded head."""

    def __init__(self, seed: int, **head_options):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = DistributedDataParallel(nn.Linear(INPUTS, DIM))
        self.head = ShardedMarginSoftmaxLoss(DIM, NUM_CLASSES, scale=16.0, backend="torch", **head_options)

    def forward(self, inputs, labels, generator=None):
        return self.head(self.backbone(inputs), labels, generator=generator)


def _train(model, optimizer, rank, steps=3):
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        inputs, labels = torch.randn(LOCAL_BATCH, INPUTS, generator=g), torch.randint(0, NUM_CLASSES, (LOCAL_BATCH,), generator=g)
        optimizer.zero_grad()
        loss = model(inputs, labels, generator=torch.Generator().manual_seed(step))
        loss.backward()
        optimizer.step()
        assert bool(torch.isfinite(loss))


def _rows(model, optimizer) -> dict:
    """This rank's rows of the head and of its optimizer state, the backbone and its state."""
    head = model.head
    state = {name: value.clone() for name, value in optimizer.state[head.weight].items()}
    backbone = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                for name, p in model.backbone.named_parameters()}
    return dict(start=head.class_start * head.subcenters, weight=head.weight.detach().clone(), state=state,
                backbone=model.backbone.state_dict(), backbone_state=backbone)


def _truth(directory: Path, variant: str, world: int) -> dict:
    """The head's whole rows and per-row state, assembled from the saving ranks' own files."""
    parts = [torch.load(directory / f"{variant}-{rank}.pt") for rank in range(world)]
    per_row = [name for name, value in parts[0]["state"].items() if value.dim() == 2]
    return dict(weight=torch.cat([p["weight"] for p in parts]),
                state={name: torch.cat([p["state"][name] for p in parts]) if name in per_row else parts[0]["state"][name]
                       for name in parts[0]["state"]},
                backbone=parts[0]["backbone"], backbone_state=parts[0]["backbone_state"])


def _leg(rank, world, load_from, saved_world, save_to):
    """Load (if `load_from`) into a model built with other values and check every row against the
    truth, train on, then save for the next leg."""
    checks = []
    for variant, (head_options, make_optimizer) in VARIANTS.items():
        def run(variant=variant, head_options=head_options, make_optimizer=make_optimizer):
            model = Model(seed=7 + world, **head_options)
            optimizer = make_optimizer(model.parameters())
            if load_from:
                model_state, optim_state = get_state_dict(model, optimizer)
                dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(load_from / variant))
                set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
                _check_against(_truth(load_from, variant, saved_world), model, optimizer)
            _train(model, optimizer, rank)
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(save_to / variant))
            torch.save(_rows(model, optimizer), save_to / f"{variant}-{rank}.pt")
            dist.barrier()

        checks.append((variant, run))
    return checks


def _check_against(truth: dict, model, optimizer) -> None:
    head = model.head
    mine = _rows(model, optimizer)
    rows = slice(mine["start"], mine["start"] + len(head.weight))
    assert torch.equal(mine["weight"], truth["weight"][rows])
    assert mine["state"].keys() == truth["state"].keys() and mine["state"]
    for name, value in mine["state"].items():
        expected = truth["state"][name][rows] if value.dim() == 2 else truth["state"][name]
        assert torch.equal(value, expected), f"optimizer state {name!r}"
    for name, value in mine["backbone"].items():
        assert torch.equal(value, truth["backbone"][name]), name
    for name, state in mine["backbone_state"].items():
        for key, value in state.items():
            assert torch.equal(value, truth["backbone_state"][name][key]), f"{name} {key}"


@pytest.mark.parametrize("legs", [(2, 3, 2, 2)], ids=["2-3-2-2"])
def test_the_head_and_its_optimizer_state_move_between_world_sizes(legs, tmp_path):
    """Saved on 2 ranks, loaded on 3, saved, loaded on 2, saved, loaded on 2: 2→3, 3→2 and 2→2."""
    saved_from, saved_world = None, None
    for leg, world in enumerate(legs):
        save_to = tmp_path / f"leg{leg}-on{world}"
        save_to.mkdir()
        run_on_ranks(world, tmp_path / f"ranks{leg}", _leg, saved_from, saved_world, save_to)
        saved_from, saved_world = save_to, world
