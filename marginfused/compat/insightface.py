"""arcface_torch (InsightFace) Partial FC checkpoints, loaded into marginfused heads.

What arcface_torch saves. With `save_all_states`, every rank r of its R training processes
writes `checkpoint_gpu_{r}.pt` at the end of each epoch: a dict of "epoch", "global_step",
"state_dict_backbone", "state_dict_softmax_fc", "state_optimizer" and "state_lr_scheduler". A
head needs two of them:

- "state_dict_softmax_fc" is its Partial FC module's state_dict, {"weight": (n_r, D)}: rank r's
  rows of the (C, D) class centres, one centre per class;
- "state_optimizer" is the optimizer's state_dict. Its param groups are the backbone's parameters,
  then the Partial FC module's, that weight alone, as the last group; SGD (momentum 0.9) keeps a
  "momentum_buffer" for it, AdamW "step", "exp_avg" and "exp_avg_sq", each per-row tensor of the
  weight's shape.

The split. arcface_torch's rank r holds the classes [start_r, start_r + n_r) with

    n_r = ⌊C/R⌋ + [r < C mod R]          start_r = r·⌊C/R⌋ + min(r, C mod R)

(`partial_fc_range`: the first C mod R ranks hold one class more). A `ShardedMarginSoftmaxLoss`
on R′ ranks holds `shard_range`'s split instead, ⌈C/R′⌉ classes per rank, the last the rest; a
`MarginSoftmaxLoss` holds all C. The head's classes [a, b) are copied from the files whose classes
overlap them, each file's rows [max(a, start_r), min(b, start_r + n_r)) to the same classes of the
head, so any R′ (or one process) reads any R. Only those files are opened, memory-mapped
(`torch.load(mmap=True)`), so only the rows copied are read from disk and a checkpoint of
millions of classes need not fit in memory.

Agreement. On a sharded head each rank reads its own files, so a problem (a file whose rows do not
fit, a file one node cannot see) may show on some ranks only; the ranks exchange what they found
(`torch.distributed.all_gather_object` over the head's group: with NCCL, each rank's CUDA device
set, as for training) and all raise together, or all load. Every rank of the head's group must
call `load_partial_fc`. The checks of the head and the optimizer come first, on each rank alone:
their outcome is the program's, the same on every rank.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import ShardedMarginSoftmaxLoss
from ..distributed.checkpoint import attach
from ..modules import MarginSoftmaxLoss
from ..optim import SparseMomentumSGD

CHECKPOINT_NAME = re.compile(r"checkpoint_gpu_(0|[1-9][0-9]*)\.pt")
MOMENTUM_STATE = frozenset({"momentum_buffer"})
ADAM_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})

Files = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]
Head = Union[MarginSoftmaxLoss, ShardedMarginSoftmaxLoss]

__all__ = ["checkpoint_paths", "load_partial_fc", "partial_fc_range"]


class StateKind(NamedTuple):
    """The state entries an optimizer keeps for the head's weight, and the optimizer's name (for
    messages)."""

    entries: frozenset[str]
    optimizer: str


class _Piece(NamedTuple):
    """Rows `source` of one file's Partial FC weight (and of its per-row optimizer state) are the
    rows `target` of the head's weight."""

    weight: Tensor
    state: dict[str, Any]
    source: slice
    target: slice


@dataclass
class _Reading:
    """What this process read: the pieces of the head's rows, and the optimizer's scalar state
    (Adam's step) in each file read, by file name."""

    pieces: list[_Piece]
    scalars: dict[str, dict[str, float]]


def partial_fc_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, stop) arcface_torch's rank `rank` of `world_size` holds: ⌊C/R⌋ each,
    one more on each of the first C mod R ranks."""
    per_rank, extra = divmod(num_classes, world_size)
    start = rank * per_rank + min(rank, extra)
    return start, start + per_rank + int(rank < extra)


def checkpoint_paths(files: Files) -> list[Path]:
    """The checkpoint of every rank, in rank order. `files` is a directory (its
    checkpoint_gpu_*.pt files) or the files themselves, in any order, each named
    checkpoint_gpu_{rank}.pt. ValueError for a name of another form, a path that is not a file, two
    files of one rank, or a rank missing below the highest."""
    if isinstance(files, (str, os.PathLike)) and Path(files).is_dir():
        paths = sorted(Path(files).glob("checkpoint_gpu_*.pt"))
    elif isinstance(files, (str, os.PathLike)):
        paths = [Path(files)]
    else:
        paths = [Path(file) for file in files]
    by_rank: dict[int, Path] = {}
    for path in paths:
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path} is not named checkpoint_gpu_{{rank}}.pt, as arcface_torch names its checkpoints")
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        rank = int(match.group(1))
        if rank in by_rank:
            raise ValueError(f"two checkpoints of rank {rank}: {by_rank[rank]} and {path}")
        by_rank[rank] = path
    if not by_rank:
        raise ValueError(f"no checkpoint_gpu_{{rank}}.pt file in {files}")
    missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
    if missing:
        raise ValueError(f"the checkpoints of rank(s) {missing} are missing (files of ranks {sorted(by_rank)} given): "
                         f"arcface_torch saves one per rank, and each holds its own classes")
    return [by_rank[rank] for rank in range(len(by_rank))]


def _check_head(head: Head) -> None:
    """A marginfused head of one centre per class, as Partial FC's."""
    if not isinstance(head, (MarginSoftmaxLoss, ShardedMarginSoftmaxLoss)):
        raise TypeError(f"head must be a MarginSoftmaxLoss or a ShardedMarginSoftmaxLoss, got {type(head).__name__}")
    if head.subcenters != 1:
        raise ValueError(f"head.subcenters={head.subcenters}: arcface_torch's Partial FC has one centre per class; "
                         f"load its checkpoints into a head with subcenters=1")


