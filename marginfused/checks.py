"""Input checks shared by every backend: a clear error before any work, and nothing modified."""

from __future__ import annotations

from typing import Callable, Optional

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
    Raises TypeError or ValueError naming the argument. Shapes, dtypes and devices are checked on
    the host; the values (the embeddings finite, the labels in range) on the device, without
    reading them back (`check_on_device`). The weight's values are the kernels' to check: non-finite
    centres make non-finite partials (`marginfused.backends.ops`), with no pass over W here.
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

    check_on_device(_all_finite(x), "embeddings contain NaN or Inf")
    out_of_range = ((y < 0) | (y >= num_classes)) & (y != ignore_index)
    message = f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}"
    check_on_device(~out_of_range, message, lambda: f", got {y[out_of_range][0].item()}")


def check_on_device(condition: Tensor, message: str, detail: Optional[Callable[[], str]] = None) -> None:
    """A ValueError saying `message` where `condition` (a bool tensor) does not hold everywhere,
    checked on the tensors' device without reading the condition back to the host: an
    asynchronous device assertion (torch._assert_async), which on the CPU fails at once, raised as
    the ValueError (plus `detail()`, read only then); on a GPU, and under torch.compile, it fails
    the call at the next synchronisation, with the message."""
    condition = condition.all()
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
        return
    try:
        torch._assert_async(condition, message)
    except RuntimeError:
        raise ValueError(message + (detail() if detail is not None else "")) from None


WEIGHT_NOT_FINITE = "weight contains NaN or Inf"


def check_weight_finite(weight: Tensor) -> None:
    """A ValueError if the weight holds NaN or Inf: one pass over it, for uses outside the loss
    (whose kernels find non-finite centres in their partials instead)."""
    check_on_device(_all_finite(weight), WEIGHT_NOT_FINITE)


def labels_for_the_loss(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """The labels as int64. Under torch.compile a label out of range fails the call only when the
    graph reaches `check_inputs`'s assertion: until then such labels are replaced by ignore_index,
    so that no gather the graph runs first indexes out of range."""
    labels = labels.long()
    if not torch.compiler.is_compiling():
        return labels
    valid = ((labels >= 0) & (labels < num_classes)) | (labels == ignore_index)
    return torch.where(valid, labels, torch.full_like(labels, ignore_index))
