"""The performance model as code: what each kernel of the fused backends computes, moves and issues,
and the time that predicts on a given GPU. Every figure here is a PREDICTION from published
figures and counted work, never a measurement; `python -m bench` and bench/gpu_session.sh measure.

    python -m bench.model [--gpu H100] [--batch 1024] [--dim 512] [--classes 100000 1000000 4000000] [--dtype bf16]
    python -m bench.model --from-sass     # recompile the kernels and rewrite bench/sass_counts.json

What is counted, per kernel, from the code (docs/design.md §5):
- FLOPs: every dot of every program iteration, 2·M·N·K.
- HBM bytes: what must leave or enter device memory: W once per pass where the programs sharing
  a W tile run in the same wave (L2 serves the rest), the outputs once, and B×chunk tiles of the
  `cuda` backend only where its chunk's working set outgrows L2.
- L2 bytes: each program's operand reads, tile by tile, as the code loads them (a tile resident in
  shared memory is read once per program; a streamed one once per iteration).
- Instructions issued (the Triton kernels): per warp per iteration of the kernel's main loop, read
  from its SASS (bench/sass.py; cached in bench/sass_counts.json, a read of compiled code).
- Launches (the `cuda` backend): per chunk, each kernel and GEMM.

A kernel's time is the largest of its terms, plus its launch gaps:
- FLOP: its dots on the tensor cores at MATMUL_EFFICIENCY of peak and at the efficiency its wgmma
  shape allows (`wgmma_efficiency`), whole waves of programs (the busiest SM's share);
- HBM and L2: bytes over bandwidth;
- issue: instructions over 4 warp schedulers × 1 instruction per cycle × SMs × the boost clock;
- serial (Triton kernels at one program per SM): the phases of a loop iteration one after another,
  each the larger of its tensor-core time and its issue time. A program's softmax or gradient
  epilogue needs its cosine MMAs' result, and its gradient MMA needs the epilogue's tile; with one
  program per SM (the accumulators take more than half the registers) no other program's MMAs fill
  the tensor cores meanwhile, and Triton does not overlap one program's warpgroups (no ping-pong);
- the `cuda` backend, as a whole, takes at least its launches' host time where no CUDA graph holds
  its chunk loop.

Which kernels: `triton` is the flash-attention structure of kernels/ (K = V = W): a fused forward +
dX kernel (a batch tile against streamed W tiles, online softmax, O += P̃·W in D slices; with
kernels/configs.py's tiles D is streamed too, so the x tile is read again with every W tile), a dW
kernel (a class tile of W against streamed x tiles, cosines recomputed from the saved log-sum-exp)
and one norms pre-pass, their issue counts from their own SASS (FLASH_LANDED; before the kernels
landed they were PROXIES scaled from the kernels of the time). `cuda-as-built` is csrc/cuda.cu as it
is (each pass its chunk, `cuda_forward_chunk_classes` and `cuda_chunk_classes`, the dX GEMM split
over its depth, bfloat16 S and gradient tiles for bfloat16 inputs, the norms of x and W once, in the
forward, kept for the backward, 2 launches per chunk forward and 5 backward, no CUDA graph); `cuda`
is the chunked backend as it will be tuned beyond that (16-bit S for float16 too, the chunk loop in
a CUDA graph).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import Optional

from marginfused.backends.chunks import GpuShape, cuda_chunk_classes, cuda_dx_splits, cuda_forward_chunk_classes
from marginfused.kernels import configs

from . import sass


@dataclass(frozen=True)
class Gpu:
    """Published figures of a GPU (dense tensor-core rates at the boost clock)."""

    name: str
    arch: int  # compute capability, 90 for sm_90
    bf16_tflops: float
    fp32_tflops: float  # without tensor cores
    hbm_tbps: float
    l2_tbps: float  # L2 read bandwidth: published microbenchmark figures (see GPUS), not the datasheet
    l2_mb: float  # MiB
    sms: int
    clock_ghz: float  # the boost clock at which bf16_tflops is quoted
    shared_per_sm: int  # bytes
    shared_per_block: int  # bytes, the opt-in limit
    registers_per_sm: int = 65536
    schedulers: int = 4  # warp schedulers per SM, each issuing one instruction per cycle
    shared_bytes_per_clock: int = 128  # per SM: 32 banks of 4 bytes

    @property
    def tensor_flops_per_clock(self) -> float:
        """Dense 16-bit tensor-core FLOPs per cycle per SM: 4096 on Hopper (989 TFLOP/s over 132 SMs
        at 1.83 GHz), 2048 on Ampere (312 over 108 at 1.41)."""
        return self.bf16_tflops * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def l2_bytes(self) -> int:
        return int(self.l2_mb * 2**20)


GPUS = {
    # H100 SXM5: NVIDIA's datasheet (989 dense bf16 TFLOP/s, 3.35 TB/s HBM3, 50 MB L2, 132 SMs) at
    # the 1.83 GHz boost clock its whitepaper computes the peak with. L2: published microbenchmark
    # figures for H100 L2 read bandwidth are 5.5–7 TB/s (Chips and Cheese's H100 article, 2023; the
    # Hopper microbenchmark papers, arXiv 2402.13499 and 2501.12084); the low end is taken until
    # bench/gpu_session.sh's L2 probe measures it.
    "H100": Gpu("H100 SXM", 90, 989.0, 67.0, 3.35, 5.5, 50.0, 132, 1.83, 233472, 232448),
    # H200 SXM: the H100's die, clocks and L2 with 4.8 TB/s of HBM3e (datasheet).
    "H200": Gpu("H200 SXM", 90, 989.0, 67.0, 4.8, 5.5, 50.0, 132, 1.83, 233472, 232448),
    # A100 SXM4 80GB: datasheet (312 bf16 TFLOP/s, 2.04 TB/s, 40 MB L2, 108 SMs, 1.41 GHz). L2: the
    # whitepaper's 5120 bytes per clock (7.2 TB/s) scaled by the low end of H100's measured/theoretical
    # ratio (5.5 of 9.0 TB/s): 4.4 TB/s, an assumption no published A100 figure here confirms.
    "A100": Gpu("A100 SXM 80GB", 80, 312.0, 19.5, 2.04, 4.4, 40.0, 108, 1.41, 167936, 166912),
}


def gpu_named(device_name: str) -> Optional[str]:
    """The key in GPUS of the GPU whose name `device_name` contains ("NVIDIA H100 80GB HBM3" is
    "H100"), or None."""
    return next((key for key in GPUS if key in device_name), None)


MATMUL_EFFICIENCY = 0.8
"""Fraction of the datasheet matmul rate a large GEMM reaches (790 of 989 TFLOP/s measured on an
H200 for bf16, docs/design.md §5): applied to every tensor-core time (it covers clocks under the
boost clock under load). bench/gpu_session.sh measures it."""
LAUNCH_GAP_S = 2e-6
"""Device time between two dependent kernels of one stream or CUDA graph: the upper end of the
1–2 µs usually quoted for a kernel node in a graph (assumed)."""
HOST_LAUNCH_S = 5e-6
"""Host time per kernel launched without a CUDA graph (ATen dispatch and the launch itself): the
~5 µs usually quoted (assumed). A chunk loop of short kernels cannot run faster than its launches."""
ELEMENTWISE_INSTRUCTIONS = 24
"""Instructions per element of the `cuda` backend's row pass and gradient tile (one thread per
element, 16-byte loads, float32 math): assumed (the Triton forward's softmax epilogue reads 37 per
element in its SASS, argmax and 64-bit compares included); a SASS read of the tuned kernels replaces it."""
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GEMM_TILE = 128
"""A cuBLAS GEMM's output tile, rows and columns, for its utilisation of the SMs."""

