"""The shard layout of the class centres, and the collectives the sharded loss runs."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..partials import RowPartials


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, stop) that `rank` holds: ⌈num_classes / world_size⌉ per rank, the last
    rank the rest (`torch.chunk`'s split, and DTensor's Shard(0)). Every rank must hold a class,
    which holds for num_classes > (world_size − 1)²."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    per_rank = -(-num_classes // world_size)
    if num_classes < 1 or per_rank * (world_size - 1) >= num_classes:
        raise ValueError(
            f"num_classes ({num_classes}) over {world_size} ranks in shards of ⌈{num_classes}/{world_size}⌉ = "
            f"{per_rank} leaves the last rank no class; use fewer ranks or more classes "
            f"(num_classes > (world_size − 1)²)"
        )
    start = rank * per_rank
    return start, min(start + per_rank, num_classes)


def group_size_and_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(world size, rank) of the group, or RuntimeError if no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the torch.distributed process group is not initialised: call "
            "torch.distributed.init_process_group first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def slowest_rank(group: Optional[dist.ProcessGroup]):
    """A function max-reducing a CPU tensor over the ranks of `group`, every rank getting the result
    (for `marginfused.backends.timing`: every rank then takes the same backend)."""

    def reduce(seconds: Tensor) -> Tensor:
        on_device = seconds.to(collective_device(group))
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=group)
        return on_device.cpu()

    return reduce


def all_gather(tensor: Tensor, group: Optional[dist.ProcessGroup], sizes: Optional[list[int]] = None) -> Tensor:
    """Concatenation over ranks, in rank order, of tensors whose first dimension is `sizes[rank]`
    (the same on every rank when `sizes` is None): padded to the largest for the collective, the
    padding dropped after."""
    world_size = dist.get_world_size(group)
    rows = tensor.shape[0] if sizes is None else max(sizes)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = torch.empty((world_size * rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather(list(out.chunk(world_size)), padded, group=group)
    if sizes is None or len(set(sizes)) == 1:
        return out
    return torch.cat([piece[:size] for piece, size in zip(out.chunk(world_size), sizes)])


def gather_partials(local: RowPartials, group: Optional[dist.ProcessGroup]) -> RowPartials:
    """Every rank's partials of the gathered batch, stacked in rank order ((R, B) each): what
    `marginfused.partials.merge` turns into the partials over all classes, as for a backend's
    own class ranges."""
    world_size = dist.get_world_size(group)
    floats = all_gather(torch.stack([local.max, local.sumexp, local.logit_sum, local.best_cos]).unsqueeze(0), group)
    classes = all_gather(local.best_class.unsqueeze(0), group)
    return RowPartials(*floats.unbind(1), classes.reshape(world_size, -1))


class GatherRows(torch.autograd.Function):
    """The rows of every rank concatenated in rank order (`sizes[r]` from rank r); backward: each
    rank's rows get the sum of every rank's gradient for them, times `scale`."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Optional[dist.ProcessGroup], sizes: list[int], scale: float) -> Tensor:
        ctx.group, ctx.sizes, ctx.scale = group, sizes, scale
        return all_gather(tensor, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return ctx.scale * total[rows_of(dist.get_rank(ctx.group), ctx.sizes)], None, None, None


class OwnRows(torch.autograd.Function):
    """This rank's rows of a tensor over the gathered batch that is the same on every rank (the
    per-row loss); backward: every rank's gradient for its own rows, gathered, so that each rank
    sees the whole batch's."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Optional[dist.ProcessGroup], sizes: list[int]) -> Tensor:
        ctx.group, ctx.sizes = group, sizes
        return tensor[rows_of(dist.get_rank(group), sizes)].clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_gather(grad.contiguous(), ctx.group, ctx.sizes), None, None


def rows_of(rank: int, sizes: list[int]) -> slice:
    """The rows of the gathered batch that `rank` contributed."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
