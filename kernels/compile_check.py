"""Compile the kernels for every GPU target ahead of time, on a machine without a GPU, and check
what the compiler emits.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not what they compile
to: layouts, register allocation, shared memory and the software pipeline only meet the real
compiler on a GPU. This compiles the forward, dW, projection and norms kernels, in each input
dtype, in every GPU launch configuration of configs.py, to a cubin for each
target through Triton's own toolchain, with the alignment hints a real launch gets (16-byte
aligned pointers; D, strides and the split size divisible by 16), and reads, per kernel and target:

- registers and local memory (spills, stack) of the cubin Triton built (its bundled cuobjdump);
- shared memory against the target's limit per block;
- the matrix instruction: wgmma (Hopper), tcgen05 (Blackwell), mma.sync (Ampere, Ada), or none;
- for every loop of the software pipeline and every ring of shared-memory buffers it refills, its
  buffers against those the loop needs, from the TTGIR Triton built (kernels/rings.py: buffers ≥
  copies ahead + iterations still read when a copy is issued; fewer means a dot reads a buffer
  the next copy overwrites: triton-lang/triton #6691, which a tile used both by a wgmma and by
  register math triggers);
- atomics: none, relaxed, or fenced (an atomic with acquire/release semantics, or a memory
  barrier, in the PTX). The kernels have none: every output is written once, by its owner.

A kernel fails the check on local memory, shared memory over the limit, a ring with fewer buffers
than its loop needs, a loop whose pipeline the check cannot read, or any atomic (the backward's
determinism rests on there being none). Every line names the ptxas that built the cubin (Triton
bundles its own, per target: the registers, spills and stack are that ptxas's), and the run's
first line names Triton's version and each target's ptxas.

    python -m marginfused.kernels.compile_check [--arch 80 86 89 90 100 120] [--dtype bf16 fp16 fp32] [--workers N]

Must run without TRITON_INTERPRET set (the kernels are defined as interpreted functions then);
exits non-zero if any compile or check fails.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .rings import Ring, Unread, pipelined_rings, short

TARGETS = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
"""Every target compiled, with its largest shared memory per block in bytes (the opt-in limit)."""
DTYPES = ("bf16", "fp16", "fp32")
ALIGNED_INTS = {"D", "stride_x", "stride_w", "stride_v", "classes_per_split"}
SCALARS = dict(B="i32", C_local="i32", D="i32", stride_x="i32", stride_w="i32", class_start="i64",
               classes_per_split="i32", scale="fp32", ignore_index="i32",
               smoothing_per_class="fp32", quadratic="fp32", R="i32", stride_v="i32")


@dataclass
class Report:
    """What one kernel compiled to on one target."""

    label: str
    arch: int
    ptxas: str
    registers: int
    local_bytes: int
    shared_bytes: int
    shared_limit: int
    matrix_instruction: str
    rings: list[Ring]
    unread: list[Unread]
    num_stages: int
    atomics: str  # "none", "relaxed" or "fenced"

    def problems(self) -> list[str]:
        found = []
        if self.local_bytes:
            found.append(f"{self.local_bytes} bytes of local memory (spills or stack)")
        if self.shared_bytes > self.shared_limit:
            found.append(f"shared memory {self.shared_bytes} > {self.shared_limit}")
        found += [ring.describe() for ring in short(self.rings)]
        found += [loop.describe() for loop in self.unread]
        if self.atomics != "none":
            found.append(f"{self.atomics} atomics")
        return found

    def line(self) -> str:
        tightest = min(self.rings, key=lambda ring: (ring.buffers - ring.needed, -ring.needed), default=None)
        buffers = "-" if tightest is None else f"{tightest.buffers}/{tightest.needed}"
        verdict = "; ".join(self.problems()) or "ok"
        return (f"{self.label:<46} sm_{self.arch:<4} ptxas {self.ptxas:<8} regs {self.registers:>3}  "
                f"local {self.local_bytes:>3}  smem {self.shared_bytes:>6}/{self.shared_limit:<6}  "
                f"{self.matrix_instruction:<8} buffers {buffers:<4} stages {self.num_stages}  "
                f"atomics {self.atomics:<7}  {verdict}")


def compile_kernel(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, arch: int):
    """Triton's compiled kernel (all stages: ttgir, ptx, cubin) of `fn` for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types[name]
        if types[name].startswith("*") or name in ALIGNED_INTS:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes per thread) of the cubin's kernel, as its own cuobjdump reads it."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    registers, stack, local = (int(v) for v in usage.groups())
    return registers, max(stack, local)


