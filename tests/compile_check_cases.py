"""Kernels of the compile check's own, compiled ahead of time and read by it: run as a script
without TRITON_INTERPRET (tests/test_compile_check.py does), it prints one JSON object, by case,
of the rings each kernel's loops refill and the problems the check reports.

- `dot_loop`: a pipelined dot over D; with SQUARES its left operand tile also feeds register math
  (the squared norms the kernels once took from their tiles: triton-lang/triton #6691).
- `sibling_loops`: three unrolled loops (tl.static_range, as `tiles.class_cos_tile` unrolls its K
  sub-centres), loop s pipelined over s + 2 stages, so their rings hold 2, 3 and 4 buffers under
  the same value names; with RACY = s, loop s's left operand also feeds register math.
- `atomic`: an atomic add, relaxed or with the default acq_rel fences.
"""

import json

import triton
import triton.language as tl

from marginfused.kernels.compile_check import compile_kernel, inspect


@triton.jit
def dot_loop(a_ptr, b_ptr, out_ptr, norms_ptr, D, SQUARES: tl.constexpr):
    rows = tl.arange(0, 64)
    acc = tl.zeros((64, 64), tl.float32)
    squares = tl.zeros((64,), tl.float32)
    for k in range(0, D, 64):
        a = tl.load(a_ptr + rows[:, None] * D + k + rows[None, :])
        b = tl.load(b_ptr + (k + rows[:, None]) * 64 + rows[None, :])
        acc = tl.dot(a, b, acc)
        if SQUARES:
            squares += tl.sum(a.to(tl.float32) * a.to(tl.float32), axis=1)
    tl.store(out_ptr + rows[:, None] * 64 + rows[None, :], acc)
    tl.store(norms_ptr + rows, squares)


@triton.jit
def sibling_loops(a_ptr, b_ptr, out_ptr, norms_ptr, D, RACY: tl.constexpr):
    rows = tl.arange(0, 64)
    total = tl.zeros((64, 64), tl.float32)
    squares = tl.zeros((64,), tl.float32)
    for s in tl.static_range(3):
        acc = tl.zeros((64, 64), tl.float32)
        for k in tl.range(0, D, 64, num_stages=s + 2):
            a = tl.load(a_ptr + s * 64 * D + rows[:, None] * D + k + rows[None, :])
            b = tl.load(b_ptr + (k + rows[:, None]) * 64 + rows[None, :])
            acc = tl.dot(a, b, acc)
            if RACY == s:
                squares += tl.sum(a.to(tl.float32) * a.to(tl.float32), axis=1)
        total += acc * (s + 1)
    tl.store(out_ptr + rows[:, None] * 64 + rows[None, :], total)
    tl.store(norms_ptr + rows, squares)


@triton.jit
def atomic(out_ptr, RELAXED: tl.constexpr):
    i = tl.arange(0, 64)
    if RELAXED:
        tl.atomic_add(out_ptr + i, 1.0, sem="relaxed")
    else:
        tl.atomic_add(out_ptr + i, 1.0)


DOT_TYPES = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", norms_ptr="*fp32", D="i32")
NUM_STAGES = 3
CASES = {
    "dot sm_90": (dot_loop, DOT_TYPES, dict(SQUARES=False), 90),
    "dot+squares sm_90": (dot_loop, DOT_TYPES, dict(SQUARES=True), 90),
    "dot+squares sm_80": (dot_loop, DOT_TYPES, dict(SQUARES=True), 80),
    "siblings sm_90": (sibling_loops, DOT_TYPES, dict(RACY=-1), 90),
    "siblings racy sm_90": (sibling_loops, DOT_TYPES, dict(RACY=1), 90),
    "siblings sm_80": (sibling_loops, DOT_TYPES, dict(RACY=-1), 80),
    "siblings sm_100": (sibling_loops, DOT_TYPES, dict(RACY=-1), 100),
    "atomic fenced": (atomic, dict(out_ptr="*fp32"), dict(RELAXED=False), 90),
    "atomic relaxed": (atomic, dict(out_ptr="*fp32"), dict(RELAXED=True), 90),
}


def main() -> None:
    out = {}
    for case, (fn, types, constexprs, arch) in CASES.items():
        report = inspect(compile_kernel(fn, types, constexprs, 4, NUM_STAGES, arch), case, arch, NUM_STAGES)
        out[case] = dict(
            rings=[dict(loop=r.loop_line, name=r.name, buffers=r.buffers, needed=r.needed) for r in report.rings],
            unread=[loop.describe() for loop in report.unread],
            problems=report.problems(), atomics=report.atomics, instruction=report.matrix_instruction)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
