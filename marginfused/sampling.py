"""Partial FC's class sampling: the classes a step keeps.

Each step keeps every class of the centres at hand (the whole head, or a rank's shard) that is a
label in the batch, plus random other classes, ⌈sample_rate × classes⌉ in all (or the positives
alone, if there are more; InsightFace's Partial FC keeps ⌊sample_rate × classes⌋ per rank). The
loss and its gradients are then exactly those of the loss over the sampled classes alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


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


def sampled_rows(index: Tensor, subcenters: int) -> Tensor:
    """The rows of W holding the sampled classes `index` (K sub-centres each, in class order)."""
    return (index.unsqueeze(1) * subcenters + torch.arange(subcenters, device=index.device)).flatten()


def renumbered(labels: Tensor, index: Tensor, class_start: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(each label's position among the sampled classes `index` of the range from `class_start`,
    whether the label is one of them); ignored labels stay as they are."""
    local = labels - class_start
    position = torch.searchsorted(index, local.clamp(min=0))
    mine = (labels != ignore_index) & (local >= 0) & (position < index.numel())
    mine &= index[position.clamp(max=index.numel() - 1)] == local
    return torch.where(labels == ignore_index, labels, position), mine
