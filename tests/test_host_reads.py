"""After its first call (which may build, compile and choose), a forward and backward of the loss
read no tensor value back to the host and make no pass over the class centres besides the
operators' own: on a GPU, a read-back stalls the stream every step, and a pass over W costs as
much as reading W again. Counted with a TorchFunctionMode around a whole training step: the
operators' own work is one call each, whatever they do inside."""

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import marginfused as mf

from helpers import make_inputs

READS_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}
"""Tensor methods that hand a value to the host."""
ON_W_WITHOUT_A_PASS = {"__get__", "__getitem__", "detach", "dim", "is_floating_point", "unflatten", "size", "stride",
                       "is_contiguous", "__len__", "view", "reshape", "narrow", "t", "embedding", "requires_grad_",
                       "_assert_async"}
"""Functions that may take the whole W without reading all of it: metadata, views, and gathers of
the B target rows (`marginfused.target`)."""


class HostReads(TorchFunctionMode):
    """Records every read-back, and every function that took the whole class centres (C·K·D
    elements) other than a view, metadata or a gather of rows."""

    def __init__(self, weight_elements: int):
        super().__init__()
        self.weight_elements = weight_elements
        self.reads: list[str] = []
        self.weight_passes: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS_BACK:
            self.reads.append(name)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        on_w = any(t.numel() == self.weight_elements for t in tensors)
        if on_w and name not in ON_W_WITHOUT_A_PASS and not name.startswith(("cpu_", "triton_", "cuda_", "torch_")):
            self.weight_passes.append(name)
        return func(*args, **kwargs)


CASES = {
    "arcface": dict(margin="arcface", return_accuracy=True),
    "adaface": dict(margin=mf.AdaFace(), margin_grad="exact"),
    "curricularface": dict(margin=mf.CurricularFace()),
    "filtering": dict(margin="cosface", interclass_filtering=0.3, label_smoothing=0.1),
    "subcentres": dict(margin="arcface", subcenters=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_reads_nothing_back_and_passes_over_w_once(backend, case):
    if backend.name == "torch":
        pytest.skip("the reference materialises B×C logits: it is the truth, not a step to stall nothing")
    options = dict(CASES[case])
    subcenters = options.get("subcenters", 1)
    x, w, y = make_inputs(24, 90 * subcenters, 16, ignored=2, seed=30, device=backend.device)
    y = torch.where(y >= 0, y % 90, y)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()

    def step():
        result = mf.margin_cross_entropy(x, w, y, backend=backend.name, **options)
        loss = result[0] if isinstance(result, tuple) else result
        loss.backward()

    step()  # the first call builds, compiles and chooses
    with HostReads(w.numel()) as recorded:
        step()
    assert recorded.reads == [], f"read back to the host: {recorded.reads}"
    assert recorded.weight_passes == [], f"passes over W besides the operators: {recorded.weight_passes}"
