"""examples/train.py trains: its loss falls, with the torch backend and with a fused one.

Two runs of several SGD steps are not compared step by step: float rounding that differs between
backends (and between machines) grows along a training trajectory by no bound a test can state;
each step's loss and gradients are held to the float64 truth by the backends' own tests."""

import importlib.util
from pathlib import Path

import pytest

import marginfused as mf

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.py"
spec = importlib.util.spec_from_file_location("train_example", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

SMALL = dict(classes=300, batch=64, input_dim=32, embedding_dim=32, log_every=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_the_loss_falls(backend):
    reason = mf.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    losses = example.train(steps=60, backend=backend, **SMALL)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]


@pytest.mark.parametrize("margin, subcenters", [("adaface", 1), ("magface", 1), ("curricularface", 1),
                                                ("arcface", 3)], ids=["adaface", "magface", "curricularface",
                                                                      "subcenters-3"])
def test_the_loss_falls_with_an_adaptive_margin_or_subcentres(margin, subcenters):
    """The adaptive margins ask more of a few hundred steps (MagFace's margin reaches 0.8, and its
    loss includes the norm regulariser; CurricularFace weights hard negatives up): 150 steps at
    s = 32, as for three sub-centres per identity."""
    backend = "cpu" if mf.available_backends()["cpu"] is None else "torch"
    losses = example.train(steps=150, backend=backend, margin=margin, subcenters=subcenters, scale=32.0, **SMALL)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]


@pytest.mark.parametrize("sampling", [["--sample-rate", "0.5"], ["--sample-rate", "0.1", "--sparse-grad"]],
                         ids=["dense", "sparse-0.1"])
def test_the_distributed_example_trains_under_torchrun_on_two_cpu_ranks(sampling):
    import re
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(EXAMPLE.parent / "train_distributed.py"), "--classes", "300", "--steps", "100", "--batch", "64",
         *sampling, "--log-every", "0"],
        capture_output=True, text=True, timeout=300,
    )
    output = f"exit {result.returncode}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    losses = re.search(r"loss: first ([\d.]+), last ([\d.]+)", result.stdout)
    assert result.returncode == 0 and losses, output
    first, last = map(float, losses.groups())
    assert last < 0.8 * first, output
