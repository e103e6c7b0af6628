"""The margin loss with the class centres sharded over ranks of a torch.distributed group.

When W (C × D) outgrows one GPU, rank r holds the rows [start_r, stop_r) of W, given by
`shard_range`: ⌈C / world_size⌉ rows per rank, the last rank the rest (`torch.chunk`'s split,
which is DTensor's `Shard(0)`, so checkpoints reshard across world sizes). Every step:

1. the local batches x_r (of any size on each rank, none included: the last batch of an epoch)
   and their global labels are all-gathered;
2. the target pre-pass (`marginfused.target`): the rank holding class y_i computes the target
   cosine c_iy from its row of W, an all-reduce gives every rank all of them, and each rank
   applies the margin to its own rows (so per-row margin tensors are of the local batch) and
   all-gathers the target logits z_iy and slopes (and a negative-logit rule's per-row values). An
   adaptive margin's batch statistics are all-reduced over the global batch, so every rank's
   copy of its state advances alike and equals a single process's on the whole batch;
3. each rank computes, with a fused backend, the per-row partials of its shard's logits over the
   whole gathered batch: max m, Σ exp(z − m), logit sum (see `partials.py`);
4. an all-reduce of the maxima, then one of the rescaled sums, gives the global log-sum-exp, and
   from it the loss, identical on every rank (the mean over the global batch by default);
5. backward: each rank computes its shard's contribution to ∂L/∂x for the whole gathered batch,
   given the global log-sum-exp, the target's term entering through the slope on the rank that
   holds the class; an all-reduce sums them, and each rank keeps its own rows; ∂L/∂z_iy of its
   own rows goes into its margin's autograd graph.

Gradients. `w_shard.grad` is exactly ∂L/∂w_shard. `x_local.grad` is world_size × ∂L/∂x_local
(Partial FC's convention): the backbone that produced x_local is replicated under
DistributedDataParallel, which averages its gradients over ranks, and that average of
world_size × ∂L/∂x_r · ∂x_r/∂θ over r is exactly ∂L/∂θ. Keep the sharded head out of DDP: its
shards are different parameters, and its gradients are already exact. Whatever the margin depends
on besides the cosine (a per-row margin tensor, a learnable parameter) gets world_size × its local
rows' share of ∂L, the same convention: exact once DDP (or an all-reduce mean) averages it over
ranks; a parameter kept out of DDP needs that all-reduce mean itself.

Partial FC sampling (`sample_rate` < 1). Each step, each rank keeps every class of its shard that
is a label in the global batch, plus random other classes of its shard, ⌈sample_rate × shard
size⌉ classes in all (or the positives alone, if there are more). The loss and its gradients are
then exactly those of the loss over the sampled classes alone; rows of W not sampled get a zero
gradient. With an optimizer that keeps momentum (or applies weight decay) a zero gradient still
moves those rows — by their velocity from earlier steps, or by the decay — as in Partial FC.
With `sparse_grad=True` the weight's gradient is a sparse tensor holding the sampled rows only,
and `marginfused.optim.SparseMomentumSGD` or `torch.optim.SparseAdam` update those rows alone:
unsampled rows and their optimizer state stay exactly as they were.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .adaptive import local_batch_sum
from .autocast import cast_for_autocast
from .backends import Backend, RowGradients, select_backend
from .checks import check_inputs
from .margins import MarginLike
from .modules import WEIGHT_INIT_STD, store_settings
from .negatives import HardNegatives
from .partials import RowPartials, row_loss
from .settings import LossSettings, check_functional_margin, check_reduction
from .target import (NON_FINITE_MESSAGE, TargetLogits, all_finite, target_cosines, target_logit_grad,
                     target_logits)


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The classes [start, stop) that `rank` holds: ⌈num_classes / world_size⌉ per rank, the last
    rank the rest (`torch.chunk`'s split, and DTensor's Shard(0)). Every rank must hold a class,
    which holds for num_classes > (world_size − 1)²."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    per_rank = -(-num_classes // world_size)
    if num_classes < 1 or per_rank * (world_size - 1) >= num_classes:
        raise ValueError(
            f"num_classes ({num_classes}) over {world_size} ranks in shards of ⌈{num_classes}/{world_size}⌉ = "
            f"{per_rank} leaves the last rank no class; use fewer ranks or more classes "
            f"(num_classes > (world_size − 1)²)"
        )
    start = rank * per_rank
    return start, min(start + per_rank, num_classes)


def _group_size_and_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "the torch.distributed process group is not initialised: call "
            "torch.distributed.init_process_group first"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(tensor: Tensor, group: Optional[dist.ProcessGroup], sizes: Optional[list[int]] = None) -> Tensor:
    """Concatenation over ranks, in rank order, of tensors whose first dimension is `sizes[rank]`
    (the same on every rank when `sizes` is None): padded to the largest for the collective, the
    padding dropped after."""
    world_size = dist.get_world_size(group)
    rows = tensor.shape[0] if sizes is None else max(sizes)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = torch.empty((world_size * rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather(list(out.chunk(world_size)), padded, group=group)
    if sizes is None or len(set(sizes)) == 1:
        return out
    return torch.cat([piece[:size] for piece, size in zip(out.chunk(world_size), sizes)])


def _all_reduce_partials(local: RowPartials, group: Optional[dist.ProcessGroup]) -> RowPartials:
    """The partials of all shards together: max, then rescaled sums, then the best class."""
    top = local.max.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([local.sumexp * torch.exp(local.max - top), local.logit_sum])
    dist.all_reduce(sums, group=group)
    best_cos = local.best_cos.clone()
    dist.all_reduce(best_cos, op=dist.ReduceOp.MAX, group=group)
    best_class = torch.where(local.best_cos == best_cos, local.best_class, torch.iinfo(torch.int64).max)
    dist.all_reduce(best_class, op=dist.ReduceOp.MIN, group=group)
    return RowPartials(top, sums[0], sums[1], best_cos, best_class)


def _target_cosines(x: Tensor, w_shard: Tensor, labels: Tensor, class_start: int, ignore_index: int,
                    subcenters: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """c_iy of every row of the gathered batch: the rank holding class y_i computes it from its
    row(s) of W, the others contribute 0, and an all-reduce sums them."""
    local = labels - class_start
    mine = (labels != ignore_index) & (local >= 0) & (local < len(w_shard) // subcenters)
    cos = target_cosines(x, w_shard, local, mine, subcenters)
    dist.all_reduce(cos, group=group)
    return cos


def sample_classes(
    labels: Tensor,
    class_start: int,
    shard_size: int,
    sample_rate: float,
    ignore_index: int = -100,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Sorted indices, within this shard, of the classes Partial FC keeps this step: every class of
    the shard that is one of `labels` (global ids), then random others, ⌈sample_rate × shard_size⌉
    in all (or the positives alone if there are more)."""
    local = labels[labels != ignore_index] - class_start
    positives = torch.unique(local[(local >= 0) & (local < shard_size)])
    keep = max(math.ceil(sample_rate * shard_size), positives.numel())
    if keep >= shard_size:
        return torch.arange(shard_size, device=labels.device)
    scores = torch.rand(shard_size, generator=generator, device=labels.device)
    scores[positives] = 2.0  # above every random score: positives are always kept
    return scores.topk(keep).indices.sort().values


