"""The `triton` backend's kernels, the flash-attention structure of kernels/ (docs/design.md §3.2),
counted from their code and their compiled SASS (bench/sass_counts.json)."""

from __future__ import annotations

from marginfused.kernels import configs
from marginfused.kernels.compile_check import shape

from .gpus import BYTES, Gpu, cdiv
from .kernel import Dot, Grid, Kernel, Phase, memory_kernel, program_kernel

MODEL_KERNELS = {"forward+dX": "forward", "dW": "weight_grad"}
"""The model's flash kernels by their kernels/configs.py name."""
SASS_ARCHES = (90, 80)
"""The targets whose compiled code the model reads: Hopper's for sm_90 and later, Ampere's below."""


def sass_label(arch: int, kernel: str, dim: int) -> str:
    """The compile-check kernel (kernels/compile_check.py's label less its dtype) whose compiled code
    gives a model kernel's counts at D = dim: the 16-bit configuration kernels/configs.py gives the
    plain variant on sm_`arch` at that D."""
    return _label(kernel, configs.serving(configs.gpu_choices(MODEL_KERNELS[kernel], arch, "16"), dim))


def sass_sources() -> dict[int, list[str]]:
    """Every compile-check kernel the model may read, by target: each 16-bit configuration of the
    plain variant of the forward and dW kernels (one per range of D it serves)."""
    return {arch: [_label(kernel, tiles) for kernel, name in MODEL_KERNELS.items()
                   for tiles in configs.gpu_choices(name, arch, "16")] for arch in SASS_ARCHES}


def _label(kernel: str, tiles: configs.Tiles) -> str:
    """The compile-check label, less its dtype, of a model kernel in a configuration (its first
    launch: kernels/compile_check.py)."""
    return f"{kernel.split('+')[0]} {shape(tiles)}"


def streams_d(gpu: Gpu, counts: dict, kernel: str, dim: int) -> bool:
    """Whether a flash kernel streams D at D = dim (its resident operand re-read with every tile of
    the other, kernels/tiles.py) rather than keeping its tile resident: its compiled configuration's
    (parts = 0)."""
    return sass_record(counts, gpu, kernel, dim)["config"]["parts"] == 0


def flash_tiles(gpu: Gpu, counts: dict, kernel: str, dim: int) -> tuple[int, int, int, int, int]:
    """(resident rows, streamed rows, D slice, warps, programs per SM) of a flash kernel at D = dim:
    its compiled configuration (the forward's batch tile BLOCK_B and class tile BLOCK_C; the dW
    kernel's class tile BLOCK_C and batch tile BLOCK_B)."""
    record = sass_record(counts, gpu, kernel, dim)
    config = record["config"]
    resident, streamed = ("block_b", "block_c") if kernel == "forward+dX" else ("block_c", "block_b")
    return (config[resident], config[streamed], min(config["block_g"], dim), config["num_warps"],
            programs_per_sm(gpu, record))


def sass_arch(gpu: Gpu) -> int:
    return 90 if gpu.arch >= 90 else 80


def sass_record(counts: dict, gpu: Gpu, kernel: str, dim: int) -> dict:
    """The cached read of the compile-check kernel a model kernel runs as on this GPU at D = dim."""
    arch = sass_arch(gpu)
    name = sass_label(arch, kernel, dim)
    try:
        return counts["kernels"][f"sm_{arch}"][name]
    except KeyError:
        raise KeyError(f"bench/sass_counts.json has no sm_{arch} counts of '{name}': "
                       f"run python -m bench.model --from-sass") from None


def d_loop(record: dict, dim: int) -> tuple[float, int]:
    """A kernel's inner loops over one tile: (instructions per warp per trip, trips). Each inner loop
    is a D loop, `for d0 in range(0, D, BLOCK_D)`, run ⌈D / BLOCK_D⌉ times (none where a tile is
    resident)."""
    loops = record.get("inner_loops", ())
    return sum(loop["instructions"] for loop in loops), cdiv(dim, record["config"]["block_d"])


def programs_per_sm(gpu: Gpu, record: dict) -> int:
    return configs.programs_per_sm(record["registers"], record["config"]["num_warps"], record["shared_bytes"],
                                   gpu.registers_per_sm, gpu.shared_per_sm, 2048)


def iteration_dots(resident: int, streamed: int, width: int, dim: int) -> tuple[Dot, Dot]:
    """A flash kernel's dots per loop iteration: the cosines of its resident tile against the streamed
    one over all of D (A from shared memory), then O's or dŴ's slice of `width` columns (A, the
    weight tile, from registers)."""
    return Dot(resident, streamed, dim, True), Dot(resident, width, streamed, False)