def _head_classes(head: Head) -> tuple[int, int]:
    """The classes [start, stop) whose centres `head` holds: all of them for a `MarginSoftmaxLoss`,
    this rank's shard for a `ShardedMarginSoftmaxLoss`."""
    if isinstance(head, ShardedMarginSoftmaxLoss):
        return head.layout.start, head.layout.stop
    return 0, head.num_classes


def _param_group(optimizer: torch.optim.Optimizer, weight: Tensor) -> dict[str, Any]:
    """The param group of `optimizer` that holds `weight`."""
    for group in optimizer.param_groups:
        if any(param is weight for param in group["params"]):
            return group
    raise ValueError("the optimizer does not hold head.weight: build it over the head's parameters "
                     "(e.g. [{'params': backbone.parameters()}, {'params': head.parameters()}]) before loading")


def _state_kind(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> StateKind:
    """The state entries `optimizer` keeps for a parameter of `group`: a momentum buffer for SGD
    with momentum (torch's, or `SparseMomentumSGD`), none without; step and first and second
    moments for Adam and AdamW (and the largest second moment with amsgrad)."""
    name = type(optimizer).__name__
    if isinstance(optimizer, (torch.optim.SGD, SparseMomentumSGD)):
        return StateKind(MOMENTUM_STATE if group["momentum"] else frozenset(), name)
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        return StateKind(ADAM_STATE | ({"max_exp_avg_sq"} if group["amsgrad"] else frozenset()), name)
    raise TypeError(f"optimizer: {name}'s state is not known here; the state of arcface_torch's "
                    f"SGD and AdamW loads into torch.optim.SGD, marginfused.optim.SparseMomentumSGD, "
                    f"torch.optim.Adam and torch.optim.AdamW")


def _open(path: Path) -> dict[str, Any]:
    """A checkpoint's dict, its tensors on the CPU, memory-mapped when the file is in torch.save's
    zip format (then reading a slice of a tensor reads those bytes of the file alone)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path.name} cannot be read as a torch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path.name} holds a {type(checkpoint).__name__}, not arcface_torch's checkpoint dict")
    return checkpoint


def _partial_fc_weight(checkpoint: dict[str, Any], name: str, rows: int, head: Head, world_size: int,
                       rank: int) -> Tensor:
    """The file's Partial FC weight, checked to be the (rows, embedding_dim) centres that
    arcface_torch's split of head.num_classes gives this rank."""
    module = checkpoint.get("state_dict_softmax_fc")
    weight = module.get("weight") if isinstance(module, dict) else None
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} is not an arcface_torch checkpoint: it has no 2-D "
                         f"'state_dict_softmax_fc'['weight'] (the Partial FC class centres)")
    if weight.shape[1] != head.embedding_dim:
        raise ValueError(f"{name} holds centres of embedding size {weight.shape[1]}; "
                         f"head.embedding_dim={head.embedding_dim}")
    if weight.shape[0] != rows:
        raise ValueError(f"{name} holds {weight.shape[0]} classes where arcface_torch's split of "
                         f"num_classes={head.num_classes} over {world_size} ranks gives rank {rank} {rows}: the "
                         f"checkpoint has another class count than head.num_classes={head.num_classes}, or is of "
                         f"more ranks than the {world_size} files given")
    return weight