def _sampled_labels(
    labels: Tensor, index: Tensor, class_start: int, ignore_index: int, group: Optional[dist.ProcessGroup]
) -> tuple[Tensor, int, int]:
    """Labels renumbered over the sampled classes of all ranks (rank order, then index order),
    this rank's first sampled id, and the number of sampled classes in all."""
    counts = _all_gather(torch.tensor([index.numel()], device=labels.device), group).tolist()
    rank = dist.get_rank(group)
    offset = sum(counts[:rank])
    local = labels - class_start
    position = torch.searchsorted(index, local.clamp(min=0))
    mine = (labels != ignore_index) & (local >= 0) & (position < index.numel())
    mine &= index[position.clamp(max=index.numel() - 1)] == local
    renumbered = torch.where(mine, offset + position, torch.full_like(labels, -1))
    dist.all_reduce(renumbered, op=dist.ReduceOp.MAX, group=group)
    renumbered = torch.where(labels == ignore_index, labels, renumbered)
    return renumbered, offset, sum(counts)


def _check_shard(x_local, w_shard, y_local, class_start, num_classes, sample_rate, settings, rank, world_size) -> None:
    """This rank's own checks of its arguments."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
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


def _agree_on_inputs(problem: Optional[Exception], x_local: object, group: Optional[dist.ProcessGroup]) -> list[int]:
    """Exchange every rank's batch size and whether its checks failed, so that all ranks raise
    together (a rank raising alone would leave the others waiting in the next collective).
    Returns the batch size of every rank (they may differ, a rank may have none; not all may)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    rows = x_local.shape[0] if problem is None else -1
    status = _all_gather(torch.tensor([[rows, problem is not None]], device=device), group).tolist()
    failed = [rank for rank, (_, bad) in enumerate(status) if bad]
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(f"invalid inputs on rank(s) {failed}; their errors say why")
    sizes = [size for size, _ in status]
    if sum(sizes) == 0:
        raise ValueError("x_local has no rows on any rank: there is no batch to take the loss of")
    return sizes


