"""Optimizers for heads trained on sampled classes (Partial FC with `sparse_grad=True`).

`SparseMomentumSGD` is SGD with momentum and weight decay in which a row-sparse gradient (a
`torch.sparse_coo` tensor, as `ShardedMarginSoftmaxLoss(..., sparse_grad=True)` gives its weight)
updates only the rows it holds. For each row r present in the gradient, with learning rate η,
momentum μ and weight decay λ:

    g_r = grad_r + λ·p_r
    v_r ← μ·v_r + g_r
    p_r ← p_r − η·(g_r + μ·v_r)      with nesterov
    p_r ← p_r − η·v_r                otherwise

Rows absent from the gradient, and their momentum buffer, are left exactly as they were; torch's
SGD would decay every row and move every row with momentum by its stale velocity. A dense
gradient updates every row by the same rule (torch's SGD with dampening 0).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from .values import is_real


class SparseMomentumSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay applied to the rows present in a row-sparse gradient only
    (module docstring)."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0), ("weight_decay", weight_decay, 0.0)):
            if not is_real(value) or not value >= low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                                      nesterov=bool(nesterov)))

    @torch.no_grad()
    def step(self, closure: Optional[callable] = None) -> Optional[Tensor]:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, param.grad, group)
        return loss

    def _update(self, param: Tensor, grad: Tensor, group: dict) -> None:
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        else:
            rows, values = None, grad
        current = param if rows is None else param.index_select(0, rows)
        step = values + group["weight_decay"] * current if group["weight_decay"] else values.clone()
        if group["momentum"]:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"]
            velocity = group["momentum"] * (buffer if rows is None else buffer.index_select(0, rows)) + step
            if rows is None:
                buffer.copy_(velocity)
            else:
                buffer.index_copy_(0, rows, velocity)
            step = step + group["momentum"] * velocity if group["nesterov"] else velocity
        updated = current - group["lr"] * step
        if rows is None:
            param.copy_(updated)
        else:
            param.index_copy_(0, rows, updated)
