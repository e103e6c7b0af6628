"""Ranks that build or call the sharded loss differently never train wrong in silence, hang or
abort: every rank raises, within the collectives' timeout (tests/ranks.py), an error naming the
setting and each rank's value, or the rank whose own checks failed. And what a head built alike
gives on every rank: its margin's state in its dtype, its accuracy over the whole batch."""

import functools

import pytest
import torch

import marginfused as mf
from marginfused.distributed import ShardedMarginSoftmaxLoss, shard_range, sharded_margin_cross_entropy

from ranks import run_on_ranks

DIM = 12


def _head(**options):
    arguments = dict(embedding_dim=DIM, num_classes=1000)
    arguments.update(options)
    return ShardedMarginSoftmaxLoss(arguments.pop("embedding_dim"), arguments.pop("num_classes"), **arguments)


MISMATCHES = {
    "num_classes": (dict(num_classes=1000), dict(num_classes=1001), "num_classes: rank 0: 1000, rank 1: 1001"),
    "reduction": (dict(reduction="mean"), dict(reduction="sum"), "reduction: rank 0: mean, rank 1: sum"),
    "margin": (dict(margin="arcface"), dict(margin="curricularface"),
               "margin: rank 0: ArcFace(m=0.5, fallback=None), rank 1: CurricularFace(m=0.5, momentum=0.01)"),
    "sample_rate": (dict(sample_rate=1.0), dict(sample_rate=0.5), "sample_rate: rank 0: 1.0, rank 1: 0.5"),
    "embedding_dim": (dict(embedding_dim=DIM), dict(embedding_dim=DIM + 1),
                      f"embedding_dim: rank 0: {DIM}, rank 1: {DIM + 1}"),
    "dtype": (dict(dtype=torch.float32), dict(dtype=torch.float64),
              "dtype: rank 0: torch.float32, rank 1: torch.float64"),
    "scale": (dict(scale=64.0), dict(scale=30.0), "scale: rank 0: 64.0, rank 1: 30.0"),
    "filtering": (dict(interclass_filtering=None), dict(interclass_filtering=0.4),
                  "interclass_filtering: rank 0: None, rank 1: 0.4"),
}
"""Per setting: rank 0's arguments, every other rank's, and the line of the error naming them."""


def _check_head_mismatch(rank, options_0, options_other, named):
    """Every rank raises at construction, naming the setting with every rank's value."""
    with pytest.raises(ValueError, match="disagree on what it computes") as raised:
        _head(**(options_0 if rank == 0 else options_other))
    assert named in str(raised.value), str(raised.value)


def _check_one_rank_refuses(rank, world):
    """An argument only one rank gets wrong: that rank raises its own error, every other rank one
    naming it; none waits for the others."""
    with pytest.raises(ValueError) as raised:
        _head(sample_rate=2.0 if rank == world - 1 else 1.0)
    expected = "sample_rate must be in (0, 1]" if rank == world - 1 else f"invalid inputs on rank(s) [{world - 1}]"
    assert expected in str(raised.value), str(raised.value)


def _check_call_mismatch(rank, world):
    """The loss function compares the settings of each call in the collective it makes anyway."""
    start, stop = shard_range(40, rank, world)
    x, w, y = torch.randn(3, DIM), torch.randn(stop - start, DIM), torch.randint(0, 40, (3,))
    with pytest.raises(ValueError, match="label_smoothing: rank 0: 0.0, rank 1: 0.1"):
        sharded_margin_cross_entropy(x, w, y, class_start=start, num_classes=40,
                                     label_smoothing=0.0 if rank == 0 else 0.1)
    loss = sharded_margin_cross_entropy(x, w, y, class_start=start, num_classes=40)  # then agreeing calls run
    assert bool(torch.isfinite(loss))


def _check_load_mismatch(rank, world):
    """load_state_dict: a checkpoint that does not fit one rank, or a margin state that differs
    between ranks, raises on every rank and loads nothing anywhere."""
    head = _head(margin=mf.AdaFace(), num_classes=50)
    before = head.weight.detach().clone()
    state = {"weight": torch.zeros(50 + (rank == 0), DIM), "margin.batch_mean": torch.tensor(20.0),
             "margin.batch_std": torch.tensor(100.0)}
    expected = "do not fit this head" if rank == 0 else "invalid inputs on rank(s) [0]"
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        head.load_state_dict(state)
    state = {"weight": torch.zeros(50, DIM), "margin.batch_mean": torch.tensor(20.0 + rank),
             "margin.batch_std": torch.tensor(100.0)}
    with pytest.raises(ValueError, match="margin state: rank 0: .*batch_mean=20.0.*rank 1: .*batch_mean=21.0"):
        head.load_state_dict(state)
    assert torch.equal(head.weight.detach(), before) and float(head.margin.batch_mean) == 20.0
    head.load_state_dict({"weight": torch.zeros(50, DIM), "margin.batch_mean": torch.tensor(30.0),
                          "margin.batch_std": torch.tensor(100.0)})
    assert not bool(head.weight.detach().any()) and float(head.margin.batch_mean) == 30.0


def _check_state_follows_dtype():
    """A float64 sharded head keeps its adaptive margin's statistics in float64 (every rank alike)."""
    head = _head(margin="adaface", dtype=torch.float64)
    assert {buffer.dtype for buffer in head.margin.buffers()} == {torch.float64}


def _check_accuracy(rank, world):
    """The sharded head's return_accuracy: the accuracy of the whole batch, the same on every rank,
    that of one process over the concatenated batch and the whole centres."""
    g = torch.Generator().manual_seed(40)
    x = torch.randn(4 * world, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (4 * world,), generator=g)
    head = _head(num_classes=50, dtype=torch.float64, backend="torch")
    whole = torch.randn(50, DIM, generator=g, dtype=torch.float64)
    x[::2] = whole[y[::2]]  # half the rows on their centre: an accuracy of at least 0.5
    head.load_state_dict({"weight": whole})
    loss, accuracy = head(x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4], return_accuracy=True)
    _, expected = mf.margin_cross_entropy(x, whole, y, backend="torch", return_accuracy=True)
    assert 0.5 <= float(expected) < 1.0 and float(accuracy) == float(expected)


def _checks(rank, world):
    checks = [(f"head {name}", functools.partial(_check_head_mismatch, rank, *case)) for name, case in MISMATCHES.items()]
    checks += [("one rank refuses", functools.partial(_check_one_rank_refuses, rank, world)),
               ("call mismatch", functools.partial(_check_call_mismatch, rank, world)),
               ("load mismatch", functools.partial(_check_load_mismatch, rank, world)),
               ("state follows dtype", _check_state_follows_dtype),
               ("accuracy", functools.partial(_check_accuracy, rank, world))]
    return checks


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_raises_naming_what_differs(world, tmp_path):
    run_on_ranks(world, tmp_path, _checks)
