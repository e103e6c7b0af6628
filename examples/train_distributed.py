"""Train with the class centres sharded over ranks: a DDP backbone and a sharded margin head.

    torchrun --nproc_per_node=2 examples/train_distributed.py                    # CPU, gloo
    torchrun --nproc_per_node=8 examples/train_distributed.py --classes 20000000  # GPUs, NCCL

Every rank holds 1/world_size of the class centres (`ShardedMarginSoftmaxLoss`) and the whole
backbone (under DistributedDataParallel). The synthetic identities are those of
examples/train.py, the same on every rank; each rank draws its own batches.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from marginfused.distributed import ShardedMarginSoftmaxLoss
from marginfused.optim import SparseMomentumSGD
from train import embedding_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256, help="per rank")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--sparse-grad", action="store_true",
                        help="row-sparse head gradient of the sampled classes, updated by SparseMomentumSGD")
    parser.add_argument("--margin", default="arcface")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    losses = train(args, device)
    if dist.get_rank() == 0:
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    # the DDP model and the head are gone with train()'s frame: only now the group may go
    dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> list[float]:
    """Train for args.steps steps; return this rank's loss (the global loss) of every step."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    input_dim, embedding_dim, noise = 64, 128, 0.6
    torch.manual_seed(0)  # the same identities and the same backbone initialisation on every rank
    identities = nn.functional.normalize(torch.randn(args.classes, input_dim), dim=1).to(device)
    network = DistributedDataParallel(embedding_network(input_dim, embedding_dim).to(device))
    head = ShardedMarginSoftmaxLoss(
        embedding_dim, args.classes, margin=args.margin, sample_rate=args.sample_rate, sparse_grad=args.sparse_grad,
        backend=args.backend, device=device,
    )
    # the head: momentum and weight decay on the sampled rows alone when its gradient is row-sparse
    head_optimizer = SparseMomentumSGD if args.sparse_grad else torch.optim.SGD
    optimizers = [
        torch.optim.SGD(network.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4),
        head_optimizer(head.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4),
    ]
    sampler = torch.Generator(device=device).manual_seed(1 + rank)
    if rank == 0:
        print(f"{world_size} ranks, {args.classes} classes, this rank's shard: {head}")

    losses = []
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=sampler)
        samples = identities[labels] + noise * torch.randn(args.batch, input_dim, device=device, generator=sampler) / input_dim**0.5
        loss = head(network(samples), labels, generator=sampler)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
        if rank == 0 and args.log_every and (step == 1 or step % args.log_every == 0):
            print(f"step {step:5d}  loss {loss.item():8.4f}")
    return losses


if __name__ == "__main__":
    main()
