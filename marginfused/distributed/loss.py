"""The loss over a global batch with the class centres sharded over ranks (the algorithm:
`marginfused.distributed`).

Gradients. `w_shard.grad` is exactly ∂L/∂w_shard. `x_local.grad` is world_size × ∂L/∂x_local
(Partial FC's convention): the backbone that produced x_local is replicated under
DistributedDataParallel, which averages its gradients over ranks, and that average of
world_size × ∂L/∂x_r · ∂x_r/∂θ over r is exactly ∂L/∂θ. Whatever the margin depends on besides
the cosine (a per-row margin tensor, a learnable parameter) gets world_size × its local rows'
share of ∂L, the same convention: exact once DDP (or an all-reduce mean) averages it over ranks; a
parameter kept out of DDP needs that all-reduce mean itself.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..adaptive import local_batch_sum
from ..autocast import cast_for_autocast
from ..backends import BackendUnavailableError, FusedBackend, KernelSettings, backend_for_call, select_backend
from ..backends.base import ForwardSaved
from ..backends.ops import KernelFields
from ..checks import WEIGHT_NOT_FINITE, check_inputs, check_on_device
from ..margins import MarginLike, working_dtype
from ..negatives import NegativesRule
from ..partials import RowPartials, log_sum_exp, merge
from ..sampling import sample_classes, sampled_rows
from ..settings import LossSettings, check_functional_margin, check_reduction
from ..target import NON_FINITE_MESSAGE, TargetLogits, commit_statistics, finite, target_cosines, target_logits
from ..modules import check_sample_rate
from .agreement import SETTINGS, agree, describe_settings
from .collectives import (GatherRows, OwnRows, all_gather, gather_partials, group_size_and_rank, rows_of, shard_range,
                          slowest_rank)
from .sampling import sampled_labels


def _target_cosines(x: Tensor, w_shard: Tensor, labels: Tensor, class_start: int, ignore_index: int,
                    subcenters: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """c_iy of every row of the gathered batch: the rank holding class y_i computes it from its
    row(s) of W, the others contribute 0, and an all-reduce sums them."""
    local = labels - class_start
    mine = (labels != ignore_index) & (local >= 0) & (local < len(w_shard) // subcenters)
    cos = target_cosines(x, w_shard, local, mine, subcenters)
    dist.all_reduce(cos, group=group)
    return cos




def _check_shard(x_local, w_shard, y_local, class_start, num_classes, sample_rate, settings, rank, world_size) -> None:
    """This rank's own checks of its arguments."""
    check_sample_rate(sample_rate)
    expected = shard_range(num_classes, rank, world_size)
    per_class = settings.subcenters
    held = divmod(len(w_shard), per_class) if isinstance(w_shard, Tensor) else None  # (classes, rows left over)
    if held is None or held[1] or (class_start, class_start + held[0]) != expected:
        rows = len(w_shard) if isinstance(w_shard, Tensor) else type(w_shard).__name__
        raise ValueError(
            f"w_shard must hold the classes shard_range({num_classes}, {rank}, {world_size}) = "
            f"[{expected[0]}, {expected[1]}) ({per_class} row(s) each), got class_start={class_start} with {rows} rows"
        )
    check_inputs(x_local, w_shard, y_local, settings.ignore_index, num_classes=num_classes, margin=settings.margin,
                 allow_no_rows=True, subcenters=per_class)