FLASH_LANDED = True
"""True: kernels/ holds the flash kernels, whose counts, tiles and programs per SM are their own, as
compiled (re-read them with `python -m bench.model --from-sass`). False: the `triton` rows use PROXY
issue counts scaled from SASS_SOURCES' kernels (their D loop per step of BLOCK_D, their epilogue per
cosine element) and the tiles FLASH_TILES."""

SASS_SOURCES = {
    # model kernel → the compile-check kernel (kernels/compile_check.py's label less its dtype) whose
    # compiled code gives its counts; its configuration is kernels/configs.py's, recorded with them.
    # The flash kernels as kernels/configs.py configures them for Hopper's and Ampere's 16-bit inputs
    # (the same label on both: D streamed in chunks of 64, slices of 128).
    "forward+dX": "forward streamed 64/128",
    "dW": "dW streamed 64/128",
}

FLASH_TILES = {
    # model kernel → (resident rows, streamed rows per iteration, D slice of the accumulator, warps):
    # kernels/configs.py's Hopper 16-bit tiles (the forward's batch and class tiles, the dW kernel's
    # class and batch tiles).
    "forward+dX": (configs.FORWARD_GPU["hopper", "16"][0].block_b, configs.FORWARD_GPU["hopper", "16"][0].block_c,
                   configs.FORWARD_GPU["hopper", "16"][0].block_g, configs.FORWARD_GPU["hopper", "16"][0].num_warps),
    "dW": (configs.WEIGHT_GRAD_GPU["hopper", "16"][0].block_c, configs.WEIGHT_GRAD_GPU["hopper", "16"][0].block_b,
           configs.WEIGHT_GRAD_GPU["hopper", "16"][0].block_g, configs.WEIGHT_GRAD_GPU["hopper", "16"][0].num_warps),
}
FLASH_PROGRAMS_PER_SM = 1
"""The flash kernels run one program per SM: the 128 × 256 float32 accumulator alone is 128 registers
per thread of 8 warps, so two programs cannot share an SM's 64K registers."""


def streams_d(gpu: Gpu, counts: dict, kernel: str) -> bool:
    """Whether a flash kernel streams D (its resident operand re-read with every tile of the other,
    kernels/tiles.py) rather than keeping its tile resident: its compiled configuration's, once the
    kernels land (parts = 0)."""
    return FLASH_LANDED and sass_record(counts, gpu, kernel)["config"].get("parts", 1) == 0


def flash_tiles(gpu: Gpu, counts: dict, kernel: str) -> tuple[int, int, int, int, int]:
    """(resident rows, streamed rows, D slice, warps, programs per SM) of a flash kernel: FLASH_TILES
    until the kernels land, then their compiled configuration (the forward's batch tile BLOCK_B and
    class tile BLOCK_C; the dW kernel's class tile BLOCK_C and batch tile BLOCK_B)."""
    if not FLASH_LANDED:
        return (*FLASH_TILES[kernel], FLASH_PROGRAMS_PER_SM)
    record = sass_record(counts, gpu, kernel)
    config = record["config"]
    resident, streamed = ("block_b", "block_c") if kernel == "forward+dX" else ("block_c", "block_b")
    return (config[resident], config[streamed], config["block_g"], config["num_warps"],
            programs_per_sm(gpu, record))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Tensor cores: the shape of a dot and what it reaches


