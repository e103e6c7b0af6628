"""`ShardedMarginSoftmaxLoss`: the loss head whose class centres are sharded over the ranks."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..margins import MarginLike
from ..modules import WEIGHT_INIT_STD, check_sample_rate, store_settings
from .agreement import SETTINGS, agree, describe_settings, describe_tensors
from .checkpoint import ShardLayout, track_weight, weight_as_dtensor, weight_from_checkpoint
from .collectives import group_size_and_rank, shard_range
from .loss import sharded_margin_cross_entropy


class ShardedMarginSoftmaxLoss(nn.Module):
    """`MarginSoftmaxLoss` with this rank's shard of the class centres.

    `weight` holds the rows `shard_range(num_classes, rank, world_size)` of the
    (num_classes, embedding_dim) class centres, from N(0, 0.01²); `class_start` is its first class.
    The process group must be initialised before construction. `forward(embeddings, labels)`
    calls `sharded_margin_cross_entropy`; see it for the gradients' convention, sampling and
    `sparse_grad` (a row-sparse weight gradient of the sampled rows, for sampled-row optimizers).
    With `subcenters=K`, `weight` holds K rows per class (class j's at rows (j − class_start)·K …).

    Every rank must build the same head: at construction, at `load_state_dict` and on every call
    the ranks compare their settings (num_classes, embedding_dim, subcenters, dtype, the margin's
    kind and parameters, scale, margin_grad, reduction, label_smoothing, ignore_index,
    interclass_filtering, sample_rate, sparse_grad, the shard layout; at loading also the margin's
    state) in one small collective (`marginfused.distributed.agreement`), and a difference raises
    on every rank a ValueError naming the setting and each rank's value.

    Checkpoints (`marginfused.distributed.checkpoint`). `state_dict()` gives the weight as a DTensor
    of the whole (num_classes, embedding_dim) centres ((num_classes, K, embedding_dim) with K > 1
    sub-centres), its local tensor this rank's rows (the same memory), and a margin module's state
    (running statistics) as it is; an optimizer holding the weight presents its per-row state the
    same way. So PyTorch's recipe reshards both to any world size:

        model_state, optim_state = get_state_dict(model, optimizer)   # torch.distributed.checkpoint.state_dict
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        # ... on R′ ranks, after building the same model and optimizer:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    `load_state_dict` also takes the whole centres as one tensor (a single-process
    `MarginSoftmaxLoss`'s state, or `gather_centres`'s result; with K > 1 as (num_classes·K,
    embedding_dim) too) or this rank's rows alone; a weight of any other shape, on any rank, raises
    ValueError on every rank and loads nothing. `gather_centres` assembles the whole centres on one
    rank, for evaluation.
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
        world_size, rank = group_size_and_rank(group)
        self.group = group
        problem: Optional[Exception] = None
        described = dict.fromkeys(SETTINGS, "")  # what a rank whose checks fail contributes (ignored then)
        try:
            store_settings(self, embedding_dim, num_classes, margin, scale, margin_grad, reduction, ignore_index,
                           label_smoothing, interclass_filtering, subcenters, backend)
            self.sample_rate = check_sample_rate(sample_rate)
            if not isinstance(sparse_grad, bool):
                raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
            self.sparse_grad = sparse_grad
            start, stop = shard_range(num_classes, rank, world_size)
            described = self._described(dtype or torch.get_default_dtype())
        except (TypeError, ValueError) as error:
            problem = error
        agree(problem, described, group)
        self.layout = ShardLayout(num_classes, subcenters, embedding_dim, start, stop, group)
        self.weight = nn.Parameter(torch.empty(self.layout.local_rows, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, mean=0.0, std=WEIGHT_INIT_STD)
        if isinstance(self.margin, nn.Module):
            self.margin.to(device=self.weight.device, dtype=self.weight.dtype)
        self.register_state_dict_post_hook(weight_as_dtensor)
        self.register_load_state_dict_pre_hook(_load_this_ranks_rows)
        track_weight(self.weight, self.layout)

    @property
    def class_start(self) -> int:
        """The first class of this rank's shard."""
        return self.layout.start

    def _described(self, dtype: torch.dtype) -> dict[str, str]:
        """This head's settings as the ranks compare them (`agreement.SETTINGS`)."""
        return describe_settings(
            num_classes=self.num_classes, embedding_dim=self.embedding_dim, subcenters=self.subcenters, dtype=dtype,
            margin=self.margin, scale=self.scale, margin_grad=self.margin_grad, reduction=self.reduction,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            interclass_filtering=self.interclass_filtering, sample_rate=self.sample_rate,
            sparse_grad=self.sparse_grad, world_size=dist.get_world_size(self.group))

    def forward(self, embeddings: Tensor, labels: Tensor, return_accuracy: bool = False,
                generator: Optional[torch.Generator] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """The loss of this rank's `embeddings` and global `labels` (`sharded_margin_cross_entropy`),
        and with `return_accuracy` the global batch's training accuracy."""
        return sharded_margin_cross_entropy(
            embeddings, self.weight, labels, self.margin,
            class_start=self.class_start, num_classes=self.num_classes, group=self.group,
            scale=self.scale, margin_grad=self.margin_grad, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            interclass_filtering=self.interclass_filtering, subcenters=self.subcenters, sample_rate=self.sample_rate,
            backend=self.backend, generator=generator, sparse_grad=self.sparse_grad, return_accuracy=return_accuracy,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"shard=[{self.layout.start}, {self.layout.stop}), subcenters={self.subcenters}, margin={self.margin}, "
            f"scale={self.scale}, sample_rate={self.sample_rate}"
        )


def _load_this_ranks_rows(head: ShardedMarginSoftmaxLoss, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: this rank's rows of the checkpoint's centres; then, in one
    collective, every rank's checkpoint fits and the ranks' settings and margin state agree, or
    every rank raises before anything is loaded."""
    problem: Optional[Exception] = None
    try:
        weight_from_checkpoint(state_dict, prefix, head.layout)
    except ValueError as error:
        problem = error
    margin_state = {key: value for key, value in state_dict.items() if key.startswith(prefix + "margin.")}
    agree(problem, {**head._described(head.weight.dtype), "margin state": describe_tensors(margin_state)},
          head.group)
