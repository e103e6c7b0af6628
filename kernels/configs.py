"""Launch configurations of the kernels, in one place.

Fixed configurations by default. The GPU ones are first guesses for Hopper-class GPUs and are
still to be measured (see README: GPU checks owed); the interpreter ones are small so that
tests on CPU tensors under TRITON_INTERPRET=1 cross many tile boundaries quickly.

MARGINFUSED_AUTOTUNE=1 (GPU, 16-bit inputs; ignored under the interpreter, which cannot time
kernels) wraps the forward and backward kernels in `triton.autotune` over `AUTOTUNE_*` below, keyed on D
and the batch size rounded up to a power of two (`batch_bucket`). Every kernel writes each of its
outputs once, so a trial launch needs no reset.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    block_b: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    block_g: int = 0
    """The backward kernels' slice of D per program (its gradient accumulator is BLOCK_B × BLOCK_G
    or BLOCK_C × BLOCK_G float32); unused by the other kernels."""


# GPU configurations by target family and input dtype: "16" for float16/bfloat16 (tensor-core
# dots), "32" for float32 (full-precision dots, no tensor cores). "hopper" is sm_90 and sm_100
# (wgmma / tcgen05, up to 227 KB of shared memory per block); "ampere" is every other target
# (mma.sync, 99–163 KB: sm_80, sm_86, sm_89, sm_120), whose register-hungry mma.sync accumulators
# need smaller tiles. Chosen without a GPU, by compiling for every target and reading what
# Triton's cubin uses (`python -m marginfused.kernels.compile_check`): no spills, no stack, shared
# memory within each target's limit, every pipelined ring of dot operands deep enough, in the plain,
# the negatives-rule and the sub-centre variant of each kernel, under every supported Triton
# (3.6 and 3.9: each builds with its own ptxas). ptxas aims at 128 registers per thread when a
# kernel's natural count lies a little above it, and takes a stack frame to get there, so the
# float32 configurations sit well clear of it: 8 warps for the forward's 32 × 32 tiles (69–88
# registers), a BLOCK_D of 16 for Hopper's dW kernel (154–189). The configurations are not timed
# yet: that is a GPU's to measure (`python -m bench`, or bench/gpu_session.sh).
FORWARD_GPU = {
    ("hopper", "16"): Tiles(block_b=128, block_c=64, block_d=64, num_warps=8, num_stages=3),
    ("hopper", "32"): Tiles(block_b=32, block_c=32, block_d=32, num_warps=8, num_stages=2),
    ("ampere", "16"): Tiles(block_b=128, block_c=64, block_d=64, num_warps=8, num_stages=3),
    ("ampere", "32"): Tiles(block_b=32, block_c=64, block_d=16, num_warps=4, num_stages=2),
}
ROW_GRAD_GPU = {
    ("hopper", "16"): Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=256),
    ("hopper", "32"): Tiles(block_b=32, block_c=32, block_d=32, num_warps=4, num_stages=2, block_g=64),
    ("ampere", "16"): Tiles(block_b=64, block_c=32, block_d=64, num_warps=8, num_stages=2, block_g=256),
    ("ampere", "32"): Tiles(block_b=32, block_c=32, block_d=32, num_warps=4, num_stages=2, block_g=64),
}
CLASS_GRAD_GPU = {
    ("hopper", "16"): Tiles(block_b=32, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=256),
    ("hopper", "32"): Tiles(block_b=32, block_c=32, block_d=16, num_warps=4, num_stages=2, block_g=64),
    ("ampere", "16"): Tiles(block_b=32, block_c=64, block_d=64, num_warps=8, num_stages=2, block_g=256),
    ("ampere", "32"): Tiles(block_b=32, block_c=32, block_d=32, num_warps=4, num_stages=2, block_g=64),
}
# With K > 1 sub-centres per class each cosine tile is the largest of K, kept beside the tile being
# computed and the arg-max tile (the backward's): smaller class tiles (or, for Hopper's 16-bit
# embeddings' backward, a narrower slice of D) where the plain configuration would spill (checked
# at K = 3).
FORWARD_SUBCENTRES_GPU = {
    **FORWARD_GPU,
    ("hopper", "16"): Tiles(block_b=128, block_c=32, block_d=64, num_warps=8, num_stages=3),
    ("ampere", "16"): Tiles(block_b=128, block_c=32, block_d=64, num_warps=8, num_stages=3),
    ("ampere", "32"): Tiles(block_b=32, block_c=32, block_d=16, num_warps=8, num_stages=2),
}
ROW_GRAD_SUBCENTRES_GPU = {
    **ROW_GRAD_GPU,
    ("hopper", "16"): Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=128),
    ("ampere", "32"): Tiles(block_b=32, block_c=16, block_d=16, num_warps=4, num_stages=2, block_g=64),
}
CLASS_GRAD_SUBCENTRES_GPU = {
    **CLASS_GRAD_GPU,
    ("ampere", "16"): Tiles(block_b=32, block_c=32, block_d=64, num_warps=8, num_stages=2, block_g=256),
    ("ampere", "32"): Tiles(block_b=32, block_c=16, block_d=16, num_warps=4, num_stages=2, block_g=64),
}
PROJECT_GPU = Tiles(block_b=16, block_c=0, block_d=128, num_warps=4, num_stages=1)

FORWARD_INTERPRET = Tiles(block_b=16, block_c=32, block_d=32, num_warps=1, num_stages=1)
GRAD_INTERPRET = Tiles(block_b=16, block_c=32, block_d=32, num_warps=1, num_stages=1, block_g=32)
"""Both backward kernels under the interpreter: D ≤ 32 is one slice of D per program, larger D
several, so the suite runs both."""
PROJECT_INTERPRET = Tiles(block_b=16, block_c=0, block_d=32, num_warps=1, num_stages=1)

SPLIT_ALIGN_GPU = 256
"""Class splits start at multiples of this (every BLOCK_C of every config divides it), so any
config's tiles line up with the splits and only the last tile of C is partial."""
SPLIT_ALIGN_INTERPRET = 32
MAX_SPLITS = 256
"""Class splits per batch tile on a GPU: as many as fill one wave of programs (`splits_for_one_wave`),
so even one batch tile fills the GPU. They never depend on C; n_splits·B stays about one wave's
programs × BLOCK_B, which bounds the embeddings' backward's (n_splits, B, D) float32 partials
(≈ 35 MB at 132 SMs × 2 programs, BLOCK_B = 64, D = 512) whatever the batch size."""
PROGRAMS_PER_SM = 2
"""Programs per SM assumed where a kernel's own occupancy is not known before its launch (with
autotuning, whose choice of configuration comes with the launch)."""
RESERVED_SHARED_PER_PROGRAM = 1024
"""Shared memory the CUDA runtime reserves for each resident block (sm_80 and later)."""
INTERPRET_SPLITS = 3
"""Class splits under the interpreter: more than one, so the merge of splits is always tested."""

