"""Partial FC's class sampling across ranks: the labels renumbered over every rank's sampled classes
(`marginfused.sampling` draws them)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..sampling import renumbered
from .collectives import all_gather


def sampled_labels(
    labels: Tensor, index: Tensor, class_start: int, ignore_index: int, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, int, int]:
    """Labels renumbered over the sampled classes of all ranks (rank order, then index order),
    this rank's first sampled id, and the number of sampled classes in all."""
    counts = all_gather(torch.tensor([index.numel()], device=labels.device), group).tolist()
    rank = dist.get_rank(group)
    offset = sum(counts[:rank])
    position, mine = renumbered(labels, index, class_start, ignore_index)
    global_ids = torch.where(mine, offset + position, torch.full_like(labels, -1))
    dist.all_reduce(global_ids, op=dist.ReduceOp.MAX, group=group)
    return torch.where(labels == ignore_index, labels, global_ids), offset, sum(counts)
