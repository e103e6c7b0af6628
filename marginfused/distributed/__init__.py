"""The margin loss with the class centres sharded over ranks of a torch.distributed group.

When W (C × D) outgrows one GPU, rank r holds the rows [start_r, stop_r) of W, given by
`shard_range`: ⌈C / world_size⌉ rows per rank, the last rank the rest (`torch.chunk`'s split,
which is DTensor's `Shard(0)`, so checkpoints reshard across world sizes). Every step:

1. the local batches x_r (of any size on each rank, none included: the last batch of an epoch)
   and their global labels are all-gathered;
2. the target pre-pass (`marginfused.target`): the rank holding class y_i computes the target
   cosine c_iy from its row of W, an all-reduce gives every rank all of them, and each rank
   applies the margin to its own rows (so per-row margin tensors are of the local batch) and
   all-gathers the target logits z_iy and slopes (and a negatives rule's per-row values). An
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

Gradients (`loss.py`): `w_shard.grad` is exactly ∂L/∂w_shard, `x_local.grad` world_size ×
∂L/∂x_local, which DDP's averaging of the backbone's gradients makes exact. Keep the sharded head
out of DDP: its shards are different parameters, and its gradients are already exact.

Partial FC sampling (`sample_rate` < 1, `sampling.py`): the loss and its gradients are exactly
those of the loss over the sampled classes alone; rows of W not sampled get a zero gradient. With an optimizer that keeps momentum (or applies weight decay) a zero gradient still
moves those rows — by their velocity from earlier steps, or by the decay — as in Partial FC.
With `sparse_grad=True` the weight's gradient is a sparse tensor holding the sampled rows only,
and `marginfused.optim.SparseMomentumSGD` or `torch.optim.SparseAdam` update those rows alone:
unsampled rows and their optimizer state stay exactly as they were.

The modules, one job each: `collectives` (the shard layout and the collectives), `sampling`
(Partial FC), `agreement` (every rank's checks and settings compared in one collective), `loss`
(the loss over the global batch), `module` (the head), `checkpoint` (the head's weight and its
optimizer state through checkpoints).
"""

from .checkpoint import gather_centres
from .collectives import shard_range
from .loss import sharded_margin_cross_entropy
from .module import ShardedMarginSoftmaxLoss
from ..sampling import sample_classes

__all__ = ["ShardedMarginSoftmaxLoss", "gather_centres", "sample_classes", "shard_range", "sharded_margin_cross_entropy"]