AUTOTUNE_FORWARD = [
    Tiles(128, 64, 64, 8, 3),
    Tiles(64, 128, 64, 8, 3),
    Tiles(128, 128, 64, 8, 4),
    Tiles(128, 64, 64, 8, 4),
    Tiles(64, 64, 64, 4, 3),
]
AUTOTUNE_ROW_GRAD = [
    Tiles(64, 64, 64, 8, 3),
    Tiles(64, 32, 64, 8, 3),
    Tiles(64, 64, 64, 8, 2),
    Tiles(64, 64, 32, 8, 3),
]
AUTOTUNE_CLASS_GRAD = [
    Tiles(32, 64, 64, 8, 3),
    Tiles(64, 64, 64, 8, 3),
    Tiles(32, 64, 64, 8, 2),
    Tiles(32, 64, 32, 8, 3),
]
AUTOTUNE = {"forward": AUTOTUNE_FORWARD, "row_grad": AUTOTUNE_ROW_GRAD, "class_grad": AUTOTUNE_CLASS_GRAD}
"""Autotuning candidates by kernel (16-bit inputs; float32 inputs keep their fixed configs). The
backward's slice of D, BLOCK_G, is not tuned: it stays the fixed configuration's, which the host
needs to know."""


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, regs_per_sm: int,
                    shared_per_sm: int, threads_per_sm: int) -> int:
    """How many programs of a compiled kernel one SM holds at once: the fewest its registers
    (allocated per warp in units of 256, so 8 per thread), its shared memory (plus the runtime's
    reserve per block) and its threads allow; at least 1."""
    threads = 32 * num_warps
    per_thread = -(-max(registers, 1) // 8) * 8
    return max(1, min(regs_per_sm // (per_thread * threads),
                      shared_per_sm // (shared_bytes + RESERVED_SHARED_PER_PROGRAM),
                      threads_per_sm // threads))


def splits_for_one_wave(programs_per_wave: int, programs_per_split: int) -> int:
    """Class splits such that programs_per_split × splits programs fill at most one wave (every
    program holds the same amount of work, so a second, partial wave would double the time for a
    few programs): ⌊wave / programs per split⌋, within [1, MAX_SPLITS]."""
    return max(1, min(MAX_SPLITS, programs_per_wave // programs_per_split))


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _width(dtype) -> str:
    return "32" if str(dtype) == "torch.float32" else "16"


def family(arch: int) -> str:
    """The configuration family of a target (compute capability as 90 for sm_90)."""
    return "hopper" if arch in (90, 100, 103) else "ampere"


GPU_TABLES = {
    "forward": (FORWARD_GPU, FORWARD_SUBCENTRES_GPU),
    "row_grad": (ROW_GRAD_GPU, ROW_GRAD_SUBCENTRES_GPU),
    "class_grad": (CLASS_GRAD_GPU, CLASS_GRAD_SUBCENTRES_GPU),
}
"""Each kernel's GPU configurations: (one row per class, sub-centres)."""


def gpu_tiles(kernel: str, arch: int, width: str, subcenters: int = 1) -> Tiles:
    """The GPU configuration of the "forward", "row_grad" or "class_grad" kernel for sm_`arch`,
    inputs of `width` ("16" or "32" bits) and `subcenters` rows of W per class."""
    return GPU_TABLES[kernel][subcenters > 1][family(arch), width]


def forward_tiles(dtype, arch: int, subcenters: int = 1) -> Tiles:
    return FORWARD_INTERPRET if interpreting() else gpu_tiles("forward", arch, _width(dtype), subcenters)


def row_grad_tiles(dtype, arch: int, subcenters: int = 1) -> Tiles:
    return GRAD_INTERPRET if interpreting() else gpu_tiles("row_grad", arch, _width(dtype), subcenters)


def class_grad_tiles(dtype, arch: int, subcenters: int = 1) -> Tiles:
    return GRAD_INTERPRET if interpreting() else gpu_tiles("class_grad", arch, _width(dtype), subcenters)


def project_tiles() -> Tiles:
    return PROJECT_INTERPRET if interpreting() else PROJECT_GPU


def autotuning(dtype=None, subcenters: int = 1) -> bool:
    """True when MARGINFUSED_AUTOTUNE=1 asks for autotuning, kernels run on a GPU, and the inputs
    are 16-bit (the candidates are 16-bit configurations) with one row per class (the candidates
    are not checked with sub-centres)."""
    asked = os.environ.get("MARGINFUSED_AUTOTUNE", "0") not in ("", "0")
    return asked and not interpreting() and _width(dtype) == "16" and subcenters == 1


def split_align() -> int:
    return SPLIT_ALIGN_INTERPRET if interpreting() else SPLIT_ALIGN_GPU


def _triton_configs(choices):
    import triton

    return [
        triton.Config(
            {"BLOCK_B": t.block_b, "BLOCK_C": t.block_c, "BLOCK_D": t.block_d},
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        for t in choices
    ]


@functools.lru_cache(maxsize=None)
def autotuned(kernel: str):
    """The "forward", "row_grad" or "class_grad" kernel wrapped in triton.autotune (built on first
    use), keyed on D and the batch bucket."""
    import triton

    from . import backward, forward

    fn = {"forward": forward.row_partials_kernel, "row_grad": backward.row_grad_kernel,
          "class_grad": backward.class_grad_kernel}[kernel]
    return triton.autotune(configs=_triton_configs(AUTOTUNE[kernel]), key=["D", "batch_bucket"])(fn)