class _ShardedLoss(torch.autograd.Function):
    """Forward: the gathered batch's target logits and shard partials, all-reduced into the loss.
    Backward: shard gradients, all-reduce of the embeddings' gradient, world_size × this rank's
    rows; and ∂L/∂z_iy of this rank's rows (world_size × as well), into the margin's own graph."""

    @staticmethod
    def forward(ctx, x_local, w_shard, z_local, x, labels, slope, negatives: Optional[HardNegatives],
                backend: Backend, settings: LossSettings, class_start: int, num_classes: int, reduction: str, group,
                sizes: list[int]):
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = _rows_of(rank, sizes)
        z = _all_gather(z_local.detach(), group, sizes)
        partials = _all_reduce_partials(
            backend.row_partials(x, w_shard.detach(), labels, z, settings, class_start, negatives), group)
        per_row = row_loss(partials, z, labels, settings.ignore_index, settings.label_smoothing, num_classes)
        valid = labels != settings.ignore_index
        ctx.save_for_backward(x, w_shard, labels, z, slope, valid.sum(), partials.max, partials.sumexp)
        ctx.settings = (backend, settings, class_start, num_classes, reduction, group, world_size, sizes, mine)
        ctx.negatives = negatives
        ctx.local_dtype = x_local.dtype
        if reduction == "none":
            return per_row[mine].clone()
        return per_row.sum() if reduction == "sum" else per_row.sum() / valid.sum()

    @staticmethod
    def backward(ctx, grad):
        x, w_shard, labels, z, slope, valid_count, row_max, row_sumexp = ctx.saved_tensors
        backend, settings, class_start, num_classes, reduction, group, world_size, sizes, mine = ctx.settings
        if reduction == "none":
            grad_rows = _all_gather(grad.contiguous(), group, sizes)
        else:
            scale = grad if reduction == "sum" else grad / valid_count
            grad_rows = scale.expand(labels.shape[0])
        accumulate = torch.promote_types(x.dtype, torch.float32)
        grad_rows = grad_rows.to(accumulate)
        need_x, need_w, need_z = ctx.needs_input_grad[:3]
        rows = RowGradients(z, slope, row_max, row_sumexp, grad_rows, ctx.negatives)
        grad_x, grad_w = backend.backward(x, w_shard, labels, rows, settings, class_start, num_classes, True, need_w)
        grad_x = grad_x.to(accumulate)
        dist.all_reduce(grad_x, group=group)
        grad_x_local = (world_size * grad_x[mine]).to(ctx.local_dtype) if need_x else None
        grad_z_local = None
        if need_z:
            grad_z = target_logit_grad(row_max, row_sumexp, z, grad_rows, labels, settings.ignore_index,
                                             settings.label_smoothing, num_classes)
            grad_z_local = world_size * grad_z[mine]
        return (grad_x_local, grad_w, grad_z_local) + (None,) * 11


def _rows_of(rank: int, sizes: list[int]) -> slice:
    """The rows of the gathered batch that `rank` contributed."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


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
) -> Tensor:
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
    is in the returned loss, its gradient to x_local world_size × as for the rest. Other arguments
    as in `margin_cross_entropy`.
    """
    world_size, rank = _group_size_and_rank(group)
    x_local, w_shard, autocast_off = cast_for_autocast(x_local, w_shard)
    with autocast_off:
        return _sharded_margin_cross_entropy(
            x_local, w_shard, y_local, margin, class_start, num_classes, group, scale, margin_grad, reduction,
            ignore_index, label_smoothing, interclass_filtering, subcenters, sample_rate, backend, generator,
            sparse_grad, world_size, rank,
        )


def _global_batch_sum(valid: Tensor, group: Optional[dist.ProcessGroup]):
    """`MarginCall.batch_sum` over every rank's valid rows: the local sum, all-reduced."""

    local = local_batch_sum(valid)

    def batch_sum(values: Tensor) -> Tensor:
        total = local(values)
        dist.all_reduce(total, group=group)
        return total

    return batch_sum