def _partial_fc_state(checkpoint: dict[str, Any], name: str, weight_shape: torch.Size,
                      kind: StateKind) -> dict[str, Any]:
    """The optimizer's state for the Partial FC weight: the state of the one parameter of the last
    param group, each entry a tensor of the weight's shape (per row) or a scalar, its entries
    those the head's optimizer keeps. Entries that are None (no state) are left out."""
    saved = checkpoint.get("state_optimizer")
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not groups or not isinstance(saved.get("state"), dict):
        raise ValueError(f"{name} has no optimizer state_dict under 'state_optimizer'")
    params = groups[-1].get("params", [])
    if len(params) != 1:
        raise ValueError(f"{name}: the optimizer's last param group holds {len(params)} parameters; arcface_torch's "
                         f"holds the Partial FC weight alone")
    state = {key: value for key, value in saved["state"].get(params[0], {}).items() if value is not None}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape != weight_shape:
            raise ValueError(f"{name}: the optimizer's last param group's parameter has {key} of shape "
                             f"{tuple(value.shape)}, not the Partial FC weight's {tuple(weight_shape)}")
    if set(state) != kind.entries:
        raise ValueError(f"{name}: the optimizer's state for the Partial FC weight is {sorted(state) or 'empty'}; "
                         f"this {kind.optimizer} keeps {sorted(kind.entries) or 'none'} for head.weight")
    return state


def _scalars(state: dict[str, Any]) -> dict[str, float]:
    """The optimizer state's scalar entries (Adam's step), as numbers."""
    return {key: float(value) for key, value in state.items() if not (isinstance(value, Tensor) and value.dim() > 0)}


def _read(head: Head, files: Files, kind: Optional[StateKind]) -> _Reading:
    """Open the files holding the head's classes, check them, and say which of their rows go
    where; nothing is copied yet. A file that arcface_torch's split of head.num_classes leaves
    without a class (more ranks than classes) is opened too, to check that it holds none: every
    file is then checked by some rank."""
    paths = checkpoint_paths(files)
    world_size = len(paths)
    start, stop = _head_classes(head)
    pieces, scalars = [], {}
    for rank, path in enumerate(paths):
        first, last = partial_fc_range(head.num_classes, rank, world_size)
        low, high = max(first, start), min(last, stop)
        if low >= high and first != last:
            continue
        checkpoint = _open(path)
        weight = _partial_fc_weight(checkpoint, path.name, last - first, head, world_size, rank)
        state = {} if kind is None else _partial_fc_state(checkpoint, path.name, weight.shape, kind)
        scalars[path.name] = _scalars(state)
        if low < high:
            pieces.append(_Piece(weight, state, slice(low - first, high - first), slice(low - start, high - start)))
    return _Reading(pieces, scalars)


def _read_on_every_rank(head: ShardedMarginSoftmaxLoss, files: Files, kind: Optional[StateKind]) -> _Reading:
    """`_read` on each rank of the head's group, the ranks agreeing on the outcome: if any rank
    fails, every rank raises a ValueError naming each failure and the ranks that met it; else
    every rank gets the scalar state of all the files any rank read. Any exception counts (a
    malformed file may raise more than ValueError): a rank that raised alone would leave the
    others waiting in the exchange."""
    try:
        reading, problem = _read(head, files, kind), None
    except Exception as error:  # noqa: BLE001 -- every failure is exchanged, then raised on every rank
        reading, problem = None, error
    reports: list[Any] = [None] * dist.get_world_size(head.group)
    dist.all_gather_object(reports, (None if problem is None else str(problem),
                                     {} if reading is None else reading.scalars), group=head.group)
    found: dict[str, list[int]] = {}
    for rank, (message, _) in enumerate(reports):
        if message is not None:
            found.setdefault(message, []).append(rank)
    if found:
        summary = "; ".join(f"rank(s) {ranks}: {message}" for message, ranks in found.items())
        raise ValueError(f"{summary} (nothing was loaded on any rank)") from problem
    for _, scalars in reports:
        reading.scalars.update(scalars)
    return reading


def _check_scalars_agree(scalars: dict[str, dict[str, float]]) -> None:
    """Every file's scalar optimizer state (Adam's step) must be the same: the ranks stepped together."""
    for key in sorted({key for values in scalars.values() for key in values}):
        seen = {name: values.get(key) for name, values in scalars.items()}
        if len(set(seen.values())) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in sorted(seen.items()))
            raise ValueError(f"the checkpoints disagree on the optimizer's {key} ({listed}): they are not of one run "
                             f"and one step")


def _optimizer_state(weight: Tensor, pieces: list[_Piece], group: dict[str, Any]) -> dict[str, Any]:
    """head.weight's optimizer state from the pieces: each per-row entry assembled row for row in
    the weight's dtype and device; each scalar taken from the first piece as it is (on the weight's
    device in float32 for a capturable or fused optimizer, which keeps its step there)."""
    state: dict[str, Any] = {}
    for key, value in pieces[0].state.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            state[key] = torch.empty_like(weight)
            for piece in pieces:
                state[key][piece.target].copy_(piece.state[key][piece.source])
        elif isinstance(value, Tensor) and (group.get("capturable") or group.get("fused")):
            state[key] = value.to(device=weight.device, dtype=torch.float32, copy=True)
        else:
            state[key] = value.clone() if isinstance(value, Tensor) else value
    return state