@dataclass(frozen=True)
class Dot:
    """One program's dot per loop iteration: (m × k) · (k × n), A from shared memory or registers."""

    m: int
    n: int
    k: int
    a_shared: bool

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


def wgmma_n(dot: Dot, num_warps: int) -> int:
    """N of the m64nNk16 wgmma a Hopper dot compiles to: Triton gives its warpgroups 64-row slabs of
    M first, then splits N among them (the forward's 128 × 64 cosines with 2 warpgroups: m64n64;
    a 64 × 32 tile over four warps: m64n32)."""
    groups = max(1, num_warps // 4)
    along_m = max(1, min(groups, dot.m // 64))
    return min(256, max(8, dot.n // (groups // along_m)))


def wgmma_efficiency(gpu: Gpu, n: int, a_shared: bool, element_bytes: int = 2) -> float:
    """The fraction of the tensor cores' rate an m64nNk16 wgmma reaches when its operands come from
    shared memory at the SM's 128 bytes per cycle (assumed to bound wgmma's operand fetch as it bounds
    every shared-memory read): A (64 × 16) is re-read by every wgmma when in shared memory, B
    (N × 16) always. bf16 on an H100: m64n16 SS 40%, m64n32 SS 67%, m64n64 and wider 100%; a dot
    whose A comes from registers (RS) reaches 100% from N = 16."""
    compute = 2 * 64 * n * 16 / gpu.tensor_flops_per_clock
    operands = ((64 * 16 if a_shared else 0) + n * 16) * element_bytes / gpu.shared_bytes_per_clock
    return min(1.0, compute / operands)


def dot_cycles(gpu: Gpu, dot: Dot, num_warps: int, element_bytes: int) -> float:
    """Cycles of an SM's tensor cores for one dot at full rate and its shape's efficiency (Ampere's
    mma.sync takes its operands from registers: the shared-memory reads are instructions, counted
    in the issue term)."""
    cycles = dot.flops / gpu.tensor_flops_per_clock
    if gpu.arch >= 90 and element_bytes == 2:
        cycles /= wgmma_efficiency(gpu, wgmma_n(dot, num_warps), dot.a_shared, element_bytes)
    return cycles


def shape_label(gpu: Gpu, dot: Dot, num_warps: int, element_bytes: int) -> str:
    if element_bytes != 2:
        return "fp32 FMA"
    if gpu.arch < 90:
        return "mma.sync m16n8k16"
    n = wgmma_n(dot, num_warps)
    efficiency = wgmma_efficiency(gpu, n, dot.a_shared, element_bytes)
    return f"m64n{n}k16 {'SS' if dot.a_shared else 'RS'} {efficiency:.0%}"


# ---------------------------------------------------------------------------------------------
# Kernels and their terms


@dataclass
class Kernel:
    """One kernel's counted work and the terms of its predicted time on a GPU (seconds)."""

    backend: str
    name: str
    flops: float
    hbm_bytes: float
    l2_bytes: float
    flop_s: float
    hbm_s: float
    l2_s: float
    issue_s: Optional[float] = None  # None: not counted (no SASS read)
    serial_s: Optional[float] = None  # None: its phases overlap, or it has none
    launches: int = 1
    launch_s: float = 0.0
    shapes: str = ""
    counts: str = ""  # where its instruction counts come from

    def terms(self) -> dict[str, float]:
        """The terms whose largest is the kernel's time (the launch gaps add to it)."""
        out = {"FLOP": self.flop_s, "HBM": self.hbm_s, "L2": self.l2_s}
        if self.issue_s is not None:
            out["issue"] = self.issue_s
        if self.serial_s is not None:
            out["serial"] = self.serial_s
        return out

    @property
    def binds(self) -> str:
        terms = self.terms()
        return max(terms, key=terms.get)

    @property
    def seconds(self) -> float:
        return max(self.terms().values()) + self.launch_s


def _bytes_terms(gpu: Gpu, hbm_bytes: float, l2_bytes: float) -> tuple[float, float]:
    return hbm_bytes / (gpu.hbm_tbps * 1e12), l2_bytes / (gpu.l2_tbps * 1e12)


def memory_kernel(gpu: Gpu, backend: str, name: str, hbm_bytes: float, l2_bytes: float = 0.0,
                  launches: int = 1, issue_instructions: Optional[float] = None) -> Kernel:
    """A kernel without dots: bytes (and, where counted, warp instructions) only."""
    hbm_s, l2_s = _bytes_terms(gpu, hbm_bytes, l2_bytes)
    issue_s = None
    if issue_instructions is not None:
        issue_s = issue_instructions / (gpu.schedulers * gpu.sms * gpu.clock_ghz * 1e9)
    return Kernel(backend, name, 0.0, hbm_bytes, l2_bytes, 0.0, hbm_s, l2_s, issue_s, None, launches,
                  launches * LAUNCH_GAP_S)


@dataclass(frozen=True)
class Phase:
    """One step of a program's loop iteration: its dots, and the instructions each warp issues for it."""

    name: str
    dots: tuple[Dot, ...] = ()
    instructions: float = 0.0


@dataclass(frozen=True)
class Grid:
    """A Triton kernel's launch: programs, loop iterations per program, warps, programs per SM."""

    programs: int
    iterations: int
    num_warps: int
    per_sm: int


def program_kernel(gpu: Gpu, backend: str, name: str, element_bytes: int, grid: Grid, phases: list[Phase],
                   flops: float, hbm_bytes: float, l2_bytes: float, counts: str) -> Kernel:
    """A Triton kernel from its grid and the phases of one loop iteration: the busiest SM runs
    ⌈programs / (SMs × programs per SM)⌉ waves of iterations. `flops` is the kernel's exact count
    (edge tiles partial); the tensor time follows the full tiles the phases describe."""
    clock = gpu.clock_ghz * 1e9
    waves = cdiv(grid.programs, gpu.sms * grid.per_sm)
    iterations = waves * grid.per_sm * grid.iterations  # on the busiest SM
    tensor = [sum(dot_cycles(gpu, dot, grid.num_warps, element_bytes) for dot in phase.dots) / MATMUL_EFFICIENCY
              for phase in phases]
    issue = [grid.num_warps * phase.instructions / gpu.schedulers for phase in phases]
    if grid.per_sm == 1:
        serial = sum(max(t, i) for t, i in zip(tensor, issue))
    else:
        serial = max(sum(tensor), sum(issue))
    hbm_s, l2_s = _bytes_terms(gpu, hbm_bytes, l2_bytes)
    shapes = ", ".join(dict.fromkeys(shape_label(gpu, dot, grid.num_warps, element_bytes)
                                     for phase in phases for dot in phase.dots))
    return Kernel(backend, name, flops, hbm_bytes, l2_bytes, iterations * sum(tensor) / clock, hbm_s, l2_s,
                  iterations * sum(issue) / clock, iterations * serial / clock, 1, LAUNCH_GAP_S, shapes, counts)


# ---------------------------------------------------------------------------------------------
# Instruction counts from the SASS (bench/sass_counts.json)


def sass_arch(gpu: Gpu) -> str:
    return "sm_90" if gpu.arch >= 90 else "sm_80"


def sass_record(counts: dict, gpu: Gpu, kernel: str) -> dict:
    """The cached read of a model kernel's compile-check kernel for this GPU's target."""
    name = SASS_SOURCES[kernel]
    try:
        return counts["kernels"][sass_arch(gpu)][name]
    except KeyError:
        raise KeyError(f"bench/sass_counts.json has no {sass_arch(gpu)} counts of '{name}': "
                       f"run python -m bench.model --from-sass") from None


def mma_instructions(mma: dict) -> int:
    """Matrix instructions each warp issues for `mma` ({"m64n64k16 SS": 4}: every warp of a warpgroup
    issues its wgmma)."""
    return sum(mma.values())


def dot_instructions(gpu: Gpu, dot: Dot, num_warps: int, element_bytes: int = 2) -> float:
    """Matrix instructions each warp issues for a dot: wgmma m64nNk16 per warpgroup (Hopper), mma.sync
    m16n8k16 per warp (Ampere)."""
    if gpu.arch >= 90 and element_bytes == 2:
        return dot.flops / (2 * 64 * wgmma_n(dot, num_warps) * 16) / max(1, num_warps // 4)
    return dot.flops / (2 * 16 * 8 * 16) / num_warps


def d_loop(record: dict, dim: int) -> tuple[float, int, int]:
    """A kernel's inner loops over one tile: (instructions per warp per trip, trips, matrix
    instructions per warp per trip). Each inner loop is a D loop, `for d0 in range(0, D, BLOCK_D)`,
    run ⌈D / BLOCK_D⌉ times."""
    loops = record.get("inner_loops", ())
    return (sum(loop["instructions"] for loop in loops), cdiv(dim, record["config"]["block_d"]),
            sum(mma_instructions(loop["mma"]) for loop in loops))


def proxy_steps(gpu: Gpu, record: dict, dot: Dot, num_warps: int) -> float:
    """Instructions per warp for a dot done as the proxy's D loop does its steps: one trip of the loop
    (its loads, masks, barriers and matrix instructions) per BLOCK_D of the dot's depth, with the
    matrix instructions the dot's own shape needs per step."""
    per_trip, _, mma_per_trip = d_loop(record, 0)
    step = record["config"]["block_d"]
    steps = cdiv(dot.k, step)
    mma_per_step = dot_instructions(gpu, Dot(dot.m, dot.n, step, dot.a_shared), num_warps)
    return steps * (per_trip - mma_per_trip + mma_per_step)


def epilogue_per_element(record: dict) -> float:
    """The proxy's epilogue instructions per cosine element a thread holds (its fixed costs spread
    over its elements: an overestimate for a tile with more elements per thread)."""
    config = record["config"]
    elements = config["block_b"] * config["block_c"] / (32 * config["num_warps"])
    return record["epilogue"]["instructions"] / elements


def programs_per_sm(gpu: Gpu, record: dict) -> int:
    return configs.programs_per_sm(record["registers"], record["config"]["num_warps"], record["shared_bytes"],
                                   gpu.registers_per_sm, gpu.shared_per_sm, 2048)


# ---------------------------------------------------------------------------------------------
# The `triton` backend, flash structure (docs/design.md §3.2)


def _slices(dim: int, width: int) -> list[int]:
    return [min(width, dim - start) for start in range(0, dim, width)]


def flash_kernels(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str, counts: dict) -> list[Kernel]:
    """The flash structure: norms pre-pass once; forward + dX (program: batch tile × class split ×
    D slice; a batch tile of x resident, W tiles streamed, each slice recomputing the cosines);
    dX from the accumulated O in O(B·D); dW (program: class tile × D slice; its W rows resident, x
    tiles streamed, the cosines recomputed from the saved log-sum-exp)."""
    e = BYTES[dtype]
    x_bytes, w_bytes = batch * dim * e, classes * dim * e
    kernels = [memory_kernel(gpu, "triton", "norms (x, W; once, saved)", x_bytes + w_bytes, 0.0, 2)]

    rows, stream, width, warps, per_sm = flash_tiles(gpu, counts, "forward+dX")
    slices = _slices(dim, width)
    batch_tiles = cdiv(batch, rows)
    splits = configs.splits_for_one_wave(gpu.sms * per_sm, batch_tiles * len(slices))
    per_split = cdiv(cdiv(classes, splits), configs.SPLIT_ALIGN_GPU) * configs.SPLIT_ALIGN_GPU
    splits = cdiv(classes, per_split)
    streamed = streams_d(gpu, counts, "forward+dX")
    # the W slice is loaded again for P̃·W where D is streamed or x and two W tiles do not fit
    reread = streamed or rows * dim * e + 2 * stream * dim * e > gpu.shared_per_block
    iterations = sum(cdiv(min(per_split, classes - k * per_split), stream) for k in range(splits))
    flops = sum(2.0 * batch * classes * dim + 2.0 * batch * classes * s for s in slices)
    l2 = sum((x_bytes * iterations if streamed else x_bytes * splits) + w_bytes * batch_tiles
             + (classes * s * e * batch_tiles if reread else 0) for s in slices)
    o_partials = splits * batch * dim * 4
    score, value = Dot(rows, stream, dim, True), Dot(rows, width, stream, False)
    s_instr, pv_instr, soft_instr, source = _flash_forward_counts(gpu, counts, dim, rows, stream, width, warps)
    phases = [Phase("cosines", (score,), s_instr), Phase("online softmax", (), soft_instr),
              Phase("O += P·W", (value,), pv_instr)]
    grid = Grid(batch_tiles * splits * len(slices), cdiv(per_split, stream), warps, per_sm)
    kernels.append(program_kernel(gpu, "triton", "forward + dX (flash)", e, grid, phases, flops,
                                  w_bytes + x_bytes + o_partials, l2, source))
    kernels.append(memory_kernel(gpu, "triton", "dX from O (O(B·D))", o_partials + x_bytes + x_bytes))

    rows, stream, width, warps, per_sm = flash_tiles(gpu, counts, "dW")
    slices = _slices(dim, width)
    class_tiles = cdiv(classes, rows)
    streamed = streams_d(gpu, counts, "dW")
    # the x slice is loaded again for G·x where D is streamed or W and two x tiles do not fit
    reread = streamed or rows * dim * e + 2 * stream * dim * e > gpu.shared_per_block
    flops = sum(2.0 * batch * classes * dim + 2.0 * batch * classes * s for s in slices)
    l2 = sum((w_bytes * cdiv(batch, stream) if streamed else w_bytes) + x_bytes * class_tiles
             + (batch * s * e * class_tiles if reread else 0) for s in slices)
    score, gradient = Dot(rows, stream, dim, True), Dot(rows, width, stream, False)
    s_instr, g_instr, source = _flash_dw_counts(gpu, counts, dim, rows, stream, width, warps)
    phases = [Phase("cosines", (score,), s_instr), Phase("gradient tile", (), g_instr),
              Phase("dW += G·x", (gradient,), 0.0)]
    grid = Grid(class_tiles * len(slices), cdiv(batch, stream), warps, per_sm)
    kernels.append(program_kernel(gpu, "triton", "dW (flash)", e, grid, phases, flops, w_bytes + x_bytes + w_bytes,
                                  l2, source))
    return kernels


def _flash_forward_counts(gpu: Gpu, counts: dict, dim: int, rows: int, stream: int, width: int,
                          warps: int) -> tuple[float, float, float, str]:
    """Instructions per warp per iteration of the flash forward + dX: (cosine loop, P̃·W, softmax)."""
    record = sass_record(counts, gpu, "forward+dX")
    if FLASH_LANDED:
        per_trip, trips, _ = d_loop(record, dim)
        return per_trip * trips, 0.0, record["epilogue"]["instructions"], f"SASS of '{record['compile_check']}'"
    elements = rows * stream / (32 * warps)
    cosines = proxy_steps(gpu, record, Dot(rows, stream, dim, True), warps)
    value = proxy_steps(gpu, record, Dot(rows, width, stream, False), warps)
    rescale = rows * width / (32 * warps)  # O *= exp(m_old − m_new): one multiply per accumulator
    convert = elements / 2  # P̃ to 16 bits, two per instruction
    softmax = epilogue_per_element(record) * elements + rescale + convert
    return cosines, value, softmax, f"PROXY from '{record['compile_check']}'"


def _flash_dw_counts(gpu: Gpu, counts: dict, dim: int, rows: int, stream: int, width: int,
                     warps: int) -> tuple[float, float, str]:
    """Instructions per warp per iteration of the flash dW kernel: (cosine loop, gradient epilogue
    with its dot's issue)."""
    record = sass_record(counts, gpu, "dW")
    if FLASH_LANDED:
        per_trip, trips, _ = d_loop(record, dim)
        return per_trip * trips, record["epilogue"]["instructions"], f"SASS of '{record['compile_check']}'"
    cosines = proxy_steps(gpu, record, Dot(rows, stream, dim, True), warps)
    gradient = epilogue_per_element(record) * rows * stream / (32 * warps)
    return cosines, gradient, f"PROXY from '{record['compile_check']}'"


# ---------------------------------------------------------------------------------------------
# The chunked `cuda` backend


def gemm_fill(gpu: Gpu, m: int, n: int, splits: int = 1) -> float:
    """The share of the SMs' time a GEMM's output tiles (GEMM_TILE², times its split-K ways) keep busy
    over whole waves."""
    tiles = cdiv(m, GEMM_TILE) * cdiv(n, GEMM_TILE) * splits
    return tiles / (cdiv(tiles, gpu.sms) * gpu.sms)


def gemm_kernel(gpu: Gpu, backend: str, name: str, flops: float, fill: float, hbm_bytes: float, l2_bytes: float,
                launches: int, shapes: str) -> Kernel:
    """cuBLAS GEMMs: FLOPs at MATMUL_EFFICIENCY of peak times the fill of their waves (the operand
    traffic of a tuned GEMM is in that measured rate, so L2 counts only what is written)."""
    flop_s = flops / (gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY * fill)
    hbm_s, l2_s = _bytes_terms(gpu, hbm_bytes, l2_bytes)
    return Kernel(backend, name, flops, hbm_bytes, l2_bytes, flop_s, hbm_s, l2_s, None, None, launches,
                  launches * LAUNCH_GAP_S, shapes)


def cuda_kernels(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str, tuned: bool = True) -> list[Kernel]:
    """The chunked `cuda` backend: per chunk of n classes, the cosine GEMM S = X·W_chunkᵀ, the row
    pass (forward); the cosine GEMM again, the gradient tile U, dX̂ += U·W_chunk (one batched GEMM
    split over its depth into fp32 accumulators), H = Uᵀ·X and its projection into dW (backward).

    Both: each pass its own chunk, the forward's n_f = cuda_forward_chunk_classes (its tile and W rows
    within L2), the backward's n = cuda_chunk_classes and its dX splits cuda_dx_splits
    (marginfused/backends/chunks.py, passed to the extension); the row passes one kernel each; U
    written over S where both have the input dtype. As built (csrc/cuda.cu, csrc/driver.h): S in
    bfloat16 for bfloat16 inputs, in fp32 for float16 (U in float16 beside it) and fp32; the inverse
    norms of x and of all of W in two launches at the start of the forward, kept for the backward
    (one pass over W); per chunk 2 launches forward and 5 backward; the split accumulators added
    after the last chunk; no CUDA graph, so the host's launches bound the step where they outlast the
    GPU. Tuned: S in the input dtype for every dtype, the chunk loop in a CUDA graph."""
    e = BYTES[dtype]
    backend = "cuda" if tuned else "cuda-as-built"
    gpu_shape = GpuShape(gpu.sms, gpu.l2_bytes)
    n = min(cuda_chunk_classes(gpu_shape, batch, dim, dtype), classes)
    chunks = cdiv(classes, n)
    n_f = min(cuda_forward_chunk_classes(gpu_shape, batch, dim, dtype), classes)
    chunks_f = cdiv(classes, n_f)
    splits = cuda_dx_splits(gpu_shape, batch, dim, n)
    s_bytes = e if tuned or dtype != "fp16" else 4
    u_beside = s_bytes != e  # U in its own buffer, not over S
    working = batch * (s_bytes + (e if u_beside else 0)) + dim * e + dim * 4
    in_l2 = n * working <= gpu.l2_bytes  # the chunk's tiles, W rows and H stay in L2 between kernels
    in_l2_f = n_f * (batch * s_bytes + dim * e) <= gpu.l2_bytes  # the forward's: its tile and W rows
    gemm = 2.0 * batch * classes * dim
    x_bytes, w_bytes = batch * dim * e, classes * dim * e
    s_total, u_total = batch * classes * s_bytes, batch * classes * e  # every chunk's tile, once
    h_total = classes * dim * 4
    spill = 0.0 if in_l2 else 1.0  # tiles through HBM when the chunk outgrows L2
    spill_f = 0.0 if in_l2_f else 1.0
    elements = batch * classes / 32  # warp instructions per instruction per element
    where = (f"forward n = {n_f} classes, {chunks_f} chunks, tiles {'in L2' if in_l2_f else 'through HBM'}; "
             f"backward n = {n} classes, {chunks} chunks, tiles {'in L2' if in_l2 else 'through HBM'}")
    norms = memory_kernel(gpu, backend, f"norms of x and W, once, kept ({where})", w_bytes + x_bytes, 0.0, 2)

    kernels = [
        norms,
        gemm_kernel(gpu, backend, "forward S = X·Wᵀ GEMMs", gemm, gemm_fill(gpu, batch, n_f), spill_f * s_total,
                    s_total, chunks_f, f"{batch}×{n_f}×{dim}"),
        memory_kernel(gpu, backend, "forward row pass", spill_f * s_total, s_total, chunks_f,
                      elements * ELEMENTWISE_INSTRUCTIONS),
        gemm_kernel(gpu, backend, "backward S GEMMs (recompute)", gemm, gemm_fill(gpu, batch, n),
                    w_bytes + spill * s_total, s_total, chunks, f"{batch}×{n}×{dim}"),
        memory_kernel(gpu, backend, "backward gradient tile U", spill * (s_total + u_total), s_total + u_total,
                      chunks, elements * ELEMENTWISE_INSTRUCTIONS),
    ]
    partials = chunks * 2 * splits * batch * dim * 4  # each split's fp32 accumulator, read and written
    kernels.append(gemm_kernel(gpu, backend, f"backward dX += U·W GEMMs (split-K {splits})", gemm,
                               gemm_fill(gpu, batch, dim, splits), spill * (u_total + w_bytes), partials, chunks,
                               f"{batch}×{dim}×{n // splits} ×{splits}"))
    kernels.append(gemm_kernel(gpu, backend, "backward H = Uᵀ·X GEMMs", gemm, gemm_fill(gpu, n, dim),
                               spill * (u_total + h_total), h_total, chunks, f"{n}×{dim}×{batch}"))
    kernels.append(memory_kernel(gpu, backend, "backward dW projection", w_bytes + spill * (h_total + w_bytes),
                                 h_total + w_bytes, chunks))
    kernels.append(memory_kernel(gpu, backend, "dX: the split accumulators added, projected",
                                 x_bytes * 2 + splits * batch * dim * 4, 0.0, splits))
    return kernels


# ---------------------------------------------------------------------------------------------
# Predictions


@dataclass
class Prediction:
    """A backend's predicted forward + backward: its kernels, and what bounds it as a whole."""

    backend: str
    kernels: list[Kernel]
    host_s: float = 0.0  # launches × HOST_LAUNCH_S where no CUDA graph holds the loop
    counts: str = ""

    @property
    def device_s(self) -> float:
        return sum(kernel.seconds for kernel in self.kernels)

    @property
    def seconds(self) -> float:
        return max(self.device_s, self.host_s)

    @property
    def binds(self) -> str:
        if self.host_s > self.device_s:
            return "host launches"
        by_term: dict[str, float] = {}
        for kernel in self.kernels:
            by_term[kernel.binds] = by_term.get(kernel.binds, 0.0) + kernel.seconds
        return ", ".join(f"{term} {seconds / self.device_s:.0%}"
                         for term, seconds in sorted(by_term.items(), key=lambda item: -item[1]))


def load_counts(refresh: bool = False) -> tuple[dict, str]:
    """The SASS counts and a sentence saying where they come from: bench/sass_counts.json, or a
    fresh compile (refresh; needs Triton, else the cached counts are used, saying so)."""
    if refresh:
        try:
            import triton  # noqa: F401
        except ImportError:
            refresh = False
            note = "Triton is not installed: the cached counts are used. "
        else:
            sass.refresh(SASS_SOURCES)
            note = "recompiled now. "
    else:
        note = ""
    counts = sass.load()
    if not counts:
        raise FileNotFoundError("bench/sass_counts.json is missing: run python -m bench.model --from-sass")
    return counts, (f"{note}Instruction counts: {sass.CACHE.name}, a read of compiled code (Triton "
                    f"{counts['triton']}, {counts['dtype']}, read {counts['date'][:10]}), not a measurement.")


def predict_backends(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str,
                     counts: Optional[dict] = None) -> dict[str, Prediction]:
    """Every backend's prediction: `triton` (flash), `cuda` (tuned), and `cuda-as-built`."""
    counts = counts if counts is not None else load_counts()[0]
    if dtype == "fp32":  # no tensor cores (the kernels' fp32 dots are IEEE); the counts stay the 16-bit kernels'
        gpu = replace(gpu, bf16_tflops=gpu.fp32_tflops)
    out = {"triton": Prediction("triton", flash_kernels(gpu, batch, classes, dim, dtype, counts))}
    tuned = cuda_kernels(gpu, batch, classes, dim, dtype, tuned=True)
    out["cuda"] = Prediction("cuda", tuned)
    built = cuda_kernels(gpu, batch, classes, dim, dtype, tuned=False)
    out["cuda-as-built"] = Prediction("cuda-as-built", built, sum(k.launches for k in built) * HOST_LAUNCH_S)
    return out


AS_BUILT = {"triton": "triton", "cuda": "cuda-as-built"}
"""The prediction of the code as it is on this branch, by the provider bench/session.py times."""


def predict(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> dict[str, tuple[float, list]]:
    """Predicted forward+backward seconds per backend, with each kernel's (name, seconds)."""
    return {name: (p.seconds, [(k.name, k.seconds) for k in p.kernels])
            for name, p in predict_backends(gpu, batch, classes, dim, dtype).items()}


def floor_seconds(gpu: Gpu, batch: int, classes: int, dim: int, dtype: str) -> float:
    """8·B·C·D at the assumed matmul rate: the time four GEMMs take at best."""
    peak = (gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12 * MATMUL_EFFICIENCY
    return 8.0 * batch * classes * dim / peak


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 1e3:.2f}"


def assumptions(gpu: Gpu, dtype: str) -> list[str]:
    """Each assumption of a prediction, with its source, as printed above the tables."""
    peak = gpu.fp32_tflops if dtype == "fp32" else gpu.bf16_tflops
    l2_source = "published microbenchmark figures, low end" if gpu.arch >= 90 else "assumed: see bench/model.py"
    matrix = (f"wgmma m64nNk16: N/2 cycles on an SM's tensor cores ({gpu.tensor_flops_per_clock:.0f} FLOP/cycle/SM), "
              f"its shared-memory operands at {gpu.shared_bytes_per_clock} B/cycle (A 2 KB re-read per SS wgmma, B "
              f"N·32 B): m64n16 SS 40%, m64n32 SS 67%, N ≥ 64 full rate" if gpu.arch >= 90 else
              "mma.sync m16n8k16 at full rate (operands from registers; their shared-memory loads are instructions)")
    return [
        f"matmul at MATMUL_EFFICIENCY = {MATMUL_EFFICIENCY:.0%} of {peak:g} TFLOP/s (790/989 measured on an H200, "
        f"docs/design.md §5)",
        f"HBM {gpu.hbm_tbps} TB/s (datasheet); L2 {gpu.l2_tbps} TB/s ({l2_source})",
        f"issue: {gpu.schedulers} schedulers × 1 warp instruction per cycle per SM at the {gpu.clock_ghz} GHz boost "
        f"clock (every cycle issues: optimistic)",
        matrix,
        "one program per SM: the phases of an iteration run one after another (serial)",
        f"launch gap {LAUNCH_GAP_S * 1e6:.0f} µs per kernel on the device; {HOST_LAUNCH_S * 1e6:.0f} µs of host time "
        f"per launch without a CUDA graph",
        f"cuda elementwise kernels: {ELEMENTWISE_INSTRUCTIONS} instructions per element (assumed); GEMMs in "
        f"{GEMM_TILE}×{GEMM_TILE} output tiles over {gpu.sms} SMs",
    ]


def table(gpu_name: str, batch: int, dim: int, classes: list[int], dtype: str, refresh: bool = False,
          kernels: bool = True) -> str:
    gpu = GPUS[gpu_name]
    counts, source = load_counts(refresh)
    lines = [f"PREDICTED (bench/model.py, not measured): {gpu.name}, {dtype}, B={batch}, D={dim}. "
             f"triton: the flash kernels{'' if FLASH_LANDED else ' (PROXY issue counts until they land)'}; "
             f"cuda: the chunked backend as tuned; cuda-as-built: csrc/cuda.cu as it is.",
             "Assumed: " + "; ".join(assumptions(gpu, dtype)) + ".",
             source, "",
             "| C | backend | predicted ms | 8BCD floor ms | FLOP ms | HBM ms | L2 ms | issue ms | serial ms "
             "| launch ms | binds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = ["", "PREDICTED per kernel: each kernel's time is the largest of its terms plus its launch gaps; "
              "FLOP at its MMA shapes' efficiency (shape, SS/RS, % of the tensor rate).", "",
              "| C | backend | predicted ms | kernel | binds | FLOP ms | HBM ms | L2 ms | issue ms | serial ms "
              "| launch ms | MMA shapes | counts |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in classes:
        floor = floor_seconds(gpu, batch, c, dim, dtype)
        for name, p in predict_backends(gpu, batch, c, dim, dtype, counts).items():
            def total(attribute: str) -> Optional[float]:
                values = [getattr(k, attribute) for k in p.kernels if getattr(k, attribute) is not None]
                return sum(values) if values else None

            lines.append(f"| {c} | {name} | {_ms(p.seconds)} | {_ms(floor)} | {_ms(total('flop_s'))} "
                         f"| {_ms(total('hbm_s'))} | {_ms(total('l2_s'))} | {_ms(total('issue_s'))} "
                         f"| {_ms(total('serial_s'))} | {_ms(total('launch_s'))} | {p.binds} |")
            for k in p.kernels:
                detail.append(f"| {c} | {name} | {_ms(k.seconds)} | {k.name} | {k.binds} | {_ms(k.flop_s)} "
                              f"| {_ms(k.hbm_s)} | {_ms(k.l2_s)} | {_ms(k.issue_s)} | {_ms(k.serial_s)} "
                              f"| {_ms(k.launch_s)} | {k.shapes or '-'} | {k.counts or '-'} |")
    lines.append("(each term column: the sum over the backend's kernels; a kernel's time is its largest term, so the "
                 "predicted time is not the largest sum)")
    return "\n".join(lines + (detail if kernels else []))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H100", choices=list(GPUS))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000])
    parser.add_argument("--dtype", default="bf16", choices=list(BYTES))
    parser.add_argument("--from-sass", action="store_true",
                        help="recompile the kernels the model reads and rewrite bench/sass_counts.json (needs Triton)")
    parser.add_argument("--no-kernels", action="store_true", help="the summary table only")
    args = parser.parse_args(argv)
    print(table(args.gpu, args.batch, args.dim, args.classes, args.dtype, args.from_sass, not args.no_kernels))


if __name__ == "__main__":
    sys.exit(main())
