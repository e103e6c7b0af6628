"""The implementations the benchmark compares, each a way to compute a loss from (x, W, y).

- `torch`: the package's reference backend, eager (materialises B×C logits).
- `torch-compile`: the same reference math under `torch.compile`.
- every fused backend of the package (`triton`, `cuda`, `cpu`) where it can run.
- peers, on a GPU where installed: plain softmax cross-entropy over a linear layer with no
  margin and no normalisation — the bar a fused margin loss should match:
  `cut-cross-entropy` (Apple's Cut Cross-Entropy) and `liger-kernel` (Liger's fused linear CE).
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
from torch import Tensor

import marginfused as mf
from marginfused.backends.torch import TorchBackend
from marginfused.settings import LossSettings

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]

PACKAGE_BACKENDS = ("triton", "cuda", "cpu", "torch")
PEERS = {"cut-cross-entropy": "cut_cross_entropy", "liger-kernel": "liger_kernel"}
PROVIDERS = (*PACKAGE_BACKENDS, "torch-compile", *PEERS)


def unavailable_reason(provider: str, device: torch.device) -> Optional[str]:
    """None if `provider` can run on `device` here, else why not."""
    if provider in PACKAGE_BACKENDS or provider == "torch-compile":
        backend = "torch" if provider == "torch-compile" else provider
        reason = mf.available_backends()[backend]
        if reason is None and backend in ("triton", "cuda") and device.type != "cuda":
            reason = "runs on CUDA tensors; this run is on the CPU"
        if reason is None and backend == "cpu" and device.type != "cpu":
            reason = "runs on CPU tensors"
        return reason
    if provider in PEERS:
        if device.type != "cuda":
            return "a GPU-only peer; this run is on the CPU"
        if importlib.util.find_spec(PEERS[provider]) is None:
            return f"not installed (pip install {provider})"
        return None
    return f"unknown provider; known: {', '.join(PROVIDERS)}"


def make_loss(provider: str, margin: str) -> LossFn:
    """The mean loss of (x, W, y) as `provider` computes it."""
    if provider in PACKAGE_BACKENDS:
        return lambda x, w, y: mf.margin_cross_entropy(x, w, y, margin, backend=provider)
    if provider == "torch-compile":
        settings = LossSettings.build(margin, 64.0, "detached", -100, 0.0)
        reference = TorchBackend()

        def reference_mean(x: Tensor, w: Tensor, y: Tensor) -> Tensor:
            return reference.per_row_loss(x, w, y, settings).loss.mean()

        return torch.compile(reference_mean, dynamic=False)
    if provider == "cut-cross-entropy":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, y: linear_cross_entropy(x, w, y)
    if provider == "liger-kernel":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda x, w, y: liger(w, x, y)
    raise ValueError(f"unknown provider {provider!r}")
