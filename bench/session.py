"""The stages of the GPU session, one function each; bench/gpu_session.sh runs every stage in a
process of its own, under its own time limit, its output going to a file under $OUT as it is
printed.

    python -m bench.session STAGE [--dry-run] [--extension-status N]

Each stage prints what it found and ends with one line, `STATUS: <word> — <detail>`: ok; partial
(some of it could not run here, and the detail says what); skipped (nothing ran, and why); failed.
It exits 1 when failed, else 0. `--dry-run` runs every stage on the CPU at tiny shapes, Triton
under its interpreter, so that the session is exercised on a machine without a GPU (the test
suite runs it): what could not run there says so, never "ok".

The test selections (stages 4 and 5) are what fits the session's time: each distinct Triton
specialisation — kernel, dtype, variant (plain, negative-logit rule, K sub-centres), and the
integer arguments' divisibility by 16 or equality to 1, which the shapes decide — is compiled
once, for seconds, on the GPU machine. Stage 4's selection compiles about 100 of them (the
contract subset's 60, counted by their launch keys under the interpreter; about 40 more for the
GPU-marked tests' shapes), three quarters of them the forward and the two backward kernels, the
rest norms and projection. With pytest-xdist (on the GPU machine) four processes compile them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.utils.cpp_extension import CUDA_HOME

from marginfused.backends import REGISTRY, extension
from marginfused.kernels import compile_check as kernel_check

from . import micro, model, worker
from .providers import PEERS, make_loss, unavailable_reason
from .timing import kernel_times_ms

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """Where the session runs and the shapes it measures."""

    device: torch.device
    dry_run: bool
    dtype: str  # of the timings (stage 7); the microbenchmarks are bf16
    batch: int
    dim: int
    classes: tuple[int, ...]
    eager_up_to: int  # the largest C at which eager torch is timed
    repeats: int
    matmul_n: int
    hbm_bytes: int  # the buffer of the HBM probe, which no cache holds


GPU = Plan(torch.device("cuda"), False, "bf16", 1024, 512, (100_000, 1_000_000, 4_000_000), 1_000_000,
           repeats=10, matmul_n=8192, hbm_bytes=2**30)
DRY_RUN = Plan(torch.device("cpu"), True, "fp32", 16, 32, (100, 1000), 100,
               repeats=2, matmul_n=256, hbm_bytes=2**26)
"""The dry run's timings are in float32: the interpreter refuses bfloat16 (triton issue #11584)."""

CPU_CACHE_BYTES = 2**20
"""The dry run's stand-in for L2: a buffer a CPU core's cache plausibly holds."""
REREADS = 64
"""Reads of the L2 probe's buffer in its one kernel."""

OPTIONAL_PACKAGES = ("liger-kernel", "cut-cross-entropy", "pytorch-metric-learning", "pytest-xdist", "pytest-timeout",
                     "hypothesis", "matplotlib", "tqdm", "ninja", "numpy")

