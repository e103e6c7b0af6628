"""A sharded head's checkpoints: its weight and its optimizer state as DTensors of the whole centres.

Each rank holds its rows [start, stop) of the (num_classes·K, D) class centres as a plain tensor
(`ShardLayout`). In a state dict they appear as a DTensor of the whole centres, (num_classes, D) or
(num_classes, K, D) with K > 1 sub-centres (so Shard(0) splits whole classes), sharded Shard(0)
over the group with this rank's rows as its local tensor (the same memory). That is torch.chunk's
split, which `shard_range` gives, so torch.distributed.checkpoint reshards it to any world size.

The weight: the head's state_dict post-hook (`weight_as_dtensor`) and load_state_dict pre-hook
(`weight_from_checkpoint`).

Its optimizer state (SGD's momentum, Adam's moments, SparseMomentumSGD's buffers: every state
tensor shaped like the weight) is made to travel the same way, so that PyTorch's standard recipe
(`torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)`, `dcp.save`, then on
any world size `dcp.load` and `set_state_dict`) restores it row for row. An optimizer holding a
sharded head's weight gets, at its first step, a state_dict post-hook presenting those tensors as
DTensors like the weight's, and a load_state_dict pre-hook taking this rank's rows back
(`attach_to_optimizers`, through torch's global optimizer step pre-hook, which sees every
optimizer; `get_state_dict` and `set_state_dict` step a fresh optimizer once to create its state,
so the hooks are there before either reads or writes it). Scalars (Adam's step) are the same on
every rank and travel as they are.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .collectives import group_size_and_rank, shard_range


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's rows of the class centres lie in the whole: classes [start, stop) of
    num_classes, K = subcenters rows each, over the ranks of `group`."""

    num_classes: int
    subcenters: int
    embedding_dim: int
    start: int
    stop: int
    group: Optional[dist.ProcessGroup]

    @property
    def whole_shape(self) -> tuple[int, ...]:
        """The whole centres in a checkpoint: (C, D), or (C, K, D) with K > 1 sub-centres."""
        per_class = () if self.subcenters == 1 else (self.subcenters,)
        return (self.num_classes, *per_class, self.embedding_dim)

    @property
    def local_rows(self) -> int:
        return (self.stop - self.start) * self.subcenters

    def mesh(self, device: torch.device) -> DeviceMesh:
        """The group as a one-dimensional device mesh."""
        return DeviceMesh.from_group(self.group or dist.group.WORLD, device.type)

    def as_dtensor(self, local: Tensor) -> DTensor:
        """This rank's rows (local_rows, D) as the DTensor of the whole centres (the same memory)."""
        shape = self.whole_shape
        return DTensor.from_local(local.detach().view(-1, *shape[1:]), self.mesh(local.device), [Shard(0)],
                                  run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())

    def rows_of(self, value: Tensor, what: str) -> Tensor:
        """This rank's rows (local_rows, D) of `what` in a checkpoint: a DTensor of the whole centres,
        the whole centres as one tensor ((C·K, D) or (C, K, D)), or this rank's rows; ValueError
        naming the shapes otherwise."""
        per_class, dim = self.subcenters, self.embedding_dim
        whole = {self.whole_shape, (self.num_classes * per_class, dim)}
        mine = {(self.local_rows, dim), (self.stop - self.start, per_class, dim)}
        shape = tuple(value.shape)
        if not (shape == self.whole_shape or (shape in whole | mine and not isinstance(value, DTensor))):
            raise ValueError(
                f"the checkpoint's {what} of shape {shape} do not fit this head: num_classes={self.num_classes}, "
                f"subcenters={per_class}, embedding_dim={dim} (classes [{self.start}, {self.stop}) on this rank); "
                f"nothing was loaded"
            )
        if isinstance(value, DTensor):
            same_layout = value.placements == (Shard(0),) and value.device_mesh == self.mesh(value.device)
            value = value.to_local() if same_layout else value.full_tensor()[self.start:self.stop]
        elif shape in whole:
            value = value.reshape(self.num_classes, per_class, dim)[self.start:self.stop]
        return value.reshape(-1, dim)


