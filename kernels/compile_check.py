"""Compile the kernels for a GPU target ahead of time, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they compile:
types, layouts and register allocation only meet the real compiler on a GPU. This compiles the
forward, backward and projection kernels with their default GPU launch configurations
(configs.py) to a cubin for a target (default sm_90, Hopper) through Triton's own toolchain
(LLVM, bundled ptxas), with the alignment hints a real launch gets (16-byte aligned pointers;
D, strides and the split size divisible by 16), and prints ptxas's register and spill counts.

    python -m marginfused.kernels.compile_check [--arch 90] [--dtype bf16 fp16 fp32]

Must run without TRITON_INTERPRET set (the kernels are defined as interpreted functions then);
exits non-zero if any compile fails.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
ALIGNED_INTS = {"D", "stride_x", "stride_w", "stride_v", "classes_per_split"}


def _signature(fn, types: dict, constexprs: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in types:
            raise KeyError(f"compile_check: no type for argument {name!r} of {fn.__name__}")
        signature[name] = types[name]
        if types[name].startswith("*") or name in ALIGNED_INTS:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile(fn, types: dict, constexprs: dict, tiles, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(fn, types, constexprs)
    source = ASTSource(fn, signature, constexprs, attrs)
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_report(kernel, arch: int) -> str:
    """ptxas -v's register and spill lines for the kernel's entry function, if a ptxas is at hand."""
    import triton

    found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*")))
    if not found:
        return "(no ptxas found)"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(kernel.asm["ptx"])
    try:
        for ptxas in reversed(found):  # the newest (ptxas-blackwell) reads the newest PTX
            run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", handle.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            return "(ptxas -v failed)"
    finally:
        os.unlink(handle.name)
    lines, current = [], ""
    for line in run.stderr.splitlines():
        if "Compiling entry function" in line or "Function properties for" in line:
            current = line.split("'")[1] if "'" in line else line.rsplit(" ", 1)[-1].strip()
        if current == kernel.name and ("registers" in line or "spill" in line):
            lines.append(line.split(":", 1)[-1].strip())
    return "; ".join(lines)


def check(arch: int, dtypes, report: bool) -> int:
    from . import configs
    from .backward import grad_kernel
    from .forward import row_partials_kernel
    from .project import project_kernel

    failures = 0
    for dtype in dtypes:
        element = TYPES[dtype]
        torch_name = "torch.float32" if dtype == "fp32" else "torch.half"
        precision = "ieee" if dtype == "fp32" else "tf32"
        scalars = dict(B="i32", C_local="i32", D="i32", stride_x="i32", stride_w="i32", class_start="i64",
                       classes_per_split="i32", batch_bucket="i32", scale="fp32", ignore_index="i32",
                       target_weight="fp32", smoothing_per_class="fp32")
        pointers = dict(x_ptr=f"*{element}", w_ptr=f"*{element}", y_ptr="*i64", inv_x_ptr="*fp32",
                        inv_w_ptr="*fp32", grad_scale_ptr="*fp32", target_logit_ptr="*fp32",
                        target_slope_ptr="*fp32", max_ptr="*fp32", sumexp_ptr="*fp32", logit_sum_ptr="*fp32",
                        best_cos_ptr="*fp32", best_class_ptr="*i64", row_max_ptr="*fp32", log_sumexp_ptr="*fp32",
                        grad_rows_ptr="*fp32", dx_part_ptr="*fp32", dw_acc_ptr="*fp32")
        types = {**scalars, **pointers}
        forward_tiles = configs.FORWARD_GPU[configs._width(torch_name)]
        backward_tiles = configs.BACKWARD_GPU[configs._width(torch_name)]
        project_tiles = configs.PROJECT_GPU
        jobs = [
            (f"forward  {dtype}", row_partials_kernel, types,
             dict(DOT_PRECISION=precision, BLOCK_B=forward_tiles.block_b, BLOCK_C=forward_tiles.block_c,
                  BLOCK_D=forward_tiles.block_d), forward_tiles),
            (f"backward {dtype}", grad_kernel, types,
             dict(NEED_DX=True, NEED_DW=True, DOT_PRECISION=precision, BLOCK_B=backward_tiles.block_b,
                  BLOCK_C=backward_tiles.block_c, BLOCK_D=backward_tiles.block_d), backward_tiles),
            (f"project  {dtype}", project_kernel,
             dict(g_ptr="*fp32", v_ptr=f"*{element}", out_ptr=f"*{element}", R="i32", D="i32", stride_v="i32",
                  n_parts="i32"),
             dict(BLOCK_R=project_tiles.block_b, BLOCK_D=project_tiles.block_d), project_tiles),
        ]
        for label, fn, signature_types, constexprs, tiles in jobs:
            try:
                kernel = _compile(fn, signature_types, constexprs, tiles, arch)
            except Exception as error:  # report every failure, then exit non-zero
                failures += 1
                print(f"FAILED {label}: {type(error).__name__}: {error}", flush=True)
                continue
            detail = _ptxas_report(kernel, arch) if report else ""
            print(f"ok     {label}  smem={kernel.metadata.shared}  {detail}", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marginfused.kernels.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    parser.add_argument("--dtype", nargs="+", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--no-report", action="store_true", help="skip ptxas -v register/spill counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels would be interpreted functions)")
        return 2
    return 1 if check(args.arch, args.dtype, not args.no_report) else 0


if __name__ == "__main__":
    sys.exit(main())