def _launches(gpu: Gpu, counts: dict, kernel: str, dim: int, slices: int) -> int:
    """Launches of a flash kernel at D = dim: one per slice with two resident parts
    (kernels/configs.py Tiles.launches), else one. Each launch reads W from HBM again."""
    return len(configs.Tiles(**sass_record(counts, gpu, kernel, dim)["config"]).launches(slices))


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

    rows, stream, width, warps, per_sm = flash_tiles(gpu, counts, "forward+dX", dim)
    slices = _slices(dim, width)
    launches = _launches(gpu, counts, "forward+dX", dim, len(slices))
    batch_tiles = cdiv(batch, rows)
    splits = configs.splits_for_one_wave(gpu.sms * per_sm, batch_tiles * len(slices) // launches)
    per_split = cdiv(cdiv(classes, splits), configs.SPLIT_ALIGN_GPU) * configs.SPLIT_ALIGN_GPU
    splits = cdiv(classes, per_split)
    streamed = streams_d(gpu, counts, "forward+dX", dim)
    # the W slice is loaded again for P̃·W where D is streamed or x and two W tiles do not fit
    reread = streamed or rows * dim * e + 2 * stream * dim * e > gpu.shared_per_block
    iterations = sum(cdiv(min(per_split, classes - k * per_split), stream) for k in range(splits))
    flops = sum(2.0 * batch * classes * dim + 2.0 * batch * classes * s for s in slices)
    l2 = sum((x_bytes * iterations if streamed else x_bytes * splits) + w_bytes * batch_tiles
             + (classes * s * e * batch_tiles if reread else 0) for s in slices)
    o_partials = splits * batch * dim * 4
    score, value = iteration_dots(rows, stream, width, dim)
    s_instr, soft_instr, source = _sass_counts(gpu, counts, "forward+dX", dim)
    phases = [Phase("cosines", (score,), s_instr), Phase("online softmax", (), soft_instr),
              Phase("O += P·W", (value,), 0.0)]
    grid = Grid(batch_tiles * splits * len(slices), cdiv(per_split, stream), warps, per_sm)
    kernels.append(program_kernel(gpu, "triton", "forward + dX (flash)", e, grid, phases, flops,
                                  w_bytes * launches + x_bytes + o_partials, l2, source, launches))
    kernels.append(memory_kernel(gpu, "triton", "dX from O (O(B·D))", o_partials + x_bytes + x_bytes))

    rows, stream, width, warps, per_sm = flash_tiles(gpu, counts, "dW", dim)
    slices = _slices(dim, width)
    launches = _launches(gpu, counts, "dW", dim, len(slices))
    class_tiles = cdiv(classes, rows)
    streamed = streams_d(gpu, counts, "dW", dim)
    # the x slice is loaded again for G·x where D is streamed or W and two x tiles do not fit
    reread = streamed or rows * dim * e + 2 * stream * dim * e > gpu.shared_per_block
    flops = sum(2.0 * batch * classes * dim + 2.0 * batch * classes * s for s in slices)
    l2 = sum((w_bytes * cdiv(batch, stream) if streamed else w_bytes) + x_bytes * class_tiles
             + (batch * s * e * class_tiles if reread else 0) for s in slices)
    score, gradient = iteration_dots(rows, stream, width, dim)
    s_instr, g_instr, source = _sass_counts(gpu, counts, "dW", dim)
    phases = [Phase("cosines", (score,), s_instr), Phase("gradient tile", (), g_instr),
              Phase("dW += G·x", (gradient,), 0.0)]
    grid = Grid(class_tiles * len(slices), cdiv(batch, stream), warps, per_sm)
    kernels.append(program_kernel(gpu, "triton", "dW (flash)", e, grid, phases, flops,
                                  w_bytes * launches + x_bytes + w_bytes, l2, source, launches))
    return kernels


def _sass_counts(gpu: Gpu, counts: dict, kernel: str, dim: int) -> tuple[float, float, str]:
    """Instructions per warp per iteration of a flash kernel, from its SASS: (its cosine loop over D,
    its epilogue: the forward's online softmax with O's dot, the dW kernel's gradient tile with its
    dot), and where they come from."""
    record = sass_record(counts, gpu, kernel, dim)
    per_trip, trips = d_loop(record, dim)
    return per_trip * trips, record["epilogue"]["instructions"], f"SASS of '{record['compile_check']}'"
