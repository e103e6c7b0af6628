"""What a Triton kernel compiles to, counted: its loops, the instructions each warp issues in them,
and its matrix instructions with their shapes, read from the SASS of the cubin that the compile
check builds (kernels/compile_check.py) and from its PTX.

bench/model takes its issue term from these counts. Compiling needs Triton, so the counts are
kept in bench/sass_counts.json, written by

    python -m bench.model --from-sass

which compiles each kernel that bench/model may read (`bench.model.sass_sources`: every 16-bit
configuration of the forward and dW kernels on sm_90 and sm_80, one per range of D it serves),
disassembles the cubin with Triton's bundled `cuobjdump -sass`, and records per kernel: its
configuration, registers, shared memory, the wgmma / mma shapes of its PTX, and for its main loop
(the outermost loop holding matrix instructions: one tile of the kernel's walk) the instructions
per warp per iteration outside its inner loops (the epilogue) and in each inner loop (the D loop
feeding the matrix instructions), with the matrix instructions of each by shape. The file is a
read of compiled code, not a measurement.

How a loop is found: a branch to an address at or before its own closes a loop from that address
to the branch (a back edge); loops nest by address range. Counts are static: every instruction of
a loop body counts once per iteration, whether or not a predicate or a forward branch skips it at
run time (the kernels' bodies are straight-line code with predicated loads).
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(__file__).with_name("sass_counts.json")
"""The cached counts: a read of compiled code, written by `python -m bench.model --from-sass`."""

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
BRANCH_TARGET = re.compile(r"\bBRA(?:\.\w+)*\s+(0x[0-9a-f]+)")
HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)\b")
HMMA = re.compile(r"\bHMMA\.(16)(8)(8|16)\b")
PTX_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\b(m\d+n\d+k\d+)\b")


@dataclass
class Loop:
    """A loop of the SASS: its address range, instructions and matrix instructions by shape."""

    start: int
    end: int
    instructions: int = 0
    mma: Counter = field(default_factory=Counter)
    inner: list["Loop"] = field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and other is not self


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every instruction in a `cuobjdump -sass` listing, predicate included."""
    out = []
    for line in sass.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            out.append((int(match.group(1), 16), match.group(2).strip()))
    return out


def mma_shape(text: str) -> str | None:
    """The matrix instruction's shape, "m64n64k16 SS" / "m64n128k16 RS" for an HGMMA (SS: both
    operands from shared memory, RS: A from registers), "m16n8k16" for an HMMA; None otherwise."""
    hopper = HGMMA.search(text)
    if hopper:
        m, n, k = hopper.groups()
        operands = text[hopper.end():].split(",")
        a_in_registers = len(operands) > 1 and re.fullmatch(r"\s*R\d+\s*", operands[1]) is not None
        return f"m{m}n{n}k{k} {'RS' if a_in_registers else 'SS'}"
    ampere = HMMA.search(text)
    if ampere:
        m, n, k = ampere.groups()
        return f"m{m}n{n}k{k}"
    return None