def _gather_rule(rule: Optional[HardNegatives], group, sizes: list[int]) -> Optional[HardNegatives]:
    """The negative-logit rule of the gathered batch from every rank's rows of it."""
    if rule is None:
        return None
    return HardNegatives(_all_gather(rule.threshold.detach(), group, sizes),
                         _all_gather(rule.offset.detach(), group, sizes), rule.quadratic)


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
    label_smoothing, interclass_filtering, subcenters, sample_rate, backend, generator, sparse_grad, world_size, rank,
) -> Tensor:
    problem: Optional[Exception] = None
    try:
        check_functional_margin(margin)
        settings = LossSettings.build(margin, scale, margin_grad, ignore_index, label_smoothing, interclass_filtering,
                                      subcenters)
        check_reduction(reduction)
        _check_shard(x_local, w_shard, y_local, class_start, num_classes, sample_rate, settings, rank, world_size)
    except (TypeError, ValueError) as error:
        problem = error
    sizes = _agree_on_inputs(problem, x_local, group)

    labels = _all_gather(y_local.long(), group, sizes)
    if sample_rate < 1 or sparse_grad:
        index = sample_classes(labels, class_start, len(w_shard) // subcenters, sample_rate, ignore_index, generator)
        labels, class_start, num_classes = _sampled_labels(labels, index, class_start, ignore_index, group)
        # the sampled classes' rows; with sparse_grad their gradient is a sparse tensor of those rows alone
        rows = (index.unsqueeze(1) * subcenters + torch.arange(subcenters, device=index.device)).flatten()
        w_shard = F.embedding(rows, w_shard, sparse=sparse_grad)
    implementation = select_backend(backend, x_local)
    x = _all_gather(x_local.detach(), group, sizes)
    cos = _target_cosines(x, w_shard, labels, class_start, ignore_index, subcenters, group)
    valid_local = y_local != ignore_index
    target = target_logits(cos[_rows_of(rank, sizes)], valid_local, settings, x_local,
                           _global_batch_sum(valid_local, group))
    finite = all_finite(target, valid_local).to(torch.int32).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)  # every rank raises together
    if not bool(finite):
        raise ValueError(NON_FINITE_MESSAGE)
    slope = _all_gather(target.slope, group, sizes)
    loss = _ShardedLoss.apply(
        x_local, w_shard, target.logit, x, labels, slope, _gather_rule(target.negatives, group, sizes),
        implementation, settings, class_start, num_classes, reduction, group, sizes,
    )
    return _with_regulariser(loss, target, labels, ignore_index, reduction, group, world_size)