@functools.lru_cache(maxsize=None)
def ptxas_version(arch: int) -> str:
    """The version of the ptxas Triton builds sm_`arch` with (Triton picks one of its bundled
    ptxas binaries by target)."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"\bV(\d+\.\d+\.\d+)", out)
    if version is None:
        raise RuntimeError(f"ptxas --version printed no version:\n{out}")
    return version.group(1)


FENCED = re.compile(r"\bmembar\.|\bfence\.(sc|acq_rel)\b|\b(atom|red)\.[\w.]*\b(acq_rel|release|acquire)\b")
"""A memory barrier or an acquire/release atomic (the fences `atom` gets by default, sem="acq_rel");
the proxy and wgmma fences of the tensor-core pipeline are not atomics' fences."""
ATOMIC = re.compile(r"\b(atom|red)\.")


def inspect(kernel, label: str, arch: int, num_stages: int) -> Report:
    """The report of a compiled kernel."""
    registers, local = resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    instruction = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma." in ptx
                   else "mma.sync" if "mma.sync" in ptx else "none")
    rings, unread = pipelined_rings(kernel.asm["ttgir"])
    return Report(label, arch, ptxas_version(arch), registers, local, kernel.metadata.shared, TARGETS[arch],
                  instruction, rings, unread, num_stages,
                  "fenced" if FENCED.search(ptx) else "relaxed" if ATOMIC.search(ptx) else "none")


VARIANTS = [("", False, 1), (" +rule", True, 1), (" +subcentres", False, 3)]
"""The forward and dW kernels' variants checked: (label, NEGATIVES_RULE, SUBCENTERS)."""
FORWARD_PASSES = [("", True, True), (" no O", True, False), (" smoothing", False, True)]
"""The forward kernel's passes checked: (label, SOFTMAX, CENTRES): partials and weighted centres
(training), partials alone (no gradient for x), the smoothing term's sums (ε > 0; without a rule or
sub-centres they run as the rule variant, τ = +∞: marginfused/backends/triton.py)."""


def shape(tiles) -> str:
    """How a configuration takes D: "resident 2x256", or "streamed 64/128" (chunks of 64, slices of
    128: kernels/tiles.py)."""
    return (f"resident {tiles.parts}x{tiles.block_g}" if tiles.parts
            else f"streamed {tiles.block_d}/{tiles.block_g}")


def part(own: int) -> str:
    """A two-part configuration's second launch in a label (" part 1"); the first's label is the
    configuration's alone."""
    return f" part {own}" if own else ""


