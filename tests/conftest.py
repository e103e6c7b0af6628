"""Test configuration: GPU-marked tests are skipped, at collection, where no CUDA GPU is present.

Without a CUDA GPU, Triton's interpreter runs the `triton` backend's kernels on CPU tensors:
TRITON_INTERPRET=1 is set here, before any test imports Triton (kernels read it when they are
defined, on first use). An explicit TRITON_INTERPRET in the environment is left alone.

torch.compile's caches go to a fresh directory for each run: a graph cached by an earlier version
of the package's custom operators must not be replayed against the current ones.

The `backend` fixture runs a test once per backend, on the device that backend takes here (the
`cpu` backend on CPU tensors, `cuda` on CUDA tensors, `torch` and `triton` on CUDA tensors where a
GPU is present, else on CPU tensors, triton through its interpreter). A backend that cannot run
here is skipped at run time with its own reason: nothing is built or probed at collection time.
The C++ backends walk the classes in chunks of CONTRACT_CHUNK, so that the small class counts of
the tests span many chunks.
"""

import atexit
import os
import shutil
import tempfile
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="marginfused-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKEND_NAMES = ["torch", "cpu", "cuda", "triton"]
CONTRACT_CHUNK = 100


class BackendUnderTest(NamedTuple):
    name: str
    device: str


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, monkeypatch) -> BackendUnderTest:
    from marginfused.backends import REGISTRY, extension

    name = request.param
    device = {"cpu": "cpu", "cuda": "cuda"}.get(name, "cuda" if torch.cuda.is_available() else "cpu")
    implementation = REGISTRY[name]
    reason = implementation.unavailable_reason() or implementation.unsupported_reason(device, torch.float32)
    if reason:
        pytest.skip(f"{name}: {reason}")
    monkeypatch.setattr(extension, "chunk_size", lambda device, batch, dim, dtype: CONTRACT_CHUNK)
    monkeypatch.setattr(extension, "forward_chunk_size", lambda device, batch, dim, dtype: CONTRACT_CHUNK)
    if name == "triton" and device == "cpu":
        interpret_bfloat16_dots(monkeypatch)
    return BackendUnderTest(name, device)


def interpret_bfloat16_dots(monkeypatch) -> None:
    """Let Triton's interpreter compute bfloat16 dot products, for the tests only.

    The interpreter stores bfloat16 as uint16 and its `tl.dot` multiplies those bit patterns as
    integers (triton issue #11584), which is why the backend refuses bfloat16 under the
    interpreter. Here its dot converts bfloat16 operands to the float32 they stand for (exact: a
    bfloat16 is the top half of a float32) and the backend's refusal is lifted, so the bfloat16
    logic of the kernels is checked against the truth like every other dtype."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    from marginfused.backends import triton as triton_backend

    original_dot = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

    original_reason = triton_backend.TritonBackend.unsupported_reason

    def unsupported_reason(self, device, dtype):
        if dtype == torch.bfloat16 and torch.device(device).type == "cpu":
            return None
        return original_reason(self, device, dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(triton_backend.TritonBackend, "unsupported_reason", unsupported_reason)