def load_partial_fc(head: Head, files: Files, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load arcface_torch's Partial FC class centres, and with `optimizer` their optimizer state,
    into `head`, from the checkpoints of a run on any number of ranks.

    `head`: a `MarginSoftmaxLoss` (it takes every class) or a `ShardedMarginSoftmaxLoss` on any
    number of ranks (each rank takes its shard; every rank of its group must call this), with
    subcenters=1, num_classes and embedding_dim those of the run. `files`: the run's
    checkpoint_gpu_{rank}.pt files, one per rank, in any order, or the directory holding them.
    `optimizer`: one that holds head.weight, of the kind the run trained with: torch.optim.SGD or
    marginfused.optim.SparseMomentumSGD with momentum for a run with SGD (the momentum buffer),
    torch.optim.AdamW or Adam for one with AdamW (step, exp_avg, exp_avg_sq).

    What it reads (module docstring): each file's 'state_dict_softmax_fc'['weight'], rank r's
    rows [start_r, start_r + n_r) of the centres, n_r = ⌊C/R⌋ + [r < C mod R],
    start_r = r·⌊C/R⌋ + min(r, C mod R); and the state of the last param group's one parameter in
    'state_optimizer'. Only the files holding the head's classes are opened, memory-mapped, and of
    them only the head's rows are read. The rows are copied in place into head.weight (the same
    Parameter, which optimizers hold), converted to its dtype and device, and the optimizer's
    state for head.weight is replaced by the checkpoint's, row for row like the weight (Adam's
    step as it is, the same in every file). For a sharded head the optimizer gets at once the
    state-dict hooks it would get at its first step (marginfused/distributed/checkpoint.py), so a
    checkpoint taken right after loading holds the whole centres' state. The backbone, the
    backbone's optimizer state, the learning-rate schedule and the epoch are the caller's to
    restore from the same files.

    Refused before anything changes (the head and the optimizer as they were; on a sharded head,
    on every rank), with a ValueError naming what does not fit (a TypeError where said):

    - the head: not a MarginSoftmaxLoss or ShardedMarginSoftmaxLoss (TypeError); subcenters > 1;
    - the optimizer: it does not hold head.weight; its kind of state is not known here (TypeError);
    - the files: a name other than checkpoint_gpu_{rank}.pt, a path that is not a file, two files
      of one rank, a rank missing below the highest, a file torch cannot load or that is not
      arcface_torch's dict;
    - the centres: an embedding size other than head.embedding_dim; a file's row count other than
      arcface_torch's split of head.num_classes over the files' ranks gives (a run of another class
      count, or of more ranks than the files given);
    - the optimizer's state in the files: a last param group of more or fewer than one parameter,
      or of one whose state is not of the weight's shape; entries other than those the optimizer
      keeps (momentum_buffer for SGD with momentum and SparseMomentumSGD; step, exp_avg and
      exp_avg_sq for Adam and AdamW; an SGD-trained run into AdamW, or the reverse); a step that
      differs between files.

    Example, continuing on 8 GPUs a run saved on 4 (every rank runs this)::

        import torch
        import marginfused as mf
        from marginfused.compat.insightface import load_partial_fc
        from marginfused.distributed import ShardedMarginSoftmaxLoss

        head = ShardedMarginSoftmaxLoss(512, 93_431, margin=mf.ArcFace(0.5), device="cuda")
        optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                                    lr=0.1, momentum=0.9, weight_decay=5e-4)
        load_partial_fc(head, "work_dirs/ms1mv3_r50", optimizer)   # checkpoint_gpu_0.pt … _3.pt
        run = torch.load("work_dirs/ms1mv3_r50/checkpoint_gpu_0.pt", map_location="cpu", mmap=True)
        backbone.load_state_dict(run["state_dict_backbone"])
    """
    _check_head(head)
    kind, group = None, {}
    if optimizer is not None:
        group = _param_group(optimizer, head.weight)
        kind = _state_kind(optimizer, group)
    if isinstance(head, ShardedMarginSoftmaxLoss):
        reading = _read_on_every_rank(head, files, kind)
    else:
        reading = _read(head, files, kind)
    _check_scalars_agree(reading.scalars)
    with torch.no_grad():
        state = None if optimizer is None else _optimizer_state(head.weight, reading.pieces, group)
        for piece in reading.pieces:
            head.weight[piece.target].copy_(piece.weight[piece.source])
    if optimizer is not None:
        optimizer.state[head.weight] = state
    if optimizer is not None and isinstance(head, ShardedMarginSoftmaxLoss):
        # its state_dict shows the loaded rows as the whole centres from now on, not from its first step
        attach(optimizer)
