"""A kernel's terms: the shape of its dots and what the tensor cores reach with them, and the time
its FLOPs, bytes and instructions take on a GPU (bench/model/__init__.py says how they combine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .gpus import LAUNCH_GAP_S, MATMUL_EFFICIENCY, Gpu, cdiv


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
                   flops: float, hbm_bytes: float, l2_bytes: float, counts: str, launches: int = 1) -> Kernel:
    """A Triton kernel from its grid and the phases of one loop iteration: the busiest SM runs
    ⌈programs / (SMs × programs per SM)⌉ waves of iterations. `flops` is the kernel's exact count
    (edge tiles partial); the tensor time follows the full tiles the phases describe. `launches`: the
    kernel's launches over the grid, each with its gap."""
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
                  iterations * sum(issue) / clock, iterations * serial / clock, launches, launches * LAUNCH_GAP_S,
                  shapes, counts)
