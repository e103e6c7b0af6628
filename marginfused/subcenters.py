"""Sub-centre ArcFace's cleaning step: each class's dominant sub-centre and the samples far from it.

Trained with K sub-centres per class (`subcenters=K`), a class's clean samples gather around one
sub-centre and its noisy ones (mislabelled faces) around the others. Deng et al. (2020) then keep
each class's dominant sub-centre — the one most of its samples are nearest to — and drop the
samples more than 75° from it, before training on with one centre per class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_inputs
from .normalize import normalize_rows
from .settings import check_subcenters
from .values import is_real


class SubcenterCleaning(NamedTuple):
    """dominant: (C,) int64, each class's dominant sub-centre k (its row is class·K + k), −1 for a
    class none of the samples belongs to. outliers: (B,) bool, the samples more than the threshold
    angle from their class's dominant sub-centre."""

    dominant: Tensor
    outliers: Tensor


@torch.no_grad()
def subcenter_outliers(embeddings: Tensor, weight: Tensor, labels: Tensor, subcenters: int,
                       threshold_degrees: float = 75.0, ignore_index: int = -100) -> SubcenterCleaning:
    """Each class's dominant sub-centre (the one most of its samples have the largest cosine with;
    the first on ties) and the samples whose angle to their class's dominant sub-centre exceeds
    `threshold_degrees`. `weight` holds K = `subcenters` rows per class, class j's at rows
    jK … jK + K − 1, as the loss takes them. Rows labelled `ignore_index` count for nothing and are
    never outliers. O(B·K·D) work and O(C·K) memory: pass the whole dataset in batches and combine
    the counts, or pass it at once where it fits."""
    check_subcenters(subcenters)
    check_inputs(embeddings, weight, labels, ignore_index, subcenters=subcenters)
    if not is_real(threshold_degrees) or not (
            0 <= threshold_degrees <= 180):
        raise ValueError(f"threshold_degrees must be an angle in [0, 180], got {threshold_degrees}")
    classes = weight.shape[0] // subcenters
    valid = labels != ignore_index
    label = torch.where(valid, labels, torch.zeros_like(labels)).long()
    x_hat = normalize_rows(embeddings.float())
    centres = normalize_rows(weight.float()).unflatten(0, (classes, subcenters))[label]
    cos = (centres @ x_hat.unsqueeze(2)).squeeze(2)  # (B, K): each sample against its class's sub-centres
    nearest = cos.argmax(dim=1)
    counts = torch.zeros(classes * subcenters, dtype=torch.int64, device=weight.device)
    counts.index_add_(0, (label * subcenters + nearest)[valid], torch.ones_like(nearest[valid]))
    counts = counts.view(classes, subcenters)
    dominant = torch.where(counts.sum(dim=1) > 0, counts.argmax(dim=1), torch.full_like(counts[:, 0], -1))
    to_dominant = cos.gather(1, dominant[label].clamp(min=0).unsqueeze(1)).squeeze(1)
    outliers = valid & (to_dominant < math.cos(math.radians(threshold_degrees)))
    return SubcenterCleaning(dominant, outliers)
