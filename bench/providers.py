"""The implementations the benchmark compares, each a way to compute a loss from (x, W, y).

- `torch`: the package's reference backend, eager (materialises B×C logits).
- `torch-compile`: the same reference math under `torch.compile`.
- every fused backend of the package (`triton`, `cuda`, `cpu`) where it can run.
- what a user would pick instead, on any device:
  `torch-linear-ce`: PyTorch's own `F.linear_cross_entropy` with its chunked path
  (`torch.nn.LinearCrossEntropyOptions()`); `torch-linear-ce-ref`: the same unchunked;
  `pytorch-metric-learning`: its `ArcFaceLoss` at the same margin (in degrees) and scale, on
  the same centres.
- peers on a GPU where installed: `cut-cross-entropy` (Apple's Cut Cross-Entropy) and
  `liger-kernel` (Liger's fused linear CE).

The margin-free peers (softmax cross-entropy over a plain linear layer, no normalisation) are the
bar a fused margin loss should match: they do less. `KINDS` labels every provider so in tables and
plots.
"""

from __future__ import annotations

import importlib.util
import math
import operator
from typing import Callable, Optional

import torch
from torch import Tensor

import marginfused as mf
from marginfused.backends import REGISTRY
from marginfused.backends.torch import TorchBackend
from marginfused.settings import LossSettings, resolve_margin

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]

PACKAGE_BACKENDS = ("triton", "cuda", "cpu", "torch")
GPU_PEERS = {"cut-cross-entropy": "cut_cross_entropy", "liger-kernel": "liger_kernel"}
PEERS = {"torch-linear-ce": "torch", "torch-linear-ce-ref": "torch", "pytorch-metric-learning": "pytorch_metric_learning",
         **GPU_PEERS}
"""Each peer and the module it needs."""
PROVIDERS = (*PACKAGE_BACKENDS, "torch-compile", *PEERS)

TORCH_APIS = {
    "torch-linear-ce": ("nn.functional.linear_cross_entropy", "nn.LinearCrossEntropyOptions"),
    "torch-linear-ce-ref": ("nn.functional.linear_cross_entropy",),
}
"""What each of PyTorch's own peers needs of the installed torch (torch 2.13 has both)."""

MARGIN_NORMALISED = "margin, normalised"
MARGIN_FREE = "margin-free, not normalised"
KINDS = {**{name: MARGIN_NORMALISED for name in (*PACKAGE_BACKENDS, "torch-compile", "pytorch-metric-learning")},
         **{name: MARGIN_FREE for name in ("torch-linear-ce", "torch-linear-ce-ref", *GPU_PEERS)}}
"""What each provider computes: a margin loss over cosines, or plain softmax cross-entropy over logits."""


def label(provider: str) -> str:
    """The provider's name with what it computes, for tables and plots."""
    return f"{provider} ({KINDS[provider]})"


def unavailable_reason(provider: str, device: torch.device, margin: str = "arcface") -> Optional[str]:
    """None if `provider` can run on `device` (for `margin`) here, else why not."""
    if provider in PACKAGE_BACKENDS or provider == "torch-compile":
        backend = "torch" if provider == "torch-compile" else provider
        if backend in ("triton", "cuda") and device.type != "cuda":
            return "runs on CUDA tensors; this run is on the CPU"
        if backend == "cpu" and device.type != "cpu":
            return "runs on CPU tensors"
        return REGISTRY[backend].unavailable_reason()  # builds this backend's extension alone
    if provider in PEERS:
        if provider in GPU_PEERS and device.type != "cuda":
            return "a GPU-only peer; this run is on the CPU"
        if importlib.util.find_spec(PEERS[provider]) is None:
            return f"not installed (pip install {provider})"
        missing = [name for name in TORCH_APIS.get(provider, ()) if not _torch_has(name)]
        if missing:
            return f"torch {torch.__version__} has no {' or '.join('torch.' + name for name in missing)}"
        if provider == "pytorch-metric-learning" and not isinstance(resolve_margin(margin), mf.ArcFace):
            return "benchmarked with ArcFace only (its ArcFaceLoss at the same margin and scale)"
        return None
    return f"unknown provider; known: {', '.join(PROVIDERS)}"


def _torch_has(dotted: str) -> bool:
    """Whether the installed torch has torch.<dotted>."""
    try:
        operator.attrgetter(dotted)(torch)
    except AttributeError:
        return False
    return True


def make_loss(provider: str, margin: str) -> LossFn:
    """The mean loss of (x, W, y) as `provider` computes it (a margin named once: an adaptive one
    keeps its statistics across the timed calls, as in training)."""
    if provider in PACKAGE_BACKENDS:
        margin_fn = resolve_margin(margin)
        return lambda x, w, y: mf.margin_cross_entropy(x, w, y, margin_fn, backend=provider)
    if provider == "torch-compile":
        settings = LossSettings.build(margin, 64.0, "detached", -100, 0.0)
        reference = TorchBackend()

        def reference_mean(x: Tensor, w: Tensor, y: Tensor) -> Tensor:
            return reference.per_row_loss(x, w, y, settings).loss.mean()

        return torch.compile(reference_mean, dynamic=False)
    if provider == "torch-linear-ce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, y: torch.nn.functional.linear_cross_entropy(x, w, y, options=options)
    if provider == "torch-linear-ce-ref":
        return lambda x, w, y: torch.nn.functional.linear_cross_entropy(x, w, y)
    if provider == "pytorch-metric-learning":
        return _metric_learning_arcface(margin)
    if provider == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, y: linear_cross_entropy(x, w, y)
    if provider == "liger-kernel":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, y: liger(w, x, y)
    raise ValueError(f"unknown provider {provider!r}")


def _metric_learning_arcface(margin: str) -> LossFn:
    """pytorch-metric-learning's ArcFaceLoss at the package's ArcFace margin (radians → its
    degrees) and scale 64, on the benchmark's centres: its own weight (D × C) is replaced, call by
    call, by Wᵀ, so gradients reach W as they do for every other provider."""
    from pytorch_metric_learning.losses import ArcFaceLoss

    arcface = resolve_margin(margin)
    loss = None

    def arcface_loss(x: Tensor, w: Tensor, y: Tensor) -> Tensor:
        nonlocal loss
        if loss is None:
            loss = ArcFaceLoss(num_classes=w.shape[0], embedding_size=w.shape[1], margin=math.degrees(arcface.m),
                               scale=64.0).to(w.device)
            del loss.W
        loss.W = w.t()
        return loss(x, y)

    return arcface_loss
