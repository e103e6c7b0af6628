"""bench/model counts what the kernels compute, move and issue, labels every prediction, and
reads its instruction counts from compiled code (bench/sass.py). Counts only: no timing is asserted."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import model, sass
from marginfused.backends.chunks import (GEMM_TILE, L2_SHARE, SPLIT_K_DEPTH, GpuShape, cuda_chunk_classes,
                                         cuda_dx_splits, cuda_forward_chunk_classes, dx_split_ways)
from marginfused.kernels import configs
from marginfused.kernels.compile_check import shape

REPO = Path(__file__).resolve().parents[1]
H100 = model.GPUS["H100"]
COUNTS = sass.load()


def by_name(kernels, name):
    (kernel,) = [k for k in kernels if k.name.startswith(name)]
    return kernel


# --- FLOPs and bytes, from first principles ---------------------------------------------------


@pytest.mark.parametrize("dim, flash_k", [(512, 12), (256, 8), (200, 8), (1024, 36)])
def test_flops_are_k_times_bcd_for_each_kernel(dim, flash_k):
    """Each GEMM pass is 2·B·C·D; the flash kernels recompute the cosines once per D slice: on Hopper
    one slice of 256 to D = 256 (4·B·C·D each), two to D = 512 (6), slices of 128 past it (18 at
    D = 1024); cuda 4 GEMMs."""
    b, c = 1024, 1_000_000
    bcd = b * c * dim
    flash = model.flash_kernels(H100, b, c, dim, "bf16", COUNTS)
    assert by_name(flash, "forward + dX").flops == flash_k // 2 * bcd
    assert by_name(flash, "dW").flops == flash_k // 2 * bcd
    assert sum(k.flops for k in flash) == flash_k * bcd
    assert sum(k.flops for k in model.cuda_kernels(H100, b, c, dim, "bf16")) == 8 * bcd


def test_the_tensor_time_is_no_less_than_the_flops_at_the_matmul_rate():
    for prediction in model.predict_backends(H100, 1024, 1_000_000, 512, "bf16", COUNTS).values():
        for k in prediction.kernels:
            assert k.flop_s >= k.flops / (H100.bf16_tflops * 1e12 * model.MATMUL_EFFICIENCY) * (1 - 1e-9), k.name


def test_every_backend_reads_w_from_hbm_and_writes_dw_once():
    b, c, d = 1024, 1_000_000, 512
    w = c * d * 2
    predictions = model.predict_backends(H100, b, c, d, "bf16", COUNTS)
    for name, prediction in predictions.items():
        # W read in the forward and in the backward, dW written: at least three W's worth
        assert sum(k.hbm_bytes for k in prediction.kernels) >= 3 * w, name
    flash = predictions["triton"].kernels
    assert by_name(flash, "norms").hbm_bytes >= w
    assert by_name(flash, "forward + dX").hbm_bytes >= w
    assert by_name(flash, "dW").hbm_bytes >= 2 * w  # W read, dW written
    assert by_name(predictions["cuda"].kernels, "backward dW projection").hbm_bytes >= w


def _splits(wave: int, programs_per_split: int, classes: int) -> tuple[int, int]:
    """The triton backend's class splits (marginfused/backends/triton.py, _class_splits)."""
    align = configs.SPLIT_ALIGN_GPU
    wanted = max(1, min(configs.splits_for_one_wave(wave, programs_per_split), -(-classes // align)))
    per_split = -(-(-(-classes // wanted)) // align) * align
    return -(-classes // per_split), per_split


def _ranges(total: int, size: int):
    return [(start, min(size, total - start)) for start in range(0, total, size)]


@pytest.mark.parametrize("dim", [200, 512, 1024])
def test_l2_bytes_are_the_operand_tiles_each_program_loads(dim):
    """A recount, program by program and tile by tile, of the operand bytes each kernel loads: a
    resident tile once per program, a streamed tile once per iteration (valid rows only)."""
    b, c, e = 300, 5003, 2
    gpu = H100

    # flash forward + dX: its x tile once per program where resident, else with every W tile (over all
    # of D, for the cosines) beside the W tile's slice (P̃·W); the W tile over all of D per iteration
    rows, stream, width, _, per_sm = model.flash_tiles(gpu, COUNTS, "forward+dX", dim)
    streamed = model.streams_d(gpu, COUNTS, "forward+dX", dim)
    slices = _ranges(dim, width)
    launches = len(configs.serving(configs.gpu_choices("forward", 90, "16"), dim).launches(len(slices)))
    n_splits, per_split = _splits(gpu.sms * per_sm, -(-b // rows) * len(slices) // launches, c)
    expected = 0
    for _, batch_rows in _ranges(b, rows):
        for split in range(n_splits):
            for _, slice_width in slices:
                split_end = min(c, (split + 1) * per_split)
                expected += 0 if streamed else batch_rows * dim * e
                for c0 in range(split * per_split, split_end, stream):
                    classes = min(stream, split_end - c0)
                    expected += classes * dim * e
                    expected += (batch_rows * dim * e + classes * slice_width * e) if streamed else 0
    assert by_name(model.flash_kernels(gpu, b, c, dim, "bf16", COUNTS), "forward + dX").l2_bytes == expected

    # flash dW: its W tile once per program where resident, else with every x tile beside the x
    # tile's slice (G·x); the x tile over all of D per iteration
    rows, stream, width, _, _ = model.flash_tiles(gpu, COUNTS, "dW", dim)
    streamed = model.streams_d(gpu, COUNTS, "dW", dim)
    expected = 0
    for _, classes in _ranges(c, rows):
        for _, slice_width in _ranges(dim, width):
            expected += 0 if streamed else classes * dim * e
            for _, batch_rows in _ranges(b, stream):
                expected += batch_rows * dim * e
                expected += (classes * dim * e + batch_rows * slice_width * e) if streamed else 0
    assert by_name(model.flash_kernels(gpu, b, c, dim, "bf16", COUNTS), "dW").l2_bytes == expected


# --- the terms and what binds -------------------------------------------------------------------


def test_each_kernel_takes_its_largest_term_plus_its_launches():
    for gpu in model.GPUS.values():
        for prediction in model.predict_backends(gpu, 1024, 1_000_000, 512, "bf16", COUNTS).values():
            for k in prediction.kernels:
                terms = k.terms()
                assert terms[k.binds] == max(terms.values())
                assert math.isclose(k.seconds, max(terms.values()) + k.launch_s)
            assert prediction.seconds == max(prediction.device_s, prediction.host_s)


def test_the_serial_term_is_no_less_than_the_tensor_time_or_the_issue_time():
    """One program per SM: an iteration's phases one after another take at least as long as either
    kind of work alone."""
    for name in ("triton",):
        for k in model.predict_backends(H100, 1024, 1_000_000, 512, "bf16", COUNTS)[name].kernels:
            if k.serial_s is not None:
                assert k.serial_s >= max(k.flop_s, k.issue_s) * (1 - 1e-9)


def test_wgmma_efficiency_from_the_shared_memory_operand_bandwidth():
    assert model.wgmma_efficiency(H100, 16, True) == pytest.approx(0.4, abs=0.002)
    assert model.wgmma_efficiency(H100, 32, True) == pytest.approx(2 / 3, abs=0.002)
    assert model.wgmma_efficiency(H100, 64, True) == pytest.approx(1.0, abs=0.002)
    assert model.wgmma_efficiency(H100, 256, True) == 1.0
    assert model.wgmma_efficiency(H100, 16, False) == 1.0  # A from registers


def _iteration_dots(name: str, config: dict, dim: int) -> tuple:
    """The model's dots of one iteration of a compile-check kernel ("forward …" or "dW …") at D = dim."""
    if name.startswith("forward"):
        return model.iteration_dots(config["block_b"], config["block_c"], config["block_g"], dim)
    return model.iteration_dots(config["block_c"], config["block_b"], config["block_g"], dim)


def _compiled_dim(config: dict) -> int:
    """The D a record's loop covers per iteration: a resident configuration's parts (static shapes),
    or 512 for a streamed one (its D loop runs ⌈512 / BLOCK_D⌉ times)."""
    return config["parts"] * config["block_g"] if config["parts"] else 512


def test_the_model_gives_each_dot_the_wgmma_shape_its_ptx_has():
    """The N the model derives for each compiled configuration's dots is what Triton compiled them to."""
    for name, record in COUNTS["kernels"]["sm_90"].items():
        config = record["config"]
        shapes = {f"wgmma m64n{model.wgmma_n(dot, config['num_warps'])}k16"
                  for dot in _iteration_dots(name, config, _compiled_dim(config))}
        assert shapes == set(record["ptx_mma"]), name


def test_the_sass_counts_hold_every_mma_flop_of_an_iteration():
    """The main loop's matrix instructions (a D loop's ⌈D/BLOCK_D⌉ times, the rest once), over all
    warps, do the FLOPs of the model's dots for one iteration."""
    for arch, per_kernel in COUNTS["kernels"].items():
        for name, record in per_kernel.items():
            config = record["config"]
            dim = _compiled_dim(config)

            def per_warp(mma):
                total = 0.0
                for shape, count in mma.items():
                    m, n, k = (int(v) for v in shape.split()[0][1:].replace("n", " ").replace("k", " ").split())
                    total += count * 2 * m * n * k / (4 if m == 64 else 1)  # a wgmma is its warpgroup's
                return total

            trips = -(-dim // config["block_d"])
            sass_flops = config["num_warps"] * (sum(per_warp(loop["mma"]) for loop in record["inner_loops"]) * trips
                                                + per_warp(record["epilogue"]["mma"]))
            assert sass_flops == sum(dot.flops for dot in _iteration_dots(name, config, dim)), (arch, name)


def test_the_cached_counts_are_of_the_configurations_in_configs_py():
    """bench/sass_counts.json is stale once kernels/configs.py changes: rerun --from-sass. It holds
    every configuration the model may read, each as configs.py has it."""
    sources = model.sass_sources()
    assert {arch: set(names) for arch, names in sources.items()} == {
        int(arch[3:]): set(per_kernel) for arch, per_kernel in COUNTS["kernels"].items()}
    for arch, per_kernel in COUNTS["kernels"].items():
        for name, record in per_kernel.items():
            kernel = {"forward": "forward", "dW": "weight_grad"}[name.split()[0]]
            (tiles,) = [t for t in configs.gpu_choices(kernel, int(arch[3:]), "16")
                        if f"{name.split()[0]} {shape(t)}" == name]
            assert record["config"] == {"block_b": tiles.block_b, "block_c": tiles.block_c, "block_d": tiles.block_d,
                                        "block_g": tiles.block_g, "num_warps": tiles.num_warps,
                                        "num_stages": tiles.num_stages, "parts": tiles.parts}, (arch, name)


def test_the_model_reads_the_configuration_each_d_runs_in():
    """At each D the model takes the configuration kernels/configs.py serves it on the GPU's target."""
    for dim, forward, weight_grad in [(128, "forward resident 1x256", "dW resident 1x256"),
                                      (512, "forward resident 2x256", "dW resident 2x256"),
                                      (1024, "forward streamed 64/128", "dW streamed 64/128")]:
        assert model.sass_label(90, "forward+dX", dim) == forward
        assert model.sass_label(90, "dW", dim) == weight_grad
        assert model.streams_d(H100, COUNTS, "dW", dim) == (dim > 512)
    assert model.sass_label(80, "forward+dX", 512) == "forward streamed 64/128"


# --- what is printed --------------------------------------------------------------------------


def test_every_printed_prediction_is_labelled_and_shows_each_term():
    out = model.table("H100", 1024, 512, [100_000, 1_000_000], "bf16").splitlines()
    tables = [i for i, line in enumerate(out) if line.startswith("| C |")]
    assert len(tables) == 2
    for start in tables:
        assert out[start].startswith("| C | backend | predicted ms |")
        for term in ("FLOP ms", "HBM ms", "L2 ms", "issue ms", "serial ms", "launch ms", "binds"):
            assert f"| {term} |" in out[start] + " |"
        above = [line for line in out[:start] if line.strip()]
        assert any(line.startswith("PREDICTED") for line in above[-3:]), out[start]
    assert out[0].startswith("PREDICTED")
    rows = [line for line in out if line.startswith("| 1") and "| triton |" in line]
    assert any("m64n32k16 SS" in line and "m64n256k16 RS" in line for line in rows)
    summary = [line for line in out[tables[0] + 2:tables[1]] if line.startswith("|")]
    assert {line.split("|")[2].strip() for line in summary} == set(model.predict_backends(
        H100, 1024, 1_000_000, 512, "bf16", COUNTS))


def test_the_flash_kernels_are_modelled_from_their_own_counts():
    """The flash rows take their compiled kernels' counts, tiles and occupancy."""
    predictions = model.predict_backends(H100, 1024, 1_000_000, 512, "bf16", COUNTS)
    assert set(predictions) == {"triton", "cuda", "cuda-as-built"}
    flash = predictions["triton"].kernels
    assert by_name(flash, "forward + dX").counts == "SASS of 'forward resident 2x256 bf16'"
    assert by_name(flash, "dW").counts == "SASS of 'dW resident 2x256 bf16'"
    assert by_name(flash, "dW").flops == 6 * 1024 * 1_000_000 * 512


def test_predict_keeps_the_interface_the_gpu_session_reads():
    predicted = model.predict(H100, 1024, 100_000, 512, "bf16")
    for provider in ("triton", "cuda"):
        total, kernels = predicted[provider]
        assert total > 0 and all(isinstance(name, str) and seconds >= 0 for name, seconds in kernels)
        assert model.AS_BUILT[provider] in predicted
    assert model.gpu_named("NVIDIA H100 80GB HBM3") == "H100"
    assert model.gpu_named("NVIDIA H200") == "H200"
    assert model.gpu_named("AMD EPYC (2 cores)") is None


def test_predictions_are_no_faster_than_the_matmul_floor():
    for classes in (100_000, 1_000_000):
        floor = model.floor_seconds(H100, 1024, classes, 512, "bf16")
        for prediction in model.predict_backends(H100, 1024, classes, 512, "bf16", COUNTS).values():
            assert prediction.seconds >= floor


def test_the_model_runs_without_triton_on_the_cached_counts():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from bench import model\n"
            "model.main(['--classes', '100000', '--no-kernels', '--from-sass'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "Triton is not installed: the cached counts are used" in out
    assert out.startswith("PREDICTED")


# --- the chunk size of the cuda backend -------------------------------------------------------


GPUS = [GpuShape(132, 50 * 2**20), GpuShape(108, 40 * 2**20), GpuShape(80, 6 * 2**20)]


def assert_shrinks_as_batch_and_dim_grow(chunk_classes, gpu, dtype):
    """A chunk function's classes never grow with the batch or with the embedding dimension."""
    for dim in (128, 512):
        sizes = [chunk_classes(gpu, b, dim, dtype) for b in (16, 128, 512, 1024, 4096, 16384)]
        assert sizes == sorted(sizes, reverse=True)
    for b in (128, 1024):
        sizes = [chunk_classes(gpu, b, d, dtype) for d in (64, 128, 512, 1024)]
        assert sizes == sorted(sizes, reverse=True)


def test_the_chunk_is_monotone_in_batch_dim_sms_and_l2():
    for gpu in GPUS:
        for dtype in ("bf16", "fp32"):
            assert_shrinks_as_batch_and_dim_grow(cuda_chunk_classes, gpu, dtype)
    for b, d in ((128, 512), (1024, 512), (4096, 128)):
        assert [cuda_chunk_classes(GpuShape(s, 50 * 2**20), b, d, "bf16") for s in (16, 64, 132)] == sorted(
            cuda_chunk_classes(GpuShape(s, 50 * 2**20), b, d, "bf16") for s in (16, 64, 132))
        assert [cuda_chunk_classes(GpuShape(132, m * 2**20), b, d, "bf16") for m in (6, 40, 50, 96)] == sorted(
            cuda_chunk_classes(GpuShape(132, m * 2**20), b, d, "bf16") for m in (6, 40, 50, 96))


def test_the_chunk_fills_the_gpu_and_otherwise_stays_in_l2():
    for gpu in GPUS:
        for b in (64, 128, 1024, 8192):
            for d in (128, 512):
                n = cuda_chunk_classes(gpu, b, d, "bf16")
                assert n % GEMM_TILE == 0 and n >= GEMM_TILE
                out_tiles = math.ceil(b / 128) * math.ceil(d / 128)
                ways = dx_split_ways(gpu, b, d)
                # the dX GEMM's tiles times its K splits, each SPLIT_K_DEPTH deep, fill one wave
                assert n >= ways * SPLIT_K_DEPTH
                assert out_tiles * ways > gpu.sms - out_tiles or out_tiles >= gpu.sms
                working = n * (b * 2 + d * 2 + d * 4)
                assert working <= gpu.l2_bytes or n == ways * SPLIT_K_DEPTH // GEMM_TILE * GEMM_TILE
    assert cuda_chunk_classes(GpuShape(132, 50 * 2**20), 1024, 512, "bf16") == 7680  # H100, ~8K classes
    assert cuda_chunk_classes(GPUS[0], 1024, 512, torch.bfloat16) == cuda_chunk_classes(GPUS[0], 1024, 512, "bf16")


def test_the_forwards_chunk_keeps_its_own_working_set_in_l2():
    """The forward's chunk: its B×n tile S (bfloat16 S for bfloat16 inputs, else float32) and n rows of
    W within L2_SHARE of L2, the most whole GEMM tiles that fit (at least one); monotone as the
    backward's, and no smaller than the backward's wherever L2 sizes that one (bfloat16, float32)."""
    for gpu in GPUS:
        for dtype, e, s in (("bf16", 2, 2), ("fp16", 2, 4), ("fp32", 4, 4)):
            for b in (16, 128, 1024, 8192):
                for d in (64, 128, 512, 1024):
                    n = cuda_forward_chunk_classes(gpu, b, d, dtype)
                    assert n % GEMM_TILE == 0 and n >= GEMM_TILE
                    budget = L2_SHARE * gpu.l2_bytes
                    assert n * (b * s + d * e) <= budget or n == GEMM_TILE
                    assert (n + GEMM_TILE) * (b * s + d * e) > budget
                    if dtype != "fp16":
                        backward = cuda_chunk_classes(gpu, b, d, dtype)
                        by_l2 = backward * (b * e + d * e + d * 4) <= budget
                        assert n >= backward or not by_l2
            assert_shrinks_as_batch_and_dim_grow(cuda_forward_chunk_classes, gpu, dtype)
    for b, d in ((128, 512), (1024, 512), (4096, 128)):
        sizes = [cuda_forward_chunk_classes(GpuShape(132, m * 2**20), b, d, "bf16") for m in (6, 40, 50, 96)]
        assert sizes == sorted(sizes)
        assert len({cuda_forward_chunk_classes(GpuShape(s, 50 * 2**20), b, d, "bf16") for s in (16, 64, 132)}) == 1
    h100 = GpuShape(132, 50 * 2**20)
    assert cuda_forward_chunk_classes(h100, 1024, 512, "bf16") == 12800  # 7680 backward
    assert cuda_forward_chunk_classes(h100, 1024, 512, torch.float16) == cuda_forward_chunk_classes(h100, 1024, 512,
                                                                                                  "fp16")
    assert cuda_forward_chunk_classes(h100, 1024, 512, torch.bfloat16) == 12800


def test_the_dx_gemm_splits_fill_the_gpu_each_deep_enough_and_divide_the_chunk():
    h100 = GpuShape(132, 50 * 2**20)
    assert cuda_dx_splits(h100, 1024, 512, 7680) == 4  # 32 output tiles, 4 ways of 1920 classes
    for gpu in GPUS:
        for b in (64, 1024, 8192):
            for d in (128, 512):
                for chunk in (128, 1024, 4096, cuda_chunk_classes(gpu, b, d, "bf16")):
                    ways = cuda_dx_splits(gpu, b, d, chunk)
                    assert 1 <= ways <= dx_split_ways(gpu, b, d)
                    assert ways == 1 or chunk // ways >= SPLIT_K_DEPTH
                    assert chunk % ways == 0  # csrc/driver.h splits a chunk's depth evenly

# --- the SASS reader --------------------------------------------------------------------------


CANNED = """
	code for sm_90a
		Function : some_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                /* 0x0 */
        /*0010*/              @P0 BRA 0x100 ;                                            /* 0x0 */
        /*0020*/                   FMUL R2, R3, R4 ;                                     /* 0x0 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;          /* 0x0 */
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;        /* 0x0 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0060*/              @!P1 BRA 0x30 ;                                            /* 0x0 */
        /*0070*/                   MUFU.EX2 R7, R8 ;                                     /* 0x0 */
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, R92, gdesc[UR4].tnspB, R24 ; /* 0x0 */
        /*0090*/                   ISETP.GE.AND P2, PT, R9, R10, PT ;                    /* 0x0 */
        /*00a0*/              @!P2 BRA 0x20 ;                                            /* 0x0 */
        /*00b0*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                 /* 0x0 */
        /*00c0*/                   EXIT ;                                                /* 0x0 */
        /*00d0*/                   BRA 0xd0;                                             /* 0x0 */
"""


def test_the_sass_reader_finds_nested_loops_and_matrix_shapes():
    assert len(sass.instructions(CANNED)) == 14
    (outer,) = sass.loops(CANNED)
    assert (outer.start, outer.end, outer.instructions) == (0x20, 0xA0, 9)
    (inner,) = outer.inner
    assert (inner.start, inner.end, inner.instructions) == (0x30, 0x60, 4)
    assert inner.mma == {"m64n64k16 SS": 2}
    assert outer.mma == {"m64n64k16 SS": 2, "m64n128k16 RS": 1}
    assert sass.mma_shape("HMMA.16816.F32.BF16 R4, R8, R12, R4") == "m16n8k16"
    assert sass.main_loop(CANNED) == {
        "tile_loop": {"instructions": 9, "mma": {"m64n128k16 RS": 1, "m64n64k16 SS": 2}},
        "inner_loops": [{"instructions": 4, "mma": {"m64n64k16 SS": 2}}],
        "epilogue": {"instructions": 5, "mma": {"m64n128k16 RS": 1}},
    }
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}; mma.sync.aligned.m16n8k16.row.col.f32"
    assert sass.ptx_mma_shapes(ptx) == {"mma m16n8k16": 1, "wgmma m64n64k16": 1}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton to compile")
def test_the_sass_reader_on_a_kernel_compiled_for_sm_90():
    """tests/sass_case.py's 64 × 32 dot over K in steps of 64, 4 warps, compiled for sm_90 without
    the interpreter: one loop of 4 HGMMA m64n32k16 SS."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "sass_case.py")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    read = json.loads(done.stdout)
    assert read["ptx_mma"] == {"wgmma m64n32k16": 4}
    assert read["tile_loop"]["mma"] == {"m64n32k16 SS": 4}
    assert read["inner_loops"] == [] and read["epilogue"]["mma"] == {"m64n32k16 SS": 4}
    assert 4 < read["tile_loop"]["instructions"] < 200
    assert read["registers"] > 0 and read["local_bytes"] == 0