class ShardedMarginSoftmaxLoss(nn.Module):
    """`MarginSoftmaxLoss` with this rank's shard of the class centres.

    `weight` holds the rows `shard_range(num_classes, rank, world_size)` of the
    (num_classes, embedding_dim) class centres, from N(0, 0.01²); `class_start` is its first class.
    The process group must be initialised before construction. `forward(embeddings, labels)`
    calls `sharded_margin_cross_entropy`; see it for the gradients' convention, sampling and
    `sparse_grad` (a row-sparse weight gradient of the sampled rows, for sampled-row optimizers).

    With `subcenters=K`, `weight` holds K rows per class (class j's at rows (j − class_start)·K …).

    Checkpoints. `state_dict()` gives the weight as a DTensor of the whole (num_classes,
    embedding_dim) centres ((num_classes, K, embedding_dim) with K > 1 sub-centres, so that its
    Shard(0) splits whole classes), sharded Shard(0) over the group, its local tensor this rank's
    rows (the same memory), and a margin module's state (running statistics) as it is. So
    `torch.distributed.checkpoint.save({"head": head.state_dict()}, checkpoint_id=path)` on R
    ranks and, on R′ ranks, `sd = head.state_dict()`, `torch.distributed.checkpoint.load({"head":
    sd}, checkpoint_id=path)`, `head.load_state_dict(sd)` give every rank its rows of the same
    centres. `load_state_dict` also takes the whole centres as one tensor (a single-process
    `MarginSoftmaxLoss`'s state, or `gather_centres`'s result; with K > 1 as (num_classes·K,
    embedding_dim) too) or this rank's rows alone; a weight of any other shape raises ValueError
    and loads nothing. `gather_centres` assembles the whole
    centres on one rank, for evaluation.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        margin: MarginLike = "arcface",
        scale: float = 64.0,
        *,
        group: Optional[dist.ProcessGroup] = None,
        sample_rate: float = 1.0,
        sparse_grad: bool = False,
        margin_grad: str = "detached",
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        interclass_filtering: Optional[float] = None,
        subcenters: int = 1,
        backend: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        world_size, rank = _group_size_and_rank(group)
        store_settings(
            self, embedding_dim, num_classes, margin, scale, margin_grad, reduction, ignore_index, label_smoothing,
            interclass_filtering, subcenters, backend,
        )
        self.class_start, stop = shard_range(num_classes, rank, world_size)
        if not isinstance(sparse_grad, bool):
            raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
        self.sample_rate = sample_rate
        self.sparse_grad = sparse_grad
        self.group = group
        rows = (stop - self.class_start) * subcenters
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, mean=0.0, std=WEIGHT_INIT_STD)
        self.register_state_dict_post_hook(_weight_as_dtensor)
        self.register_load_state_dict_pre_hook(_weight_from_checkpoint)

    def _mesh(self, device: torch.device) -> DeviceMesh:
        """The group as a one-dimensional device mesh (for the weight's DTensor)."""
        return DeviceMesh.from_group(self.group or dist.group.WORLD, device.type)

    def _checkpoint_shape(self) -> tuple[int, ...]:
        """The whole centres' shape in a checkpoint: (C, D), or (C, K, D) with K > 1 sub-centres."""
        per_class = () if self.subcenters == 1 else (self.subcenters,)
        return (self.num_classes, *per_class, self.embedding_dim)

    def _rows_of_centres(self, value: Tensor) -> Tensor:
        """This rank's rows of the centres in a checkpoint's `value`: a DTensor of the whole
        centres, the whole centres as one tensor, or this rank's rows; ValueError otherwise."""
        per_class, dim = self.subcenters, self.embedding_dim
        stop = self.class_start + len(self.weight) // per_class
        whole = {self._checkpoint_shape(), (self.num_classes * per_class, dim)}
        mine = {tuple(self.weight.shape), (stop - self.class_start, per_class, dim)}
        shape = tuple(value.shape)
        if not (shape == self._checkpoint_shape() or (shape in whole | mine and not isinstance(value, DTensor))):
            raise ValueError(
                f"the checkpoint's class centres of shape {shape} do not fit this head: num_classes="
                f"{self.num_classes}, subcenters={per_class}, embedding_dim={dim} (classes "
                f"[{self.class_start}, {stop}) on this rank); nothing was loaded"
            )
        if isinstance(value, DTensor):
            same_layout = value.placements == (Shard(0),) and value.device_mesh == self._mesh(value.device)
            value = value.to_local() if same_layout else value.full_tensor()[self.class_start:stop]
        elif shape in whole:
            value = value.reshape(self.num_classes, per_class, dim)[self.class_start:stop]
        return value.reshape(-1, dim)

    def forward(self, embeddings: Tensor, labels: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return sharded_margin_cross_entropy(
            embeddings, self.weight, labels, self.margin,
            class_start=self.class_start, num_classes=self.num_classes, group=self.group,
            scale=self.scale, margin_grad=self.margin_grad, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            interclass_filtering=self.interclass_filtering, subcenters=self.subcenters, sample_rate=self.sample_rate,
            backend=self.backend, generator=generator, sparse_grad=self.sparse_grad,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"shard=[{self.class_start}, {self.class_start + len(self.weight) // self.subcenters}), "
            f"subcenters={self.subcenters}, margin={self.margin}, "
            f"scale={self.scale}, sample_rate={self.sample_rate}"
        )


def _weight_as_dtensor(head: ShardedMarginSoftmaxLoss, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the weight as a DTensor of the whole centres (this rank's rows its
    local tensor, sharing their memory), so that torch.distributed.checkpoint can reshard it."""
    key = prefix + "weight"
    if key in state_dict:
        shape = head._checkpoint_shape()
        local = state_dict[key].detach().view(-1, *shape[1:])
        state_dict[key] = DTensor.from_local(
            local, head._mesh(local.device), [Shard(0)], run_check=False, shape=torch.Size(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )


def _weight_from_checkpoint(head: ShardedMarginSoftmaxLoss, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: this rank's rows of the checkpoint's centres (see
    `ShardedMarginSoftmaxLoss`), or a ValueError before anything is loaded."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = head._rows_of_centres(state_dict[key])


def gather_centres(head: ShardedMarginSoftmaxLoss, dst: int = 0) -> Optional[Tensor]:
    """The whole (num_classes·subcenters, embedding_dim) class centres of a sharded head, assembled
    on rank `dst` of its group (for evaluation); None on the other ranks. Every rank must call it."""
    group = head.group
    world_size, rank = _group_size_and_rank(group)
    start, stop = shard_range(head.num_classes, 0, world_size)  # the largest shard: every rank's but the last
    per_rank = (stop - start) * head.subcenters
    local = head.weight.detach()
    padded = torch.cat([local, local.new_zeros(per_rank - len(local), local.shape[1])])
    pieces = [torch.empty_like(padded) for _ in range(world_size)] if rank == dst else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
    return torch.cat(pieces)[: head.num_classes * head.subcenters] if rank == dst else None