TEST_OPTIONS = ["-q", "-rfEs", "-p", "no:cacheprovider", "--timeout", "120"]
TRITON_GPU_TESTS = ["tests/test_triton.py", "-m", "gpu", "-k", "not auto_picks"]
"""The GPU-marked tests of the triton backend: every margin in both gradient modes, sub-centres and
the negative-logit rules, each in fp32, fp16 and bf16, at 300 × 5003 × 200 with the GPU tiles.
The one of backend="auto" runs in stage 5: it asks after every backend, and the cuda extension
may still be building."""
TRITON_CONTRACT = [
    "tests/test_triton.py::test_every_output_element_is_written",
    "tests/test_triton.py::test_class_ids_past_two_to_the_31",
    "tests/test_contract.py::test_every_margin_and_gradient_mode",
    "tests/test_contract.py::test_low_precision_inputs[triton-arcface-fp16]",
    "tests/test_contract.py::test_low_precision_inputs[triton-arcface-bf16]",
    "tests/test_contract.py::test_adaptive_margins_and_negative_logit_rules",
    "tests/test_contract.py::test_negative_logit_rules_in_low_precision",
    "tests/test_contract.py::test_subcenters",
    "tests/test_contract.py::test_subcenters_in_low_precision",
    "tests/test_contract.py::test_shapes_that_break_tiling",
    "tests/test_contract.py::test_fp16_unit_embeddings_against_small_centres",
    "tests/test_contract.py::test_a_float16_zero_row_does_not_reach_the_other_gradient",
    "tests/test_contract.py::test_rows_of_norm_near_the_float32_limits",
    "tests/test_determinism.py",
    "tests/test_large_index.py",
    "-k", "triton and not 37x1031x96",
]
"""The triton backend's share of the contract on the tensors' device: every margin and gradient
mode, fp16 and bf16, the adaptive margins and negative-logit rules, 1–3 sub-centres, the shapes
that break tiling (the large one left to the GPU-marked tests' larger shapes: it takes the
interpreter 14 s), float16 with small centres and zero rows (the fp16 lift), rows of norm 3e38 and
1e-38, every output element written, class ids past 2³¹, bit-identical reruns, and
class centres past 2³¹ elements (GPU-marked)."""
CUDA_GPU_TESTS = ["tests/test_cuda_backend.py", "tests/test_triton.py::test_gpu_auto_picks_triton_for_cuda_tensors",
                  "-m", "gpu"]
CUDA_CONTRACT = ["tests/test_contract.py", "tests/test_determinism.py", "tests/test_large_index.py", "-k", "cuda"]
"""The whole contract for the cuda backend (its kernels are compiled once, not per shape)."""


class Status(NamedTuple):
    word: str  # ok, partial, skipped or failed
    detail: str


def _without_a_gpu(plan: Plan) -> Status | None:
    if plan.dry_run or torch.cuda.is_available():
        return None
    return Status("failed", "no CUDA GPU is visible (run with --dry-run on a machine without one)")


def _run(command: list[str], env: dict | None = None) -> tuple[int, str]:
    """Run `command` in the repository, its output passed through; (exit code, last line)."""
    print("$ " + shlex.join(command), flush=True)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    last = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        last = line.strip() or last
    return process.wait(), last


