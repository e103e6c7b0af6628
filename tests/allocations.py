"""Count what PyTorch allocates while code runs, on any device, CPU included.

`AllocationTracker` is a TorchDispatchMode: every storage an operator creates inside it is
counted until that storage is freed. It reports the peak of live bytes and the largest single
allocation, which the tests use to prove that no B×C tensor is ever allocated (the benchmarks
measure whole processes instead: see bench/worker.py). An operator's output counts as an allocation when its storage is
not one of the operator's inputs' (views and in-place results are not allocations). The package's
own custom operators are opened up: what their implementations allocate is counted too.

A test tool: it lives with the tests, not in the package.
"""

from __future__ import annotations

import weakref
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from marginfused.backends import REGISTRY, FusedBackend


def implementation(name: str):
    """The Python implementation behind a custom operator of one of the package's backends (those
    registered when it is asked: tests add their own), or None for any other operator."""
    for backend in REGISTRY.values():
        if isinstance(backend, FusedBackend):
            operators = backend.operators
            for op in (operators.partials, operators.loss, operators.loss_backward):
                if f"{op._namespace}::{op._name}" == name:
                    return op._init_fn
    return None


class AllocationTracker(TorchDispatchMode):
    """Tracks storages created by operators run inside `with AllocationTracker() as t:`.

    After the block: `t.peak_bytes` (the most bytes live at once), `t.largest_bytes` (the
    largest single storage), `t.largest_shape` (the shape of the tensor that created it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()
        self._counted: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live_bytes -= nbytes

    def _count(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted.add(key)
        weakref.finalize(storage, self._release, key, nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if nbytes > self.largest_bytes:
            self.largest_bytes = nbytes
            self.largest_shape = tuple(tensor.shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        own = implementation(func._schema.name) if func._schema.name.startswith("marginfused::") else None
        if own is not None:
            # the package's own operators: run their implementation here, counting inside them
            with self:
                return own(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        outputs = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(outputs):
            if isinstance(leaf, Tensor) and id(leaf.untyped_storage()) not in inputs:
                self._count(leaf)
        return outputs