def weight_as_dtensor(head: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A sharded head's state_dict post-hook: its weight as the DTensor of the whole centres."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = head.layout.as_dtensor(state_dict[key])


def weight_from_checkpoint(state_dict: dict, prefix: str, layout: ShardLayout) -> None:
    """This rank's rows of the centres in a state dict being loaded, in place; ValueError (before
    anything is loaded) for centres that do not fit."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = layout.rows_of(state_dict[key], "class centres")


def gather_centres(head: nn.Module, dst: int = 0) -> Optional[Tensor]:
    """The whole (num_classes·subcenters, embedding_dim) class centres of a sharded head, assembled
    on rank `dst` of its group (for evaluation); None on the other ranks. Every rank must call it."""
    layout: ShardLayout = head.layout
    group = layout.group
    world_size, rank = group_size_and_rank(group)
    start, stop = shard_range(layout.num_classes, 0, world_size)  # the largest shard: every rank's but the last
    per_rank = (stop - start) * layout.subcenters
    local = head.weight.detach()
    padded = torch.cat([local, local.new_zeros(per_rank - len(local), local.shape[1])])
    pieces = [torch.empty_like(padded) for _ in range(world_size)] if rank == dst else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    return torch.cat(pieces)[: layout.num_classes * layout.subcenters] if rank == dst else None


_weights: dict[int, tuple[weakref.ref, ShardLayout]] = {}
"""Every live sharded head's weight, by id: the parameter (weakly) and its layout."""
_attached: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
"""The optimizers already given the hooks (or found to hold no sharded head's weight)."""
_hook_lock = threading.Lock()
_step_hook = None


def track_weight(weight: nn.Parameter, layout: ShardLayout) -> None:
    """Let optimizers stepping `weight` carry its state through checkpoints by `layout` (module
    docstring); installs the global step pre-hook on first use."""
    global _step_hook
    with _hook_lock:
        _weights[id(weight)] = (weakref.ref(weight), layout)
        weakref.finalize(weight, _weights.pop, id(weight), None)
        if _step_hook is None:
            _step_hook = register_optimizer_step_pre_hook(attach_to_optimizers)


def _tracked(param: Tensor) -> Optional[ShardLayout]:
    """The layout of a sharded head's weight, or None for any other parameter."""
    entry = _weights.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def attach(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that holds a sharded head's weight the state-dict hooks now, once (as its
    first step would; optimizers holding none are remembered and skipped). For code that fills an
    optimizer's state before its first step (an imported checkpoint)."""
    if optimizer in _attached:
        return
    _attached.add(optimizer)
    if any(_tracked(p) is not None for group in optimizer.param_groups for p in group["params"]):
        optimizer.register_state_dict_post_hook(optimizer_state_as_dtensors)
        optimizer.register_load_state_dict_pre_hook(optimizer_state_rows)


def attach_to_optimizers(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step pre-hook: `attach` every optimizer that steps."""
    attach(optimizer)


def _per_row(value: object, weight: Tensor) -> bool:
    return isinstance(value, Tensor) and tuple(value.shape) == tuple(weight.shape)


def optimizer_state_as_dtensors(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer state_dict post-hook: each sharded head weight's per-row state tensors as DTensors
    of the whole centres (the optimizer's own state untouched: new dicts, the same memory)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state_dict["state"])
    for index, param in enumerate(params):
        layout = _tracked(param)
        if layout is not None and index in state:
            state[index] = {name: layout.as_dtensor(value) if _per_row(value, param) else value
                            for name, value in state[index].items()}
    return {**state_dict, "state": state}


def optimizer_state_rows(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Optimizer load_state_dict pre-hook: this rank's rows of each sharded head weight's per-row
    state (a DTensor of the whole centres, as saved, or the whole as one tensor); ValueError for
    state that does not fit."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [index for group in state_dict["param_groups"] for index in group["params"]]
    state = dict(state_dict["state"])
    for index, param in zip(saved, params):
        layout = _tracked(param)
        if layout is not None and index in state:
            state[index] = {name: _state_rows(layout, value, name) for name, value in state[index].items()}
    return {**state_dict, "state": state}


def _state_rows(layout: ShardLayout, value: object, name: str) -> object:
    """This rank's rows of a saved per-row state tensor; other state as it is."""
    if isinstance(value, Tensor) and value.dim() >= 2:
        return layout.rows_of(value, f"optimizer state {name!r}")
    return value