def jobs(dtypes, arch: int) -> list[tuple]:
    """(label, kernel module and name, argument types, constexprs, tiles) of every kernel variant:
    each GPU configuration at the largest D it serves (a one-part configuration's widest slice), a
    two-part one in each of its launches (Tiles.launches)."""
    from . import configs

    out = []
    for dtype in dtypes:
        element = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dtype]
        width = "32" if dtype == "fp32" else "16"
        precision = "ieee" if dtype == "fp32" else "tf32"
        pointers = dict(x_ptr=f"*{element}", w_ptr=f"*{element}", v_ptr=f"*{element}", out_ptr=f"*{element}",
                        y_ptr="*i64", inv_ptr="*fp32", inv_x_ptr="*fp32", inv_w_ptr="*fp32", lift_ptr="*fp32",
                        max_ptr="*fp32", sumexp_ptr="*fp32",
                        logit_sum_ptr="*fp32", best_cos_ptr="*fp32", best_class_ptr="*i64", centres_ptr="*fp32",
                        lse_ptr="*fp32", row_grad_ptr="*fp32", target_grad_ptr="*fp32", target_ptr="*i32",
                        dw_ptr=f"*{element}",
                        g_ptr="*fp32", rule_threshold_ptr="*fp32", rule_offset_ptr="*fp32")
        types = {**SCALARS, **pointers}
        rows = configs.NORMS_GPU
        for variant, rule, subcenters in VARIANTS:
            common = dict(DOT_PRECISION=precision, NEGATIVES_RULE=rule, SUBCENTERS=subcenters)
            for tiles in configs.gpu_choices("forward", arch, width, subcenters, rule):
                blocks = dict(BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d,
                              BLOCK_G=tiles.block_g, PARTS=tiles.parts)
                for name, softmax, centres in FORWARD_PASSES:
                    if not softmax and not rule and subcenters == 1:
                        continue  # the plain smoothing pass runs as the rule variant (backends/triton.py)
                    for own in tiles.launches((tiles.parts or 1) if centres else 1):  # as backends/triton.py
                        out.append((f"forward {shape(tiles)}{part(own)}{variant}{name} {dtype}",
                                    ("forward", "forward_kernel"), types,
                                    dict(common, **blocks, SOFTMAX=softmax, CENTRES=centres, OWN=own), tiles))
            for tiles in configs.gpu_choices("weight_grad", arch, width, subcenters, rule):
                blocks = dict(BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d,
                              BLOCK_G=tiles.block_g, PARTS=tiles.parts)
                for own in tiles.launches(tiles.parts or 1):
                    out.append((f"dW {shape(tiles)}{part(own)}{variant} {dtype}", ("backward", "weight_grad_kernel"),
                                types, dict(common, **blocks, OWN=own), tiles))
        out += [
            (f"project {dtype}", ("project", "project_kernel"), {**types, "out_ptr": f"*{element}"},
             dict(BLOCK_R=rows.block_b, BLOCK_D=rows.block_d), rows),
            (f"norms {dtype}", ("norms", "inverse_norms_kernel"), {**types, "out_ptr": "*fp32"},
             dict(BLOCK_R=rows.block_b, BLOCK_D=rows.block_d), rows),
        ]
    return out


def _run(job: tuple, arch: int) -> str:
    import importlib

    label, (module, name), types, constexprs, tiles = job
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    try:
        kernel = compile_kernel(fn, types, constexprs, tiles.num_warps, tiles.num_stages, arch)
        report = inspect(kernel, label, arch, tiles.num_stages)
    except Exception as error:  # report every failure, then exit non-zero
        return f"FAILED {label} sm_{arch}: {type(error).__name__}: {error}"
    return ("ok     " if not report.problems() else "FAILED ") + report.line()


def header(archs) -> str:
    """The run's first line: Triton's version and the ptxas of each target."""
    import triton

    targets = ", ".join(f"sm_{arch} {ptxas_version(arch)}" for arch in archs)
    return f"compile check: triton {triton.__version__}; ptxas by target: {targets}"


def check(archs, dtypes, workers: int = 2) -> int:
    """Compile and check every variant for every target; print a line each; the number that failed."""
    print(header(archs), flush=True)
    work = [(job, arch) for arch in archs for job in jobs(dtypes, arch)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        lines = list(pool.map(_run, *zip(*work)))
    for line in lines:
        print(line, flush=True)
    return sum(line.startswith("FAILED") for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginfused.kernels.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=list(TARGETS), choices=list(TARGETS),
                        help="CUDA compute capabilities, e.g. 90 for sm_90")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels would be interpreted functions)")
        return 2
    return 1 if check(args.arch, args.dtype, args.workers) else 0


if __name__ == "__main__":
    sys.exit(main())