def _pytest(plan: Plan, selection: list[str], collect_only: bool = False) -> tuple[int, str]:
    parallel = ["-n", "4"] if not plan.dry_run and importlib.util.find_spec("xdist") else []
    collect = ["--collect-only"] if collect_only else []
    return _run([sys.executable, "-m", "pytest", *TEST_OPTIONS, *parallel, *collect, *selection])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(plan: Plan) -> Status:
    """nvidia-smi, versions, the GPU's properties, nvcc, the optional packages and peers."""
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
          f"python {platform.python_version()}; {platform.platform()}; {os.cpu_count()} CPUs")
    smi = shutil.which("nvidia-smi")
    if smi:
        _run([smi])
    else:
        print("nvidia-smi: not found (no NVIDIA driver on this machine)")
    triton = _version("triton")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        l2_mb = getattr(props, "L2_cache_size", 0) / 2**20
        described = (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{l2_mb:.0f} MiB L2, {props.total_memory / 2**30:.1f} GiB")
        print(f"GPU: {described}; shared memory per SM "
              f"{getattr(props, 'shared_memory_per_multiprocessor', '?')} B, registers per SM "
              f"{getattr(props, 'regs_per_multiprocessor', '?')}")
    else:
        described = ""
        print("GPU: none visible to torch")
    candidates = ([Path(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []) + [Path(shutil.which("nvcc") or "")]
    nvcc = next((str(path) for path in candidates if path.name == "nvcc" and path.exists()), None)
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"nvcc: {nvcc}: {version[-1] if version else '?'}; torch's CUDA_HOME: {CUDA_HOME}")
    else:
        print(f"nvcc: not found (torch's CUDA_HOME: {CUDA_HOME}; none on the PATH)")
    print("packages: " + ", ".join(f"{name} {_version(name)}" for name in OPTIONAL_PACKAGES))
    for peer in PEERS:
        print(f"peer {peer}: {unavailable_reason(peer, plan.device) or 'available'}")
    if plan.dry_run:
        return Status("partial", "no GPU here: no nvidia-smi, no device properties" if not smi
                      else "a dry run, with the GPU hidden")
    return Status("ok", described)


def extension_build(plan: Plan) -> Status:
    """Build (or load from the cache) the cuda extension; in the dry run also the cpu one."""
    print(f"build cache: {extension.build_root()}")
    reasons = {}
    for kind in ("cuda", "cpu") if plan.dry_run else ("cuda",):
        began = time.monotonic()
        reasons[kind] = extension.unavailable_reason(kind)
        took = time.monotonic() - began
        print(f"{kind}: " + (f"built or loaded in {took:.0f} s" if reasons[kind] is None
                              else f"not built ({took:.0f} s): {reasons[kind]}"), flush=True)
    if plan.dry_run:
        cpu = "cpu extension built" if reasons["cpu"] is None else f"cpu extension not built: {reasons['cpu']}"
        return Status("partial", f"{cpu}; cuda extension not: {reasons['cuda']}")
    return Status("ok", "cuda extension built") if reasons["cuda"] is None else Status("failed", reasons["cuda"])


def compile_check(plan: Plan) -> Status:
    """`python -m marginfused.kernels.compile_check` for the device's own target (sm_90 in the dry
    run, bf16 only), without the interpreter."""
    if plan.dry_run:
        arch, dtypes, workers = 90, ["bf16"], 2
    else:
        major, minor = torch.cuda.get_device_capability(0)
        arch, dtypes, workers = 10 * major + minor, list(kernel_check.DTYPES), min(8, os.cpu_count() or 1)
    if arch not in kernel_check.TARGETS:
        return Status("skipped", f"sm_{arch} is not among the compile check's targets {sorted(kernel_check.TARGETS)}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code, last = _run([sys.executable, "-m", "marginfused.kernels.compile_check", "--arch", str(arch),
                       "--dtype", *dtypes, "--workers", str(workers)], env)
    what = f"sm_{arch}, {' '.join(dtypes)}" + (" (the dry run compiles one dtype, for sm_90, with no GPU)"
                                                if plan.dry_run else "")
    return Status("ok", what) if code == 0 else Status("failed", f"{what}: exit {code}: {last}")


def _test_status(plan: Plan, runs: dict[str, tuple[int, str]], skipped_without_gpu: str) -> Status:
    detail = "; ".join(f"{name}: {last}" for name, (_, last) in runs.items())
    if any(code != 0 for code, _ in runs.values()):
        return Status("failed", detail)
    if plan.dry_run:
        return Status("partial", f"{skipped_without_gpu} were skipped (no GPU), the rest ran under "
                                 f"TRITON_INTERPRET=1 at CPU shapes; {detail}")
    return Status("ok", detail)


def triton_tests(plan: Plan) -> Status:
    """The GPU-marked triton tests, then the triton backend's contract subset."""
    runs = {"GPU-marked": _pytest(plan, TRITON_GPU_TESTS), "contract subset": _pytest(plan, TRITON_CONTRACT)}
    return _test_status(plan, runs, "the GPU-marked tests (and the 2³¹-element one)")


def cuda_tests(plan: Plan, extension_status: int) -> Status:
    """The cuda backend's GPU-marked tests and its contract, if stage 2 built the extension; else
    only collected, so that the selections are known to exist."""
    if plan.dry_run:
        reason = f"the dry run runs no GPU test (and here the cuda extension: {extension.unavailable_reason('cuda')})"
    elif extension_status != 0:
        reason = f"stage 2 did not build the cuda extension (exit {extension_status}; see its output)"
    else:
        reason = extension.unavailable_reason("cuda")
    if reason is not None:
        counts = [_pytest(plan, selection, collect_only=True) for selection in (CUDA_GPU_TESTS, CUDA_CONTRACT)]
        if any(code != 0 for code, _ in counts):
            return Status("failed", f"a selection does not collect: {'; '.join(last for _, last in counts)}")
        return Status("skipped", f"{reason}; the selections collect: {'; '.join(last for _, last in counts)}")
    runs = {"GPU-marked": _pytest(plan, CUDA_GPU_TESTS), "contract": _pytest(plan, CUDA_CONTRACT)}
    return _test_status(plan, runs, "the GPU-marked tests")


def microbench(plan: Plan) -> Status:
    """bf16 matmul rates (square, and the cuda backend's chunk GEMMs) and the L2 and HBM probes,
    beside what bench/model assumes."""
    device, bf16 = plan.device, torch.bfloat16
    gpu = model.GPUS[_model_gpu(plan)]
    rate = micro.matmul_tflops(device, bf16, plan.matmul_n)
    print(f"matmul bf16 {plan.matmul_n}³: {rate:.4g} TFLOP/s "
          f"(bench/model assumes {model.MATMUL_EFFICIENCY:.0%} of {gpu.bf16_tflops:g} for the {gpu.name})",
          flush=True)
    print(f"the cuda backend's GEMMs at its chunk shape (B = {plan.batch}, D = {plan.dim}, "
          f"n = {extension.chunk_size(device, plan.batch, plan.dim, bf16)} classes, a walk of {micro.CHUNKS} chunks):")
    for name, tflops in micro.chunk_gemm_tflops(device, bf16, plan.batch, plan.dim).items():
        print(f"  {name}: {tflops:.4g} TFLOP/s", flush=True)
    if device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        cached, where = l2 // 4, f"a quarter of the {l2 / 2**20:.0f} MiB L2"
    else:
        cached, where = CPU_CACHE_BYTES, "a stand-in for L2 on the CPU"
    reread = micro.reread_gbs(device, cached, REREADS)
    print(f"L2 probe: a {cached / 2**20:.1f} MiB buffer ({where}) read {REREADS} times over in one kernel: "
          f"{reread:.4g} GB/s (bench/model assumes {gpu.l2_tbps:g} TB/s for the {gpu.name})", flush=True)
    read, copy = micro.reread_gbs(device, plan.hbm_bytes, 1), micro.copy_gbs(device, plan.hbm_bytes)
    print(f"HBM probe: a {plan.hbm_bytes / 2**20:.0f} MiB buffer read {read:.4g} GB/s, copied {copy:.4g} GB/s "
          f"(read + write; bench/model assumes {gpu.hbm_tbps:g} TB/s for the {gpu.name})", flush=True)
    if plan.dry_run:
        return Status("partial", "the CPU at tiny shapes: not a GPU's rates")
    return Status("ok", f"matmul bf16 {rate:.0f} TFLOP/s")


def _model_gpu(plan: Plan) -> str:
    """The GPU of bench/model to predict for: this one, or the H100 where it has none."""
    name = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else ""
    return model.gpu_named(name) or "H100"


def _unavailable(provider: str, plan: Plan) -> str | None:
    backend = REGISTRY[provider]
    return backend.unavailable_reason() or backend.unsupported_reason(plan.device.type, worker.DTYPES[plan.dtype])


def _time_point(plan: Plan, provider: str, classes: int) -> dict:
    """Times, working memory (GPU) and kernel times of one provider at one C, in this process."""
    x, w, y = worker.draw_inputs(plan.batch, classes, plan.dim, plan.dtype, plan.device.type)
    loss_fn = make_loss(provider, "arcface")
    point = worker.forward_backward_ms(loss_fn, x, w, y, plan.repeats)
    if plan.device.type == "cuda":
        point["working_mb"] = worker.working_mb(loss_fn, x, w, y)
    point["kernels"] = kernel_times_ms(lambda: loss_fn(x, w, y).backward(), plan.device)
    return point


def timings(plan: Plan) -> Status:
    """Forward, backward and forward+backward of triton, cuda and eager torch (to `eager_up_to`) at
    B × D × C, the time of each kernel and the working memory, bench/model's PREDICTED times
    beside them."""
    gpu_key = _model_gpu(plan)
    print(f"B = {plan.batch}, D = {plan.dim}, {plan.dtype}, ArcFace; times: median of {plan.repeats} forward+backward "
          f"calls, each marked between forward and backward; kernels: one profiled call "
          f"({'device time' if plan.device.type == 'cuda' else 'CPU self time per operator'}); "
          f"PREDICTED: bench/model for the {model.GPUS[gpu_key].name}, not a measurement")
    providers, notes = [], []
    for provider in ("triton", "cuda", "torch"):
        reason = _unavailable(provider, plan)
        if reason is None:
            providers.append(provider)
        else:
            print(f"{provider}: unavailable: {reason}")
            notes.append(f"{provider} unavailable")
    rows = []
    for classes in plan.classes:
        predicted = model.predict(model.GPUS[gpu_key], plan.batch, classes, plan.dim, plan.dtype)
        for provider in providers:
            if provider == "torch" and classes > plan.eager_up_to:
                continue
            try:
                point = _time_point(plan, provider, classes)
            except torch.OutOfMemoryError:
                point = None
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            built = model.AS_BUILT.get(provider, provider)
            rows.append(_print_point(provider, classes, point, predicted.get(provider),
                                     predicted.get(built) if built != provider else None))
    print("\n| C | provider | fwd ms | bwd ms | fwd+bwd ms | working MB | PREDICTED fwd+bwd ms "
          "| PREDICTED as built ms |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if plan.dry_run:
        notes.append(f"the CPU at tiny shapes, {plan.dtype}, triton under TRITON_INTERPRET=1, no memory measured")
        return Status("partial", "; ".join(notes))
    return Status("ok" if not notes else "partial", "; ".join(notes) or f"{len(rows)} points")


def _print_point(provider: str, classes: int, point: dict | None, predicted: tuple | None,
                 as_built: tuple | None = None) -> str:
    """Print one point's measurements and predictions (of the design bench/model describes, and
    of the code as built where they differ); its row of the final table."""
    forecast = f"{predicted[0] * 1e3:.4g}" if predicted else "-"
    built = f"{as_built[0] * 1e3:.4g}" if as_built else "-"
    if point is None:
        print(f"C = {classes} {provider}: OOM", flush=True)
        return f"| {classes} | {provider} | OOM | | | | {forecast} | {built} |"
    memory = f"{point['working_mb']:.1f}" if "working_mb" in point else "-"
    print(f"C = {classes} {provider}: fwd {point['fwd_ms']:.3f} ms, bwd {point['bwd_ms']:.3f} ms, "
          f"fwd+bwd {point['fwd_bwd_ms']:.3f} ms, working memory {memory} MB; PREDICTED fwd+bwd {forecast} ms "
          f"(as built: {built} ms)")
    for name, ms in list(point["kernels"].items())[:8]:
        print(f"    measured  {ms:9.4g} ms  {name[:100]}")
    for label, prediction in (("PREDICTED", predicted), ("PREDICTED as built", as_built)):
        for name, seconds in prediction[1] if prediction else ():
            print(f"    {label} {seconds * 1e3:9.4g} ms  {name}")
    sys.stdout.flush()
    return (f"| {classes} | {provider} | {point['fwd_ms']:.3f} | {point['bwd_ms']:.3f} | {point['fwd_bwd_ms']:.3f} "
            f"| {memory} | {forecast} | {built} |")


STAGES: dict[str, Callable[..., Status]] = {
    "environment": environment,
    "extension": extension_build,
    "compile-check": compile_check,
    "triton-tests": triton_tests,
    "cuda-tests": cuda_tests,
    "microbench": microbench,
    "timings": timings,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes")
    parser.add_argument("--extension-status", type=int, default=0,
                        help="stage 2's exit status (cuda-tests runs only after a successful build)")
    args = parser.parse_args(argv)
    plan = DRY_RUN if args.dry_run else GPU
    status = _without_a_gpu(plan)
    if status is None:
        extra = {"extension_status": args.extension_status} if args.stage == "cuda-tests" else {}
        status = STAGES[args.stage](plan, **extra)
    print(f"STATUS: {status.word} — {status.detail}", flush=True)
    return 1 if status.word == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
