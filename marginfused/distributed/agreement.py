"""Agreement between ranks, in one small collective: whose checks failed, and whether every rank
computes the same loss.

A rank that raises alone leaves the others waiting in the next collective (a hang until the
process group's timeout); ranks whose heads were built differently (another num_classes, reduction
or margin) train wrong in silence, or abort inside a collective of mismatched shapes. So before
the first collective of a call, and when a head is built or loaded, every rank contributes its
batch size, whether its own checks failed, and a 64-bit digest of each setting that must match
(`SETTINGS`, described as text by `describe_settings`): one all-gather of a few integers. Every rank
sees the same gathered table, so every rank raises the same error together, within seconds: its
own where its checks failed, else one naming the failed ranks, or each setting the ranks disagree
on with every rank's value (the texts exchanged only then).
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..margins import Margin, MarginFunction
from .collectives import all_gather, collective_device, shard_range

SETTINGS = ("num_classes", "embedding_dim", "subcenters", "dtype", "margin", "scale", "margin_grad", "reduction",
            "label_smoothing", "ignore_index", "interclass_filtering", "sample_rate", "sparse_grad", "shard layout")
"""What every rank of a sharded loss must agree on: the settings that decide what the loss means and
which collectives run."""


def describe_margin(margin: MarginFunction) -> str:
    """A margin as text that is equal on two ranks exactly when it computes the same function: a
    built-in margin's kind and parameters (a per-row tensor, which differs between ranks' rows, by
    its shape alone), an adaptive margin's kind and parameters (not its running statistics, which
    the ranks keep equal themselves), a function by its qualified name."""
    if isinstance(margin, Margin):
        def value(v: object) -> str:
            return f"a per-row tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)

        shown = ", ".join(f"{f.name}={value(getattr(margin, f.name))}" for f in fields(margin) if f.repr)
        return f"{type(margin).__name__}({shown})"
    if isinstance(margin, nn.Module):
        return f"{type(margin).__name__}({margin.extra_repr()})"
    kind = margin if hasattr(margin, "__qualname__") else type(margin)
    return f"{kind.__module__}.{kind.__qualname__}"


def describe_settings(*, num_classes: int, embedding_dim: int, subcenters: int, dtype: torch.dtype,
                      margin: MarginFunction, scale: float, margin_grad: str, reduction: str, label_smoothing: float,
                      ignore_index: int, interclass_filtering: Optional[float], sample_rate: float,
                      sparse_grad: bool, world_size: int) -> dict[str, str]:
    """Each of `SETTINGS` as text."""
    try:
        layout = repr([shard_range(num_classes, rank, world_size) for rank in range(world_size)])
    except ValueError as error:
        layout = str(error)
    described = dict(num_classes=num_classes, embedding_dim=embedding_dim, subcenters=subcenters, dtype=dtype,
                     margin=describe_margin(margin), scale=scale, margin_grad=margin_grad, reduction=reduction,
                     label_smoothing=label_smoothing, ignore_index=ignore_index,
                     interclass_filtering=interclass_filtering, sample_rate=sample_rate, sparse_grad=sparse_grad)
    described["shard layout"] = layout
    return {name: str(described[name]) for name in SETTINGS}


def describe_tensors(tensors: dict[str, Tensor]) -> str:
    """Named tensors as text: their values where few, else their shape and a hash of their bytes."""
    parts = []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        values = t.tolist() if t.numel() <= 8 else hashlib.sha256(t.contiguous().view(-1).view(torch.uint8)
                                                                  .numpy().tobytes()).hexdigest()[:16]
        parts.append(f"{name}={values} ({t.dtype}, shape {tuple(t.shape)})")
    return "; ".join(parts) or "none"


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def agree(problem: Optional[Exception], values: dict[str, str], group: Optional[dist.ProcessGroup],
          rows: int = 0) -> list[int]:
    """Every rank's `rows`, after one all-gather of (rows, whether `problem` is set, a digest of
    each of `values`: the same names, in the same order, on every rank). Raises on every rank when
    any rank has a problem (its own exception there; a ValueError naming the ranks elsewhere) or
    when the ranks' values differ (a ValueError naming each differing value and every rank's)."""
    digests = [0] * len(values) if problem is not None else [_digest(text) for text in values.values()]
    row = torch.tensor([[rows, problem is not None, *digests]], dtype=torch.int64, device=collective_device(group))
    table = all_gather(row, group).tolist()
    failed = [rank for rank, (_, bad, *_) in enumerate(table) if bad]
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(f"invalid inputs on rank(s) {failed}; their errors say why")
    differing = [i for i in range(len(values)) if len({entry[2 + i] for entry in table}) > 1]
    if differing:
        _raise_disagreement(values, differing, group)
    return [entry[0] for entry in table]


def _raise_disagreement(values: dict[str, str], differing: list[int], group: Optional[dist.ProcessGroup]) -> None:
    """Exchange the differing values' texts and raise, on every rank, the ValueError naming them."""
    everyone: list[Optional[dict[str, str]]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, values, group=group)
    names = list(values)
    lines = []
    for i in differing:
        per_rank = ", ".join(f"rank {rank}: {ranks_values[names[i]]}" for rank, ranks_values in enumerate(everyone))
        lines.append(f"  {names[i]}: {per_rank}")
    raise ValueError("the ranks of the sharded loss disagree on what it computes; every rank must pass the same:\n"
                     + "\n".join(lines))
