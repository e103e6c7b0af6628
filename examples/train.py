"""Train an embedding network with a margin softmax head on synthetic identities.

Each identity is a random point on the unit sphere of a `--input-dim` space; a sample of it is
that point plus Gaussian noise. A small MLP maps samples to embeddings, and
`marginfused.MarginSoftmaxLoss` holds one class centre per identity. The loss falls and the
training accuracy (nearest class centre) rises as the network learns to separate identities.

    python examples/train.py                                  # 4,000 identities on the CPU, < 1 min
    python examples/train.py --margin adaface                 # any margin name: magface, curricularface, ...
    python examples/train.py --subcenters 3                   # sub-centre ArcFace: 3 centres per identity
    python examples/train.py --device cuda --classes 1000000  # a million identities on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import marginfused as mf


def embedding_network(input_dim: int, embedding_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(input_dim, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, embedding_dim),
    )


def train(
    classes: int = 4000,
    input_dim: int = 64,
    embedding_dim: int = 128,
    batch: int = 512,
    steps: int = 300,
    margin: str = "arcface",
    subcenters: int = 1,
    scale: float = 64.0,
    noise: float = 0.6,
    lr: float = 0.1,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    log_every: int = 25,
) -> list[float]:
    """Train for `steps` steps; return the loss of every step."""
    torch.manual_seed(seed)
    identities = nn.functional.normalize(torch.randn(classes, input_dim, device=device), dim=1)
    network = embedding_network(input_dim, embedding_dim).to(device)
    head = mf.MarginSoftmaxLoss(embedding_dim, classes, margin=margin, scale=scale, subcenters=subcenters,
                                backend=backend, device=device)
    optimizer = torch.optim.SGD([*network.parameters(), *head.parameters()], lr=lr, momentum=0.9, weight_decay=5e-4)
    sampler = torch.Generator(device=device).manual_seed(seed + 1)
    losses = []
    began = time.perf_counter()
    for step in range(1, steps + 1):
        labels = torch.randint(0, classes, (batch,), device=device, generator=sampler)
        samples = identities[labels] + noise * torch.randn(
            batch, input_dim, device=device, generator=sampler
        ) / input_dim**0.5
        loss, accuracy = head(network(samples), labels, return_accuracy=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == 1):
            rate = step * batch / (time.perf_counter() - began)
            print(f"step {step:5d}  loss {loss.item():8.4f}  accuracy {accuracy.item():6.3f}  {rate:9.0f} samples/s")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--margin", default="arcface",
                        help="a margin name: cosface, arcface, sphereface, expface, combined, adaface, magface, "
                             "curricularface")
    parser.add_argument("--subcenters", type=int, default=1, help="class centres per identity (sub-centre ArcFace)")
    parser.add_argument("--scale", type=float, default=64.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"backends: {mf.available_backends()}")
    losses = train(
        classes=args.classes, batch=args.batch, steps=args.steps, margin=args.margin, subcenters=args.subcenters,
        scale=args.scale,
        lr=args.lr, backend=args.backend, device=args.device, seed=args.seed,
    )
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
