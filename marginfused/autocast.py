"""Autocast, handled once for every entry point of the loss.

Under `torch.autocast` for the embeddings' device type, the embeddings and the class centres are
cast once to the autocast dtype (so they may arrive in different dtypes: an autocast backbone
hands over its output in one dtype while the head keeps float32 centres), and the loss then runs
with autocast off: the cosine matmul takes the autocast dtype, everything after it float32.
The casts are ordinary differentiable ops, so gradients reach the original dtypes.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def cast_for_autocast(embeddings: object, weight: object) -> tuple[object, object, ContextManager]:
    """(embeddings, weight, context): the two inputs cast to the autocast dtype if autocast is on
    for the embeddings' device type (floating tensors only; anything else is left for the input
    checks to reject), and a context that turns autocast off for the loss itself."""
    device_type = embeddings.device.type if isinstance(embeddings, torch.Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return embeddings, weight, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: object) -> object:
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return cast(embeddings), cast(weight), torch.autocast(device_type, enabled=False)
