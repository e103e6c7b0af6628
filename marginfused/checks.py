"""Input checks shared by every backend: a clear error before any work, and nothing modified."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .margins import MarginFunction, per_row_parameters


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _all_finite(t: Tensor) -> Tensor:
    """A 0-dim bool tensor: no NaN or ±Inf in a non-empty tensor. One pass and no temporary of its
    size (the min and max propagate NaN), so checking a C×D weight costs no C×D memory."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


def check_inputs(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    ignore_index: int,
    num_classes: Optional[int] = None,
    margin: Optional[MarginFunction] = None,
    allow_no_rows: bool = False,
    subcenters: int = 1,
) -> None:
    """Check shapes, dtypes, devices, finiteness and label range of the loss's inputs.

    embeddings: (B, D) floating; weight: (C, D), same dtype and device; labels: (B,) integer,
    each in [0, num_classes) or equal to `ignore_index`, num_classes being C unless given (a shard
    of the classes takes global labels), C = the weight's rows / `subcenters` (whole classes); a margin's per-row parameters one value per row, on the
    embeddings' device. B = 0 only with `allow_no_rows` (a rank's share of a sharded batch).
    Raises TypeError or ValueError naming the argument.
    Under torch.compile only shapes, dtypes and devices are checked, not values.
    """
    x = _require_tensor("embeddings", embeddings)
    w = _require_tensor("weight", weight)
    y = _require_tensor("labels", labels)

    if not x.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {x.dtype}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {w.dtype}")
    if w.dtype != x.dtype:
        raise TypeError(
            f"weight must have the dtype of embeddings: embeddings are {x.dtype}, weight is {w.dtype}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {y.dtype}")

    if x.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, dim), got shape {tuple(w.shape)}")
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(y.shape)}")
    batch, dim = x.shape
    if (batch == 0 and not allow_no_rows) or dim == 0:
        raise ValueError(f"embeddings must be non-empty, got shape {tuple(x.shape)}")
    if w.shape[0] == 0:
        raise ValueError(f"weight must have at least one class, got shape {tuple(w.shape)}")
    if w.shape[0] % subcenters:
        raise ValueError(
            f"weight's {w.shape[0]} rows are not whole classes of subcenters={subcenters} sub-centres each "
            f"(class j's sub-centres are rows j·{subcenters} to j·{subcenters} + {subcenters - 1})"
        )
    num_classes = w.shape[0] // subcenters if num_classes is None else num_classes
    if w.shape[1] != dim:
        raise ValueError(
            f"weight must have the embedding dim of embeddings ({dim}), got shape {tuple(w.shape)}"
        )
    if y.shape[0] != batch:
        raise ValueError(f"labels must have one entry per embedding ({batch}), got {y.shape[0]}")

    if w.device != x.device:
        raise ValueError(f"weight is on {w.device} but embeddings are on {x.device}")
    if y.device != x.device:
        raise ValueError(f"labels are on {y.device} but embeddings are on {x.device}")
    for name, value in per_row_parameters(margin).items():
        if value.shape != (batch,):
            raise ValueError(f"margin parameter {name} must hold one value per row ({batch}), got shape {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"margin parameter {name} is on {value.device} but embeddings are on {x.device}")

    if torch.compiler.is_compiling():
        return  # the value checks below need the values; a traced graph has none
    out_of_range = ((y < 0) | (y >= num_classes)) & (y != ignore_index)
    # one transfer to the host for the three checks: a single synchronisation on a GPU
    x_finite, w_finite, labels_in_range = torch.stack(
        [_all_finite(x), _all_finite(w), ~out_of_range.any()]
    ).tolist()
    if not x_finite:
        raise ValueError("embeddings contain NaN or Inf")
    if not w_finite:
        raise ValueError("weight contains NaN or Inf")
    if not labels_in_range:
        bad = y[out_of_range][0].item()
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}, got {bad}"
        )


def labels_for_the_loss(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """The labels as int64, their range checked on the device where the host cannot look.

    Eagerly, `check_inputs` has checked every value on the host. Under torch.compile, whose traced
    graph has no values, an asynchronous device assertion fails the call on a label outside
    [0, num_classes) that is not `ignore_index` (no host synchronisation), and such labels are
    replaced by ignore_index for everything the graph runs, so that no gather indexes out of range
    before the assertion is reached."""
    labels = labels.long()
    if not torch.compiler.is_compiling():
        return labels
    valid = ((labels >= 0) & (labels < num_classes)) | (labels == ignore_index)
    torch._assert_async(valid.all(), f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}")
    return torch.where(valid, labels, torch.full_like(labels, ignore_index))
