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


def all_reduce_partials(local: RowPartials, group: Optional[dist.ProcessGroup]) -> RowPartials:
    """The partials of all shards together: max, then rescaled sums, then the best class."""
    top = local.max.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([local.sumexp * torch.exp(local.max - top), local.logit_sum])
    dist.all_reduce(sums, group=group)
    best_cos = local.best_cos.clone()
    dist.all_reduce(best_cos, op=dist.ReduceOp.MAX, group=group)
    best_class = torch.where(local.best_cos == best_cos, local.best_class, torch.iinfo(torch.int64).max)
    dist.all_reduce(best_class, op=dist.ReduceOp.MIN, group=group)
    return RowPartials(top, sums[0], sums[1], best_cos, best_class)


def rows_of(rank: int, sizes: list[int]) -> slice:
    """The rows of the gathered batch that `rank` contributed."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