def sharded_margin_cross_entropy(
    x_local: Tensor,
    w_shard: Tensor,
    y_local: Tensor,
    margin: MarginLike = "arcface",
    *,
    class_start: int,
    num_classes: int,
    group: Optional[dist.ProcessGroup] = None,
    scale: float = 64.0,
    margin_grad: str = "detached",
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    interclass_filtering: Optional[float] = None,
    subcenters: int = 1,
    sample_rate: float = 1.0,
    backend: str = "auto",
    generator: Optional[torch.Generator] = None,
    sparse_grad: bool = False,
    return_accuracy: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """`margin_cross_entropy` over a global batch, with W sharded over the ranks of `group`.

    Every rank passes its local batch `x_local` (B_local × D; B_local may differ between ranks and
    be 0 on some, and the loss is that of the concatenated batch), its
    labels `y_local` (global class ids in [0, num_classes), or ignore_index), and its shard
    `w_shard` of W: the classes [class_start, class_start + len(w_shard) / subcenters), which must be
    `shard_range(num_classes, rank, world_size)` (with K = `subcenters` rows per class, W's rows
    [class_start·K, stop·K)). Returns the loss over the global batch, the same
    on every rank ("mean" over its rows not ignored, or "sum"); with reduction="none", the
    per-row losses of this rank's rows. Gradients: w_shard gets ∂L/∂w_shard, x_local gets
    world_size × ∂L/∂x_local (see the module docstring). `sample_rate` < 1 is Partial FC's class
    sampling, drawing with `generator`. Under `torch.autocast` the inputs are cast once, as in
    `margin_cross_entropy` (`marginfused.autocast`). `sparse_grad=True` makes w_shard's gradient a
    row-sparse `torch.sparse_coo` tensor of the sampled rows alone (its memory scales with the
    sample, not the shard), for `torch.optim.SparseAdam` or `marginfused.optim.SparseMomentumSGD`,
    which leave the other rows and their optimizer state untouched. An adaptive margin's batch
    statistics are over the global batch; a margin's per-row loss term (MagFace's regulariser)
    is in the returned loss, its gradient to x_local world_size × as for the rest. With
    `return_accuracy`, also the training accuracy over the global batch (the same on every rank;
    over the sampled classes when sampling). Other arguments as in `margin_cross_entropy`.
    """
    world_size, rank = group_size_and_rank(group)
    x_local, w_shard, autocast_off = cast_for_autocast(x_local, w_shard)
    with autocast_off:
        return _sharded_margin_cross_entropy(
            x_local, w_shard, y_local, margin, class_start, num_classes, group, scale, margin_grad, reduction,
            ignore_index, label_smoothing, interclass_filtering, subcenters, sample_rate, backend, generator,
            sparse_grad, return_accuracy, world_size, rank,
        )


def _shard_labels(labels: Tensor, class_start: int, shard_classes: int, ignore_index: int) -> Tensor:
    """The labels as the shard's own class ids, ignore_index where the class is another rank's."""
    local = labels - class_start
    return torch.where((labels != ignore_index) & (local >= 0) & (local < shard_classes), local, ignore_index)


def _global_batch_sum(valid: Tensor, group: Optional[dist.ProcessGroup]):
    """`MarginCall.batch_sum` over every rank's valid rows: the local sum, all-reduced."""

    local = local_batch_sum(valid)

    def batch_sum(values: Tensor) -> Tensor:
        total = local(values)
        dist.all_reduce(total, group=group)
        return total

    return batch_sum


def _gather_rule(rule: Optional[NegativesRule], group, sizes: list[int]) -> Optional[NegativesRule]:
    """The negatives rule of the gathered batch from every rank's rows of it."""
    if rule is None:
        return None
    return NegativesRule(all_gather(rule.threshold.detach(), group, sizes),
                         all_gather(rule.offset.detach(), group, sizes), rule.quadratic)


def _with_regulariser(loss: Tensor, target: TargetLogits, labels: Tensor, ignore_index: int, reduction: str,
                      group, world_size: int) -> Tensor:
    """The loss plus the margin's per-row term: of this rank's rows for reduction="none"; else
    summed over the global batch (its value the same on every rank), and divided by the global
    number of valid rows for "mean". Its gradient to this rank's rows is world_size × theirs, the
    convention of x_local's gradient."""
    if target.regulariser is None:
        return loss
    term = target.regulariser.to(loss.dtype)
    term = term.detach() + world_size * (term - term.detach())  # its value, world_size × its gradient
    if reduction == "none":
        return loss + term
    local = term.sum()
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    term = total + (local - local.detach())
    if reduction == "mean":
        term = term / (labels != ignore_index).sum()
    return loss + term


def _sharded_margin_cross_entropy(
    x_local, w_shard, y_local, margin, class_start, num_classes, group, scale, margin_grad, reduction, ignore_index,
    label_smoothing, interclass_filtering, subcenters, sample_rate, backend, generator, sparse_grad, return_accuracy,
    world_size, rank,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    problem: Optional[Exception] = None
    described = dict.fromkeys(SETTINGS, "")  # what a rank whose checks fail contributes (ignored then)
    try:
        check_functional_margin(margin)
        settings = LossSettings.build(margin, scale, margin_grad, ignore_index, label_smoothing, interclass_filtering,
                                      subcenters)
        check_reduction(reduction)
        _check_shard(x_local, w_shard, y_local, class_start, num_classes, sample_rate, settings, rank, world_size)
        implementation = select_backend(backend, x_local)
        described = describe_settings(
            num_classes=num_classes, embedding_dim=x_local.shape[1], subcenters=subcenters, dtype=x_local.dtype,
            margin=settings.margin, scale=settings.scale, margin_grad=margin_grad, reduction=reduction,
            label_smoothing=settings.label_smoothing, ignore_index=ignore_index,
            interclass_filtering=settings.interclass_filtering, sample_rate=sample_rate, sparse_grad=sparse_grad,
            world_size=world_size)
    except (TypeError, ValueError, BackendUnavailableError) as error:
        problem = error
    sizes = agree(problem, described, group, rows=-1 if problem is not None else x_local.shape[0])

    if sum(sizes) == 0:
        raise ValueError("x_local has no rows on any rank: there is no batch to take the loss of")
    labels = all_gather(y_local.long(), group, sizes)
    if sample_rate < 1 or sparse_grad:
        index = sample_classes(labels, class_start, len(w_shard) // subcenters, sample_rate, ignore_index, generator)
        labels, class_start, num_classes = sampled_labels(labels, index, class_start, ignore_index, group)
        # the sampled classes' rows; with sparse_grad their gradient is a sparse tensor of those rows alone
        w_shard = F.embedding(sampled_rows(index, subcenters), w_shard, sparse=sparse_grad)
    x = GatherRows.apply(x_local, group, sizes, float(world_size))  # x_local.grad: world_size × ∂L/∂x_local
    shard_labels = _shard_labels(labels, class_start, len(w_shard) // subcenters, ignore_index)
    implementation = backend_for_call(backend, x, w_shard, shard_labels, settings, slowest_rank(group))
    cos = _target_cosines(x.detach(), w_shard, labels, class_start, ignore_index, subcenters, group)
    valid_local = y_local != ignore_index
    target = target_logits(cos[rows_of(rank, sizes)], valid_local, settings, x_local,
                           _global_batch_sum(valid_local, group))
    finite_everywhere = finite(target, valid_local).all().to(torch.int32).reshape(1)
    dist.all_reduce(finite_everywhere, op=dist.ReduceOp.MIN, group=group)  # every rank raises together
    if not bool(finite_everywhere):
        raise ValueError(NON_FINITE_MESSAGE)
    kernel = KernelSettings.for_call(settings, num_classes, _gather_rule(target.negatives_rule, group, sizes),
                                     class_start)
    per_row, partials = _shard_loss(implementation, x, w_shard, labels, target, kernel, group, sizes)
    commit_statistics(target)
    if reduction == "none":
        loss = OwnRows.apply(per_row, group, sizes)
    else:
        loss = per_row.sum() if reduction == "sum" else per_row.sum() / (labels != ignore_index).sum()
    loss = _with_regulariser(loss, target, labels, ignore_index, reduction, group, world_size)
    if not return_accuracy:
        return loss
    valid = labels != ignore_index
    correct = (partials.best_class == labels) & valid
    return loss, correct.sum(dtype=torch.float32) / valid.sum(dtype=torch.float32)


def _shard_loss(implementation: FusedBackend, x: Tensor, w_shard: Tensor, labels: Tensor, target: TargetLogits,
                kernel: KernelSettings, group, sizes: list[int]) -> tuple[Tensor, RowPartials]:
    """The per-row loss of the gathered batch (the same on every rank) and its partials over all
    classes: this rank's partials operator over its shard, the partials of every rank merged
    (`marginfused.partials.merge`), this rank's weighted centres rescaled from its own max to the
    merged one, then the loss operator, whose backward gives this shard's gradients (its dx summed
    over the ranks by GatherRows' backward); the target logits of every rank's rows gathered so
    that ∂L/∂z_iy reaches each rank's own rows world_size × (every rank computes all of it)."""
    operators = implementation.operators
    fields = KernelFields.flat(kernel)
    work = working_dtype(x.dtype)
    z = GatherRows.apply(target.logit.to(work), group, sizes, 1.0)
    slope = all_gather(target.slope.to(work), group, sizes)
    need_x = x.requires_grad and torch.is_grad_enabled()
    merged = operators.partials(x.detach(), w_shard.detach(), labels, z.detach(), slope, **fields, need_x=need_x)
    local, saved = RowPartials(*merged[:5]), ForwardSaved(*merged[5:])
    partials = merge(gather_partials(local, group))
    check_on_device(partials.max.isfinite() & partials.sumexp.isfinite(), WEIGHT_NOT_FINITE)
    lse = log_sum_exp(partials)
    saved = saved.relative_to(local.max, partials.max)  # this rank's weighted centres to the global max
    loss = operators.loss(x, w_shard, labels, z, slope, lse.max, lse.log_sumexp, partials.logit_sum, *saved,
                          **fields)
    return loss, partials
