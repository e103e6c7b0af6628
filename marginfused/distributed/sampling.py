"""Partial FC's class sampling: the classes each step keeps, and the labels renumbered over them.

Each step, each rank keeps every class of its shard that is a label in the global batch, plus
random other classes of its shard, ⌈sample_rate × shard size⌉ classes in all (or the positives
alone, if there are more; InsightFace's Partial FC keeps ⌊sample_rate × shard size⌋). The loss and
its gradients are then exactly those of the loss over the sampled classes alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import all_gather


def sample_classes(
    labels: Tensor,
    class_start: int,
    shard_size: int,
    sample_rate: float,
    ignore_index: int = -100,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Sorted indices, within this shard, of the classes Partial FC keeps this step: every class of
    the shard that is one of `labels` (global ids), then random others, ⌈sample_rate × shard_size⌉
    in all (or the positives alone if there are more)."""
    local = labels[labels != ignore_index] - class_start
    positives = torch.unique(local[(local >= 0) & (local < shard_size)])
    keep = max(math.ceil(sample_rate * shard_size), positives.numel())
    if keep >= shard_size:
        return torch.arange(shard_size, device=labels.device)
    scores = torch.rand(shard_size, generator=generator, device=labels.device)
    scores[positives] = 2.0  # above every random score: positives are always kept
    return scores.topk(keep).indices.sort().values


def sampled_labels(
    labels: Tensor, index: Tensor, class_start: int, ignore_index: int, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, int, int]:
    """Labels renumbered over the sampled classes of all ranks (rank order, then index order),
    this rank's first sampled id, and the number of sampled classes in all."""
    counts = all_gather(torch.tensor([index.numel()], device=labels.device), group).tolist()
    rank = dist.get_rank(group)
    offset = sum(counts[:rank])
    local = labels - class_start
    position = torch.searchsorted(index, local.clamp(min=0))
    mine = (labels != ignore_index) & (local >= 0) & (position < index.numel())
    mine &= index[position.clamp(max=index.numel() - 1)] == local
    renumbered = torch.where(mine, offset + position, torch.full_like(labels, -1))
    dist.all_reduce(renumbered, op=dist.ReduceOp.MAX, group=group)
    renumbered = torch.where(labels == ignore_index, labels, renumbered)
    return renumbered, offset, sum(counts)
