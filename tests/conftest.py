"""Test configuration: GPU-marked tests are skipped, at collection, where no CUDA GPU is present.

Without a CUDA GPU, Triton's interpreter runs the `triton` backend's kernels on CPU tensors:
TRITON_INTERPRET=1 is set here, before any test imports Triton (kernels read it when they are
defined, on first use). An explicit TRITON_INTERPRET in the environment is left alone.

torch.compile's caches go to a fresh directory for each run: a graph cached by an earlier version
of the package's custom operators must not be replayed against the current ones.
"""

import atexit
import os
import shutil
import tempfile

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
