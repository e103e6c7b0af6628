"""Tests that run on several ranks of a process group: each spawns its processes once, every rank
runs a list of named checks, and writes the names of failed checks (with the error) to a file the
test reads back. Each spawn is bounded in time, and so is every collective (the group's timeout),
so a hang fails the test instead of stalling the suite."""

import datetime
import json
import multiprocessing
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

SPAWN_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT_S = 60
"""No collective of a check waits longer: a rank left waiting by another fails instead of hanging."""


def _process(rank, world, store, out_dir, checks, args, process_group):
    """One rank: join the group (gloo on CPUs; nccl with GPU `rank` current), run every check
    `checks(rank, world, *args)` lists, and write the failures (name and traceback) where the test
    reads them."""
    failures = []
    try:
        if process_group == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(process_group, init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        for name, check in checks(rank, world, *args):
            try:
                check()
            except (Exception, CheckpointException):  # CheckpointException is a BaseException
                failures.append(f"{name}: {traceback.format_exc(limit=3)}")
        dist.destroy_process_group()
    except (Exception, CheckpointException):
        failures.append(f"setup: {traceback.format_exc()}")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(failures))


def run_on_ranks(world, directory, checks, *args, process_group="gloo"):
    """Spawn `world` ranks of a `process_group` ("gloo" or "nccl") group running `checks` (a
    module-level function: spawned processes import it); fail with the first failures of each
    rank, or if a rank is still running after SPAWN_TIMEOUT_S."""
    directory.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_process, args=(rank, world, directory / "store", directory, checks, args, process_group))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(SPAWN_TIMEOUT_S)
    hung = [p.pid for p in processes if p.is_alive()]
    for process in processes:
        process.kill()
    assert not hung, f"ranks still running after {SPAWN_TIMEOUT_S} s"
    died = {rank: p.exitcode for rank, p in enumerate(processes) if not (directory / f"rank{rank}.json").exists()}
    assert not died, f"ranks that died before reporting (rank: exit code): {died}"
    failures = {rank: json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(world)}
    assert all(not f for f in failures.values()), "\n".join(f"rank {r}: {m}" for r, fs in failures.items() for m in fs[:3])