def loops(sass: str) -> list[Loop]:
    """The outermost loops of a listing, each with the loops nested in it (`inner`). Back edges to
    one address are one loop (to the last of them); a branch to itself (the trap at the end of a
    kernel) is none."""
    listing = instructions(sass)
    ends: dict[int, int] = {}
    for address, text in listing:
        target = BRANCH_TARGET.search(text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            ends[start] = max(ends.get(start, address), address)
    found = [Loop(start, end) for start, end in ends.items()]
    for loop in found:
        for address, text in listing:
            if loop.start <= address <= loop.end:
                loop.instructions += 1
                shape = mma_shape(text)
                if shape:
                    loop.mma[shape] += 1
    found.sort(key=lambda loop: (loop.start, -loop.end))
    for loop in found:  # each loop's parent is the innermost loop containing it
        parents = [other for other in found if other.contains(loop)]
        if parents:
            min(parents, key=lambda other: other.end - other.start).inner.append(loop)
    return [loop for loop in found if not any(other.contains(loop) for other in found)]


def ptx_mma_shapes(ptx: str) -> dict[str, int]:
    """Matrix instructions of a PTX listing by shape: {"wgmma m64n64k16": 4}."""
    counts = Counter(f"{kind.split('.')[0]} {shape}" for kind, shape in PTX_MMA.findall(ptx))
    return dict(sorted(counts.items()))


def _loop_record(loop: Loop) -> dict:
    return {"instructions": loop.instructions, "mma": dict(sorted(loop.mma.items()))}


def main_loop(sass: str) -> dict:
    """The counts of a kernel's main loop: the outermost loop holding the most matrix instructions
    (per warp, static): its inner loops that hold matrix instructions (the D loops), and the rest
    of its body (`epilogue`: everything an iteration issues outside them, matrix instructions
    included). Empty where the kernel has no loop with a matrix instruction."""
    candidates = [loop for loop in loops(sass) if loop.mma]
    if not candidates:
        return {}
    tile = max(candidates, key=lambda loop: (sum(loop.mma.values()), loop.instructions))
    inner = [loop for loop in tile.inner if loop.mma]
    rest = Counter(tile.mma)
    for loop in inner:
        rest.subtract(loop.mma)
    return {
        "tile_loop": _loop_record(tile),
        "inner_loops": [_loop_record(loop) for loop in inner],
        "epilogue": {"instructions": tile.instructions - sum(loop.instructions for loop in inner),
                     "mma": {shape: count for shape, count in sorted(rest.items()) if count}},
    }


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, from the cuobjdump that Triton bundles."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        return subprocess.run([tool, "-sass", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)


def read_compiled(kernel) -> dict:
    """The record of one compiled Triton kernel: registers, shared memory, PTX matrix shapes and
    its main loop's counts."""
    from marginfused.kernels.compile_check import resource_usage

    registers, local = resource_usage(kernel.asm["cubin"])
    return {"registers": registers, "local_bytes": local, "shared_bytes": kernel.metadata.shared,
            "ptx_mma": ptx_mma_shapes(kernel.asm["ptx"]), **main_loop(disassemble(kernel.asm["cubin"]))}


def refresh(sources: dict[int, list[str]], dtype: str = "bf16", path: Path = CACHE) -> dict:
    """Compile the compile-check kernels named in `sources` ({target: [compile-check kernel label less
    its dtype, e.g. "forward resident 2x256"]}) and write their counts to `path`; the counts."""
    import triton

    from marginfused.kernels import compile_check

    read: dict[str, dict] = {}
    for arch, names in sources.items():
        jobs = {label: job for label, *job in compile_check.jobs([dtype], arch)}
        per_arch = {}
        for name in sorted(set(names)):
            (module, function), types, constexprs, tiles = jobs[f"{name} {dtype}"]
            fn = getattr(importlib.import_module(f"marginfused.kernels.{module}"), function)
            kernel = compile_check.compile_kernel(fn, types, constexprs, tiles.num_warps, tiles.num_stages, arch)
            per_arch[name] = {
                "compile_check": f"{name} {dtype}", "ptxas": compile_check.ptxas_version(arch),
                "config": {"block_b": tiles.block_b, "block_c": tiles.block_c, "block_d": tiles.block_d,
                           "block_g": tiles.block_g, "num_warps": tiles.num_warps, "num_stages": tiles.num_stages,
                           "parts": tiles.parts},
                **read_compiled(kernel),
            }
        read[f"sm_{arch}"] = per_arch
    document = {
        "about": ("A read of compiled code, not a measurement: per kernel, what `python -m bench.model "
                  "--from-sass` read from the SASS (Triton's bundled cuobjdump) and PTX of the cubin the "
                  "compile check builds. Instructions are per warp, static, per iteration of the loop."),
        "triton": triton.__version__,
        "dtype": dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernels": read,
    }
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return document


def load(path: Path = CACHE) -> dict:
    """The cached counts, or {} where there are none."""
    return json.loads(path.read_text()) if path.exists() else {}
