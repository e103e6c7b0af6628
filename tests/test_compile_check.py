"""The compile check (kernels/compile_check.py): every kernel compiled for every GPU target on a
machine without one, and the check's proof that it reads what it claims.

The buffer rule (kernels/rings.py) is checked twice: on TTGIR texts written here, whose answers
follow from the rule's derivation (copies ahead + iterations whose buffers are still read at the
refill), and on kernels of its own that Triton compiles (tests/compile_check_cases.py): a tile
that also feeds register math, unrolled sibling loops whose rings differ in depth under the same
value names, a ring deeper than the kernel's num_stages. Compiling needs TRITON_INTERPRET unset (the
kernels would be interpreted functions), so those run in a subprocess without it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marginfused.kernels import compile_check, ttgir
from marginfused.kernels.rings import pipelined_rings, short

HERE = Path(__file__).parent


def _without_the_interpreter(args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


def test_what_the_compiler_emits_passes_on_every_target():
    """What the interpreter cannot check: every kernel, in every dtype, compiles (LLVM, ptxas) for
    sm_80, sm_86, sm_89, sm_90, sm_100 and sm_120 with its configuration for that target, and the
    cubin has no spills or stack, shared memory within the target's limit, every pipelined ring as
    deep as its loop needs and no atomic; the forward and backward kernels also in their
    negative-logit-rule and sub-centre variants. Each line names the ptxas that built it."""
    pytest.importorskip("triton")
    run_ = _without_the_interpreter(["-m", "marginfused.kernels.compile_check"])
    assert run_.returncode == 0, run_.stdout + run_.stderr
    lines = run_.stdout.splitlines()
    assert lines[0].startswith("compile check: triton "), run_.stdout
    passed = [line for line in lines if line.startswith("ok ")]
    expected = sum(len(compile_check.jobs(compile_check.DTYPES, arch)) for arch in compile_check.TARGETS)
    assert len(passed) == expected, run_.stdout  # every configuration of every kernel, dtype and target
    assert all(" ptxas " in line for line in passed), run_.stdout


@pytest.fixture(scope="module")
def compiled():
    """The check's reports on tests/compile_check_cases.py's kernels, by case."""
    pytest.importorskip("triton")
    run_ = _without_the_interpreter([str(HERE / "compile_check_cases.py")], cwd=HERE.parent)
    assert run_.returncode == 0, run_.stdout + run_.stderr
    return json.loads(run_.stdout.splitlines()[-1])


def _by_loop(case: dict) -> list[list[tuple[int, int]]]:
    """(buffers, needed) of each ring, grouped by loop in the order the loops are printed."""
    loops = sorted({ring["loop"] for ring in case["rings"]})
    return [[(r["buffers"], r["needed"]) for r in case["rings"] if r["loop"] == loop] for loop in loops]


def test_a_tile_that_also_feeds_register_math_is_one_buffer_short_on_hopper(compiled):
    """triton #6691: the left operand of a wgmma also squared in registers gets num_stages − 1
    buffers, while its wgmma stays in flight at the refill (pendings = 1): 2 copies ahead + 1 still
    read = 3 needed. The same kernel is sound with the tile only in the dot, and on sm_80, where
    mma.sync reads the tile into registers before the refill (2 needed: the copies ahead)."""
    assert _by_loop(compiled["dot sm_90"]) == [[(3, 3), (3, 3)]]
    assert compiled["dot sm_90"]["problems"] == []
    racy = compiled["dot+squares sm_90"]
    assert sorted(_by_loop(racy)[0]) == [(2, 3), (3, 3)]
    assert [p for p in racy["problems"] if "2 buffers, 3 needed" in p] == racy["problems"] != []
    assert compiled["dot+squares sm_80"]["instruction"] == "mma.sync"
    assert _by_loop(compiled["dot+squares sm_80"]) == [[(2, 2), (2, 2)]]
    assert compiled["dot+squares sm_80"]["problems"] == []


@pytest.mark.parametrize("arch, depths", [(90, [4, 3, 2]), (100, [4, 3, 2]), (80, [3, 2, 1])], ids=str)
def test_unrolled_sibling_loops_are_read_each_with_its_own_rings(compiled, arch, depths):
    """Three unrolled loops print the same value names; loop s runs over s + 2 stages. Each loop's
    rings are read from its own region: on Hopper and Blackwell s + 2 buffers (s + 1 copies ahead
    + 1 dot in flight), on Ampere s + 1 (the copies ahead), each exactly what its loop needs."""
    case = compiled[f"siblings sm_{arch}"]
    assert case["unread"] == [] and case["problems"] == []
    assert sorted(_by_loop(case), reverse=True) == [[(depth, depth)] * 2 for depth in depths]


def test_a_ring_deeper_than_num_stages_is_needed_in_full(compiled):
    """The kernel compiles with num_stages = 3; its last loop runs over 4 stages: 3 copies ahead
    and a wgmma in flight need all 4 of its buffers (a rule reading num_stages would ask for 3)."""
    last = _by_loop(compiled["siblings sm_90"])[-1]
    assert last == [(4, 4), (4, 4)]


def test_a_racy_sibling_loop_is_the_one_flagged(compiled):
    """The middle loop's left operand also feeds register math: its ring, and no other, is short
    (2 buffers, 3 needed), though all three loops print the same names."""
    case = compiled["siblings racy sm_90"]
    loops = _by_loop(case)
    assert sorted(loops[0]) == [(2, 2), (2, 2)] and sorted(loops[2]) == [(4, 4), (4, 4)]
    assert sorted(loops[1]) == [(2, 3), (3, 3)]
    assert len(case["problems"]) == 1 and "2 buffers, 3 needed" in case["problems"][0]


@pytest.mark.parametrize("found", ["fenced", "relaxed"])
def test_atomics_are_reported(compiled, found):
    """An atomic add with the default acq_rel semantics is fenced, one with sem="relaxed" is not;
    both fail the check."""
    case = compiled[f"atomic {found}"]
    assert case["atomics"] == found
    assert case["problems"] == [f"{found} atomics"]


SIBLINGS = """
module {
  tt.func @kernel(%n: i32) {
    %c0 = arith.constant 0 : i32
    %a = scf.for %i = %c0 to %n step %n iter_args(%s = %c0) -> (i32) : i32 {
      %x = arith.addi %s, %i : i32
      scf.yield %x : i32
    } loc(#loc1)
    %b = scf.for %i = %c0 to %n step %n iter_args(%s = %c0) -> (i32) : i32 {
      %x = arith.muli %s, %i : i32
      scf.yield %x : i32
    } loc(#loc2)
    %y = arith.addi %a, %b : i32
    tt.return
  }
}
"""


def test_names_resolve_in_the_region_that_defines_them():
    """Two sibling loops define %i, %s and %x: each loop's uses are its own definitions, and the
    loops' results are seen after them."""
    module = ttgir.parse(SIBLINGS)
    loops = [op for op in ttgir.walk(module) if op.name == "scf.for"]
    yields = [loop.regions[0].operations[-1] for loop in loops]
    assert [y.operands[0].owner.name for y in yields] == ["arith.addi", "arith.muli"]
    for loop, body_op in zip(loops, (y.operands[0].owner for y in yields)):
        assert [v.owner for v in body_op.operands] == [loop.regions[0]] * 2
    after = [op for op in ttgir.walk(module) if op.name == "arith.addi"][-1]
    assert [v.owner for v in after.operands] == loops


def test_a_name_used_outside_its_region_is_an_error():
    text = SIBLINGS.replace("%y = arith.addi %a, %b", "%y = arith.addi %x, %b")
    with pytest.raises(ValueError, match="%x is used where no definition of it is visible"):
        ttgir.parse(text)


MEMDESC = "!ttg.memdesc<64x64xbf16, #shared, #smem, mutable>"


def _pipelined_loop(body: list[str], yielded: str = "%acc", buffers: int = 3) -> str:
    """A loop over a ring of `buffers` buffers with two copies issued before it (P = 2): in
    iteration i, %read is the buffer of slot i, %write that of slot i + 2; the body yields
    `yielded` as the next %acc."""
    ring = f"!ttg.memdesc<{buffers}x64x64xbf16, #shared, #smem, mutable>"
    prologue = [line for slot in (0, 1) for line in (
        f"    %slot{slot} = ttg.memdesc_index %ring[%c{slot}_i32] : {ring} -> {MEMDESC}",
        f"    %copy{slot} = ttg.async_copy_global_to_local %src, %slot{slot} : tensor<64x64x!tt.ptr<bf16>>")]
    return "\n".join([
        "module {",
        "  tt.func @kernel(%src: tensor<64x64x!tt.ptr<bf16>>, %D: i32, %acc0: tensor<64x64xf32>) {",
        "    %c0_i32 = arith.constant 0 : i32",
        "    %c1_i32 = arith.constant 1 : i32",
        "    %c-1_i32 = arith.constant -1 : i32",
        f"    %cN = arith.constant {buffers} : i32",
        f"    %ring = ttg.local_alloc : () -> {ring}",
        *prologue,
        "    %out:3 = scf.for %i = %c0_i32 to %D step %c1_i32 iter_args(%acc = %acc0, %w = %c1_i32, %r = %c-1_i32)"
        " -> (tensor<64x64xf32>, i32, i32) : i32 {",
        "      %w1 = arith.addi %w, %c1_i32 : i32",
        "      %w_wraps = arith.cmpi sge, %w1, %cN : i32",
        "      %w_next = arith.select %w_wraps, %c0_i32, %w1 : i32",
        "      %r1 = arith.addi %r, %c1_i32 : i32",
        "      %r_wraps = arith.cmpi sge, %r1, %cN : i32",
        "      %r_next = arith.select %r_wraps, %c0_i32, %r1 : i32",
        f"      %read = ttg.memdesc_index %ring[%r_next] : {ring} -> {MEMDESC}",
        f"      %write = ttg.memdesc_index %ring[%w_next] : {ring} -> {MEMDESC}",
        *[f"      {line}" for line in body],
        f"      scf.yield {yielded}, %w_next, %r_next : tensor<64x64xf32>, i32, i32",
        "    }",
        "    tt.return",
        "  }",
        "}",
    ])


REFILL = "%copy = ttg.async_copy_global_to_local %src, %write : tensor<64x64x!tt.ptr<bf16>>"
LOAD = f"%tile = ttg.local_load %read : {MEMDESC} -> tensor<64x64xbf16>"


def _wgmma(pendings: int) -> list[str]:
    """A wgmma on this iteration's buffer and its wait, which yields the accumulator as %waited#0."""
    return [f"%dot = ttng.warp_group_dot %read, %read, %acc {{inputPrecision = 0 : i32, isAsync = true}} : {MEMDESC}",
            f"%waited:2 = ttng.warp_group_dot_wait %dot, %read {{pendings = {pendings} : i32}} : tensor<64x64xf32>"]


@pytest.mark.parametrize("pendings", [0, 1, 2])
@pytest.mark.parametrize("refill_first", [False, True], ids=["refill after the dot", "refill before the dot"])
def test_a_wgmma_ring_needs_the_copies_ahead_and_the_dots_in_flight(pendings, refill_first):
    """buffers ≥ P + W, + 1 where the refill comes before the dot: with the refill after the wait,
    the W wgmmas issued last still read their buffers; before the dot, this iteration's dot is
    still to read its buffer, besides the W in flight since the iterations before."""
    body = [REFILL, *_wgmma(pendings)] if refill_first else [*_wgmma(pendings), REFILL]
    (ring,), unread = pipelined_rings(_pipelined_loop(body, yielded="%waited#0"))
    assert unread == []
    assert (ring.ahead, ring.needed) == (2, 2 + pendings + refill_first)


@pytest.mark.parametrize("read_first, needed", [(True, 2), (False, 3)], ids=["read, then refill", "refill, then read"])
def test_a_synchronous_read_needs_only_the_copies_ahead_when_it_comes_first(read_first, needed):
    """A `ttg.local_load` is done with its buffer when it returns: read before the refill, the
    refilled buffer is the one read this iteration (P buffers); read after it, this iteration's
    buffer is still to be read (P + 1)."""
    (ring,), unread = pipelined_rings(_pipelined_loop([LOAD, REFILL] if read_first else [REFILL, LOAD]))
    assert unread == [] and ring.needed == needed


def test_a_shallow_ring_is_short():
    """Two buffers, two copies ahead and a wgmma in flight at the refill: one too few."""
    rings, _ = pipelined_rings(_pipelined_loop([*_wgmma(1), REFILL], yielded="%waited#0", buffers=2))
    assert [(ring.buffers, ring.needed) for ring in short(rings)] == [(2, 3)]
    assert "2 buffers, 3 needed" in rings[0].describe()


def test_a_ring_used_by_an_unknown_operation_is_not_passed():
    rings, unread = pipelined_rings(_pipelined_loop([f"%odd = ttg.some_new_reader %read : {MEMDESC}", REFILL]))
    assert rings == [] and len(unread) == 1 and "ttg.some_new_reader" in unread[0].reason


def test_a_slot_index_that_is_no_counter_is_not_passed():
    text = _pipelined_loop([REFILL, LOAD]).replace("%ring[%r_next]", "%ring[%i]")
    rings, unread = pipelined_rings(text)
    assert rings == [] and len(unread) == 1 and "no counter" in unread[0].reason
