"""Launch configurations of the kernels, in one place.

Fixed configurations, chosen without a GPU by compiling every kernel for every target and reading
what Triton built (`python -m marginfused.kernels.compile_check`): no spills, no stack, shared
memory within each target's limit, every pipelined ring of dot operands as deep as its loop needs,
in the plain, the negatives-rule and the sub-centre variant of each kernel, under every supported
Triton (3.6 and 3.9: each builds with its own ptxas); on Hopper, of the clean ones compiled, the
ones bench/model predicts faster (to D = 512 the resident tiles below: 18.4 against 39.1 ms streamed,
PREDICTED at B = 1024, C = 1M, bf16, H100). A warpgroup's wgmma N is BLOCK_C for the forward's cosines, BLOCK_B for the dW
kernel's, BLOCK_G for both gradient dots (four warps per 64 rows of M, at most 256): with the
operand resident the gradient dots are m64n256 and the cosines m64n32 (below); streamed, m64n128
and m64n64; the sub-centre variant takes m64n32. They are not timed yet: that is a GPU's to measure (`python -m bench`, or bench/gpu_session.sh). The
interpreter ones are small, so that tests on CPU tensors under TRITON_INTERPRET=1 cross many tile
boundaries quickly, and switch between the ways of taking D at small D, so that the tests run all
of them.

A configuration serves the D up to its `max_dim` (None: any D). The forward and dW kernels keep
their own operand resident (kernels/tiles.py) in `parts` parts of `block_g` columns while
D ≤ parts·block_g; a one-part configuration narrows block_g to D's power of two (at least 16) for
smaller D, so the compile check's build at the largest D is the costliest of what it serves. At
larger D they stream D in `block_d` chunks (parts = 0), in slices of `block_g` columns.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Tiles:
    block_b: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    block_g: int = 0
    """The slice of D a program owns (its gradient accumulator is BLOCK_B × BLOCK_G or BLOCK_C ×
    BLOCK_G float32), and the width of a resident part."""
    parts: int = 0
    """Resident parts of block_g columns (1 or 2), or 0: D streamed in block_d chunks."""
    max_dim: Optional[int] = None
    """The largest D this configuration serves (None: any)."""

    def slices(self, dim: int) -> int:
        """Slices of D (programs along D, over all launches): one per block_g columns, so one per
        part of a resident configuration (D ≤ parts·block_g)."""
        return -(-dim // self.block_g)

    def launches(self, slices: int) -> tuple[int, ...]:
        """The part each launch owns (the kernels' OWN) over `slices` slices of D: one launch per
        slice with two resident parts, so that each slice is compiled with its part as a constant
        (tiles.pair_dot), else one launch of every slice (OWN unused)."""
        return tuple(range(slices)) if self.parts == 2 else (0,)

    def for_dim(self, dim: int) -> "Tiles":
        """This configuration at D = dim: a one-part configuration's block_g narrowed to D's power of
        two (at least 16)."""
        if self.parts != 1:
            return self
        return dataclasses.replace(self, block_g=min(self.block_g, max(16, 1 << (dim - 1).bit_length())))


# GPU configurations by target family and input dtype: "16" for float16/bfloat16 (tensor-core
# dots), "32" for float32 (full-precision dots, no tensor cores). "hopper" is sm_90 (wgmma, up to
# 227 KB of shared memory per block); "ampere" is every other target (mma.sync, 99–163 KB: sm_80,
# sm_86, sm_89, sm_120); "blackwell" (sm_100, sm_103: tcgen05) is below. Each entry: the
# configurations by the D they serve, smallest first; one table per variant (plain, the negatives rule, sub-centres), since the
# rule's slopes and the K cosine tiles of sub-centres hold more registers beside the accumulator.
# On Hopper the 16-bit kernels keep their own operand resident up to D = 512, in two slices of 256
# columns (one part each, kernels/tiles.py): the forward a 128-row batch tile of x (128 KB of shared
# memory at D = 512) against class tiles of 32, the dW kernel a 128-row class tile of W against batch
# tiles of 32; each keeps a 128 × 256 float32 accumulator over eight warps (two warpgroups of m64:
# m64n32 for the cosines, m64n256 for O and dŴ). That is 6·B·C·D per kernel at D = 512, each operand
# read from L2 once per slice and tile of the other. A streamed tile of 64 rows (wgmma N = 64 for the
# cosines) does not fit: two buffers of it beside the resident tile pass the 227 KB of shared memory,
# and it spills beside the accumulator. Past D = 512 they stream D in chunks of 64, O and dŴ in slices of 128 (a
# 128 × 256 O beside the softmax tile spills when D streams). Float32 and Ampere stream D.
_FORWARD_STREAMED_HOPPER = Tiles(block_b=128, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=128)
_WEIGHT_GRAD_STREAMED_HOPPER = Tiles(block_b=64, block_c=128, block_d=64, num_warps=8, num_stages=3, block_g=128)
_FORWARD_RESIDENT_HOPPER = tuple(
    Tiles(block_b=128, block_c=32, block_d=64, num_warps=8, num_stages=3, block_g=256, parts=parts,
          max_dim=256 * parts) for parts in (1, 2))
_WEIGHT_GRAD_RESIDENT_HOPPER = tuple(
    Tiles(block_b=32, block_c=128, block_d=64, num_warps=8, num_stages=3, block_g=256, parts=parts,
          max_dim=256 * parts) for parts in (1, 2))
FORWARD_GPU = {
    ("hopper", "16"): _FORWARD_RESIDENT_HOPPER + (_FORWARD_STREAMED_HOPPER,),
    ("hopper", "32"): (Tiles(block_b=32, block_c=32, block_d=32, num_warps=8, num_stages=2, block_g=64),),
    ("ampere", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=2, block_g=128),),
    # eight warps: four leave an 8-byte stack in the pass without O on sm_120 under Triton 3.6
    ("ampere", "32"): (Tiles(block_b=32, block_c=32, block_d=16, num_warps=8, num_stages=2, block_g=64),),
}
WEIGHT_GRAD_GPU = {
    ("hopper", "16"): _WEIGHT_GRAD_RESIDENT_HOPPER + (_WEIGHT_GRAD_STREAMED_HOPPER,),
    ("hopper", "32"): (Tiles(block_b=32, block_c=32, block_d=16, num_warps=4, num_stages=2, block_g=64),),
    ("ampere", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=2, block_g=128),),
    ("ampere", "32"): (Tiles(block_b=32, block_c=32, block_d=32, num_warps=4, num_stages=2, block_g=64),),
}
# The negatives rule on Hopper: the same resident tiles, streamed D in slices of 64 past D = 512 (the
# slopes' tile beside a 128 × 128 O spills).
FORWARD_RULE_GPU = {
    **FORWARD_GPU,
    ("hopper", "16"): _FORWARD_RESIDENT_HOPPER + (
        Tiles(block_b=128, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=64),),
    # four warps: eight leave an 8-byte stack in the smoothing pass on sm_86, sm_89 and sm_120
    ("ampere", "32"): (Tiles(block_b=32, block_c=32, block_d=16, num_warps=4, num_stages=2, block_g=64),),
}
WEIGHT_GRAD_RULE_GPU = {
    **WEIGHT_GRAD_GPU,
    ("hopper", "16"): _WEIGHT_GRAD_RESIDENT_HOPPER + (
        Tiles(block_b=64, block_c=128, block_d=64, num_warps=8, num_stages=3, block_g=64),),
}
# With K > 1 sub-centres per class each cosine tile is the largest of K, kept beside the tile being
# computed and the arg-max tile: on Hopper 64 × 64 tiles over eight warps, slices of 64 (wgmma
# m64n32: the 128-row tiles of N ≥ 64 spill beside K cosine tiles); float32's dW
# over eight warps (four leave a 16-byte stack under Triton 3.6). Checked at K = 3; a call with both
# a rule and sub-centres takes these.
FORWARD_SUBCENTRES_GPU = {
    **FORWARD_GPU,
    ("hopper", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=64),),
    ("ampere", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=2, block_g=64),),
}
WEIGHT_GRAD_SUBCENTRES_GPU = {
    ("hopper", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=64),),
    ("hopper", "32"): (Tiles(block_b=32, block_c=32, block_d=16, num_warps=8, num_stages=2, block_g=64),),
    ("ampere", "16"): (Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=2, block_g=64),),
    ("ampere", "32"): (Tiles(block_b=32, block_c=32, block_d=16, num_warps=8, num_stages=2, block_g=64),),
}
# "blackwell" (sm_100, sm_103: tcgen05) takes Hopper's configurations but where they spill there:
# the 16-bit resident tiles (the forward streams D as Hopper does past D = 512), and the 16-bit dW
# kernel's 128-class tile (64 × 64 over eight warps, slices of 64).
for _table in (FORWARD_GPU, FORWARD_RULE_GPU, FORWARD_SUBCENTRES_GPU, WEIGHT_GRAD_GPU, WEIGHT_GRAD_RULE_GPU,
               WEIGHT_GRAD_SUBCENTRES_GPU):
    _table.update({("blackwell", width_): _table[("hopper", width_)] for width_ in ("16", "32")})
    _table[("blackwell", "16")] = tuple(t for t in _table[("blackwell", "16")] if not t.parts)
WEIGHT_GRAD_GPU[("blackwell", "16")] = WEIGHT_GRAD_RULE_GPU[("blackwell", "16")] = (
    Tiles(block_b=64, block_c=64, block_d=64, num_warps=8, num_stages=3, block_g=64),)
# and its float32 forward with sub-centres in chunks of 16 (of 32 it leaves an 8-byte stack under
# Triton 3.6)
FORWARD_SUBCENTRES_GPU[("blackwell", "32")] = (
    Tiles(block_b=32, block_c=32, block_d=16, num_warps=8, num_stages=2, block_g=64),)
NORMS_GPU = Tiles(block_b=16, block_c=0, block_d=128, num_warps=4, num_stages=1)

KERNELS_INTERPRET = (
    Tiles(block_b=16, block_c=32, block_d=0, num_warps=1, num_stages=1, block_g=32, parts=1, max_dim=32),
    Tiles(block_b=16, block_c=32, block_d=0, num_warps=1, num_stages=1, block_g=32, parts=2, max_dim=64),
    Tiles(block_b=16, block_c=32, block_d=32, num_warps=1, num_stages=1, block_g=32),
)
"""Both kernels under the interpreter: resident in one part up to D = 32, in two up to 64, streamed
beyond (in slices of 32): the suite's shapes run all three."""
SUBCENTRES_INTERPRET = (KERNELS_INTERPRET[-1],)
"""Both kernels with sub-centres stream D (as on a GPU)."""
NORMS_INTERPRET = Tiles(block_b=16, block_c=0, block_d=32, num_warps=1, num_stages=1)

SPLIT_ALIGN_GPU = 256
"""Class splits start at multiples of this (every BLOCK_C of every config divides it), so any
config's tiles line up with the splits and only the last tile of C is partial."""
SPLIT_ALIGN_INTERPRET = 32
MAX_SPLITS = 256
"""Class splits per batch tile on a GPU: as many as fill one wave of programs (`splits_for_one_wave`),
so even one batch tile fills the GPU. They never depend on C; n_splits·B stays about one wave's
programs × BLOCK_B / the slices a launch holds, which bounds the forward's (n_splits, B, D) float32
weighted centres whatever the batch size (by arithmetic, 132 SMs × 1 program × BLOCK_B = 128 ×
D = 512 × 4 bytes ≈ 35 MB for Hopper's resident tiles, one slice per launch)."""
RESERVED_SHARED_PER_PROGRAM = 1024
"""Shared memory the CUDA runtime reserves for each resident block (sm_80 and later)."""
INTERPRET_SPLITS = 3
"""Class splits under the interpreter: more than one, so the merge of splits is always tested."""


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


def width(dtype) -> str:
    """The configuration width of an input dtype: "32" for float32, "16" for 16-bit floats."""
    return "32" if str(dtype) == "torch.float32" else "16"


def family(arch: int) -> str:
    """The configuration family of a target (compute capability as 90 for sm_90)."""
    return "hopper" if arch == 90 else "blackwell" if arch in (100, 103) else "ampere"


GPU_TABLES = {
    "forward": {"plain": FORWARD_GPU, "rule": FORWARD_RULE_GPU, "subcentres": FORWARD_SUBCENTRES_GPU},
    "weight_grad": {"plain": WEIGHT_GRAD_GPU, "rule": WEIGHT_GRAD_RULE_GPU, "subcentres": WEIGHT_GRAD_SUBCENTRES_GPU},
}
"""Each kernel's GPU configurations by variant."""


def variant(subcenters: int = 1, rule: bool = False) -> str:
    """The configuration variant of a call: "subcentres" (K > 1, with or without a rule), "rule" or
    "plain"."""
    return "subcentres" if subcenters > 1 else "rule" if rule else "plain"


def gpu_choices(kernel: str, arch: int, width_: str, subcenters: int = 1, rule: bool = False) -> tuple[Tiles, ...]:
    """The GPU configurations of the "forward" or "weight_grad" kernel for sm_`arch`, inputs of
    `width_` ("16" or "32" bits), `subcenters` rows of W per class and a negatives rule or none, by
    the D they serve."""
    return GPU_TABLES[kernel][variant(subcenters, rule)][family(arch), width_]


def serving(choices: tuple[Tiles, ...], dim: int) -> Tiles:
    """The first configuration that serves D = dim, as the compile check builds it (not yet fitted to
    D: `Tiles.for_dim`)."""
    return next(t for t in choices if t.max_dim is None or dim <= t.max_dim)


def tiles(kernel: str, dtype, arch: int, dim: int, subcenters: int = 1, rule: bool = False) -> Tiles:
    """The configuration of the "forward" or "weight_grad" kernel at D = dim."""
    if interpreting():
        choices = SUBCENTRES_INTERPRET if subcenters > 1 else KERNELS_INTERPRET
    else:
        choices = gpu_choices(kernel, arch, width(dtype), subcenters, rule)
    return serving(choices, dim).for_dim(dim)


def norms_tiles() -> Tiles:
    return NORMS_INTERPRET if interpreting() else NORMS_GPU


def split_align() -> int:
    return SPLIT_ALIGN_INTERPRET if interpreting() else SPLIT_ALIGN_GPU
