"""The fused backends' loss as PyTorch custom operators, one set per backend.

A fused backend (`FusedBackend`) implements two kernels over a shard of W: `partials` and
`gradients`; a backend whose forward also keeps something for its backward (`ForwardSaved`: the
triton backend's weighted centres and inverse norms, the cpu and cuda backends' inverse norms)
implements `forward`, `saved_like` and `backward` too, which by default are `partials` keeping
nothing and `gradients`. For the backend named N they become

    marginfused::N_partials(x, w, y, target_logit, target_slope, <kernel>, need_x)
        -> (max, sumexp, logit_sum, best_cos, best_class, weighted_centres, inv_x, inv_w)
        the partials over the shard, merged over the backend's class ranges (`partials.merge`),
        and what the forward keeps (empty tensors where it keeps nothing; the weighted centres,
        relative to the merged max, only where need_x: the embeddings need a gradient)
    marginfused::N_loss(x, w, y, target_logit, target_slope, row_max, log_sumexp, logit_sum,
                        weighted_centres, inv_x, inv_w, <kernel>) -> loss
        ℓ_i = m_i + log s_i − (1 − ε)·z_iy − (ε/C)·Σ_j z_ij from the partials over all classes,
        differentiable in x, w and target_logit, the weighted centres relative to row_max: its
        backward is
    marginfused::N_loss_backward(x, w, y, target_logit, target_slope, row_max, log_sumexp, upstream,
                                 weighted_centres, inv_x, inv_w, <kernel>, need_x, need_w) -> (dx, dw)
                                                                      (empty where not needed)

with <kernel> the fields of one `KernelSettings`, flattened for the operator's schema and packed
back into one value, by name, on entry (`KernelFields`). `register_fake` gives their shapes and
`register_autograd` joins the loss to its backward, so torch.compile traces a training step
through the loss with no graph break. ∂L/∂z_iy = u_i·(p_iy − (1−ε) − ε/C) is O(B) and computed
here; autograd carries it into the margin's own inputs (`marginfused.target`).

`per_row_loss` (the loss of one process) and `marginfused.distributed.loss` (with the partials
merged across ranks, each rank's weighted centres rescaled to the global max) run the same
operators.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import Tensor

from ..checks import WEIGHT_NOT_FINITE, check_on_device
from ..margins import working_dtype
from ..partials import LogSumExp, RowPartials, log_sum_exp, merge, row_loss
from ..settings import LossSettings
from ..negatives import NegativesRule
from ..target import (TargetLogits, check_finite, commit_statistics, target_cosines, target_logit_grad,
                      target_logits, with_regulariser)
from .base import Backend, ForwardSaved, KernelSettings, RowLoss

class KernelFields:
    """`KernelSettings` flattened into an operator's arguments (the negatives rule as its two
    optional tensors and q), and packed back: the one place that knows the order."""

    NAMES = ("rule_threshold", "rule_offset", "scale", "ignore_index", "label_smoothing", "rule_quadratic",
             "subcenters", "num_classes", "class_start")

    @staticmethod
    def flat(kernel: KernelSettings) -> dict:
        rule = kernel.negatives_rule
        return dict(rule_threshold=None if rule is None else rule.threshold,
                    rule_offset=None if rule is None else rule.offset, scale=kernel.scale,
                    ignore_index=kernel.ignore_index, label_smoothing=kernel.label_smoothing,
                    rule_quadratic=0.0 if rule is None else rule.quadratic, subcenters=kernel.subcenters,
                    num_classes=kernel.num_classes, class_start=kernel.class_start)

    @staticmethod
    def packed(fields: dict) -> KernelSettings:
        from_rule = fields["rule_threshold"] is not None
        rule = NegativesRule(fields["rule_threshold"], fields["rule_offset"], fields["rule_quadratic"]) if from_rule else None
        return KernelSettings(fields["scale"], fields["ignore_index"], fields["label_smoothing"], fields["subcenters"],
                              fields["num_classes"], fields["class_start"], rule)


class Operators:
    """The custom operators of one fused backend (module docstring), created once per backend
    class: the backend is bound to them, never looked up by name."""

    def __init__(self, backend: "FusedBackend") -> None:
        prefix = f"marginfused::{backend.name.replace('-', '_')}"

        def partials(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                     rule_threshold: Optional[Tensor], rule_offset: Optional[Tensor], scale: float, ignore_index: int,
                     label_smoothing: float, rule_quadratic: float, subcenters: int, num_classes: int,
                     class_start: int, need_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                              Tensor]:
            kernel = KernelFields.packed(locals())
            parts, saved = backend.forward(x, w, y, target_logit, target_slope, kernel, need_x)
            return (*merge(parts), *saved)

        def loss(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor, row_max: Tensor,
                 log_sumexp: Tensor, logit_sum: Tensor, weighted_centres: Tensor, inv_x: Tensor, inv_w: Tensor,
                 rule_threshold: Optional[Tensor], rule_offset: Optional[Tensor], scale: float, ignore_index: int,
                 label_smoothing: float, rule_quadratic: float, subcenters: int, num_classes: int,
                 class_start: int) -> Tensor:
            return row_loss(LogSumExp(row_max, log_sumexp), logit_sum, target_logit, y, ignore_index, label_smoothing,
                            num_classes)

        def loss_backward(x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                          row_max: Tensor, log_sumexp: Tensor, upstream: Tensor, weighted_centres: Tensor,
                          inv_x: Tensor, inv_w: Tensor, rule_threshold: Optional[Tensor],
                          rule_offset: Optional[Tensor], scale: float, ignore_index: int, label_smoothing: float,
                          rule_quadratic: float, subcenters: int, num_classes: int, class_start: int, need_x: bool,
                          need_w: bool) -> tuple[Tensor, Tensor]:
            kernel = KernelFields.packed(locals())
            dx, dw = backend.backward(x, w, y, target_logit, target_slope, LogSumExp(row_max, log_sumexp), upstream,
                                      kernel, need_x, need_w, ForwardSaved(weighted_centres, inv_x, inv_w))
            return (dx if need_x else x.new_empty(0)), (dw if need_w else w.new_empty(0))

        self.partials = torch.library.custom_op(f"{prefix}_partials", partials, mutates_args=())
        self.loss = torch.library.custom_op(f"{prefix}_loss", loss, mutates_args=())
        self.loss_backward = torch.library.custom_op(f"{prefix}_loss_backward", loss_backward, mutates_args=())

        @self.partials.register_fake
        def _(x, w, y, target_logit, target_slope, *kernel_and_need):
            rows = x.shape[0]
            floats = [x.new_empty(rows, dtype=working_dtype(x.dtype)) for _ in range(4)]
            return (*floats, x.new_empty(rows, dtype=torch.int64), *backend.saved_like(x, w, kernel_and_need[-1]))

        @self.loss.register_fake
        def _(x, w, y, target_logit, *rest):
            return x.new_empty(x.shape[0], dtype=working_dtype(x.dtype))

        @self.loss_backward.register_fake
        def _(x, w, y, target_logit, target_slope, row_max, log_sumexp, upstream, *saved_kernel_and_needs):
            need_x, need_w = saved_kernel_and_needs[-2:]
            return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))

        names = ("x", "w", "y", "target_logit", "target_slope", "row_max", "log_sumexp", "logit_sum",
                 *ForwardSaved._fields, *KernelFields.NAMES)
        saved_names = ("x", "w", "y", "target_logit", "target_slope", "row_max", "log_sumexp", *ForwardSaved._fields,
                       "rule_threshold", "rule_offset")

        def setup_context(ctx, inputs, output) -> None:
            arguments = dict(zip(names, inputs))
            ctx.save_for_backward(*(arguments[name] for name in saved_names))
            ctx.kernel = {name: arguments[name] for name in KernelFields.NAMES if name not in ("rule_threshold",
                                                                                              "rule_offset")}

        def backward(ctx, upstream):
            saved = dict(zip(saved_names, ctx.saved_tensors))
            need_x, need_w, need_target = (ctx.needs_input_grad[names.index(n)] for n in ("x", "w", "target_logit"))
            kernel = dict(ctx.kernel, rule_threshold=saved.pop("rule_threshold"), rule_offset=saved.pop("rule_offset"))
            grads = dict.fromkeys(names)
            if need_x or need_w:
                dx, dw = self.loss_backward(**saved, upstream=upstream.contiguous(), **kernel, need_x=need_x,
                                            need_w=need_w)
                grads.update(x=dx if need_x else None, w=dw if need_w else None)
            if need_target:
                lse = LogSumExp(saved["row_max"], saved["log_sumexp"])
                grads["target_logit"] = target_logit_grad(lse, saved["target_logit"], upstream, saved["y"],
                                                          kernel["ignore_index"], kernel["label_smoothing"],
                                                          kernel["num_classes"])
            return tuple(grads[name] for name in names)

        self.loss.register_autograd(backward, setup_context=setup_context)


class FusedBackend(Backend):
    """A backend made of two kernels over a shard of W (`partials`, `gradients`), run through its
    custom operators (`operators`); its per-row loss is the target pre-pass, then those. A backend
    whose forward keeps something for its backward overrides `forward`, `saved_like` and
    `backward` as well."""

    _operators: dict[type, Operators] = {}

    @property
    def operators(self) -> Operators:
        """This backend's custom operators, created with the first instance of its class."""
        if type(self) not in self._operators:
            self._operators[type(self)] = Operators(self)
        return self._operators[type(self)]

    @abc.abstractmethod
    def partials(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, kernel: KernelSettings) -> RowPartials:
        """Partials over the classes of the shard `w` ([kernel.class_start, + C)), unmerged: each
        field (k, B) for k class ranges in class order (`marginfused.partials.merge` combines
        them). Row i's target column, if in the shard, takes target_logit_i. No autograd."""

    @abc.abstractmethod
    def gradients(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                  lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool,
                  need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Gradients of Σ_i u_i·ℓ_i (u = `upstream`, the upstream gradient of the per-row loss) with
        respect to x and the shard `w`, through the logits of its classes, given the log-sum-exp
        over all kernel.num_classes classes (`marginfused.partials.LogSumExp`):

            ∂/∂c_ij = u_i · s · (p_ij − ε/C)                           j ≠ y_i
            ∂/∂c_iy = u_i · σ_i · (p_iy − (1 − ε) − ε/C)              σ_i = target_slope_i

        (a hard negative's s becoming s·(a_i + 2q·c_ij) under the negatives rule), with
        p_ij = exp((z_ij − m_i) − log s_i), then through the normalisations. The x gradients of
        disjoint class ranges add up to the whole one. A gradient not needed may be None."""

    def forward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                kernel: KernelSettings, need_x: bool) -> tuple[RowPartials, ForwardSaved]:
        """The partials (as `partials`: unmerged) and what the backward is to keep (`ForwardSaved`;
        the weighted centres, where `need_x`, relative to the merged partials' max; nothing here)."""
        return self.partials(x, w, y, target_logit, kernel), ForwardSaved.nothing(x)

    def saved_like(self, x: Tensor, w: Tensor, need_x: bool) -> ForwardSaved:
        """Empty tensors of the shapes and dtypes of what `forward` keeps, merged (the operators'
        fake)."""
        return ForwardSaved.nothing(x)

    def backward(self, x: Tensor, w: Tensor, y: Tensor, target_logit: Tensor, target_slope: Tensor,
                 lse: LogSumExp, upstream: Tensor, kernel: KernelSettings, need_x: bool, need_w: bool,
                 saved: ForwardSaved) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """`gradients`, given what `forward` kept (its weighted centres relative to lse.max)."""
        return self.gradients(x, w, y, target_logit, target_slope, lse, upstream, kernel, need_x, need_w)

    def shard_loss(self, x: Tensor, w: Tensor, y: Tensor, target: TargetLogits,
                   kernel: KernelSettings) -> tuple[Tensor, RowPartials]:
        """The per-row loss over the shard `w` and its partials: the partials operator, then the
        loss operator (differentiable in x, w and the target logits)."""
        logit, slope = target.logit.to(working_dtype(x.dtype)), target.slope.to(working_dtype(x.dtype))
        fields = KernelFields.flat(kernel)
        need_x = x.requires_grad and torch.is_grad_enabled()
        merged = self.operators.partials(x.detach(), w.detach(), y, logit.detach(), slope.detach(), **fields,
                                         need_x=need_x)
        partials, saved = RowPartials(*merged[:5]), ForwardSaved(*merged[5:])
        check_on_device(partials.max.isfinite() & partials.sumexp.isfinite(), WEIGHT_NOT_FINITE)
        lse = log_sum_exp(partials)
        loss = self.operators.loss(x, w, y, logit, slope, lse.max, lse.log_sumexp, partials.logit_sum, *saved,
                                   **fields)
        return loss, partials

    def per_row_loss(self, x: Tensor, w: Tensor, y: Tensor, settings: LossSettings) -> RowLoss:
        valid = y != settings.ignore_index
        target = target_logits(target_cosines(x, w, y, valid, settings.subcenters), valid, settings, x)
        check_finite(target, valid)
        kernel = KernelSettings.for_call(settings, w.shape[0] // settings.subcenters, target.negatives_rule)
        loss, partials = self.shard_loss(x, w, y, target, kernel)
        commit_statistics(target)
        return RowLoss(with_regulariser(loss, target), partials)
