"""The buffer rule of Triton's software pipeline, checked on what Triton built (its TTGIR).

The pipeline stages a loop's dot operands in *rings*: a ring is a `ttg.local_alloc` of N buffers
(`!ttg.memdesc<N x tile>`, allocated empty). Each iteration refills one buffer with an asynchronous
copy (`ttg.async_copy_global_to_local`, or a `ttg.local_store`) and reads another through a view of
one buffer (`ttg.memdesc_index %ring[%slot]`; `ttg.memdesc_subview %ring[%slot, 0, 0]` in older
Tritons). The slot is a loop-carried counter that advances by one (mod N) per iteration, so in
iteration i an index reads or writes the buffer of slot i + r (mod N), r its offset: the counter's
value on entry plus the increments the body applies before the index. The refill writes offset w,
the first read r₀: the copy runs w − r₀ iterations ahead of its read.

**The rule.** A refill may overwrite a buffer once nothing can still read it. When iteration i
issues the refill of slot i + w, the buffers still to be read hold the slots from r_min, the oldest
slot a reader may still read, up to i + w − 1 (copies in flight): w − r_min slots, and the refilled
one must be none of them. So, per loop and per ring,

    buffers ≥ w − r_min + 1 = (w − r₀) + (r₀ − r_min + 1)
            = (iterations the copies run ahead) + (iterations whose buffers are still read).

r_min, read per reader of the ring in the loop body:
- A synchronous reader (`ttg.local_load` into registers: the operands of an mma.sync dot on Ampere and
  Ada, of the FMA dot of float32, of any register math) is done with its buffer when it returns: one
  before the refill in the body may still read the next iteration's slot, r + 1; one after it its
  own, r. With every read before the refill (Triton's schedule: r₀ = 0, w = P, the P copies issued
  before the loop), r_min = 1 and buffers ≥ P: the buffer refilled was last read earlier in the same
  iteration (num_stages − 1 buffers for num_stages stages). Triton 3.9's prefetch of the next
  iteration's first k-slice into registers is a read of r + 1 after the refill: r_min stays 1.
- An asynchronous reader (a wgmma, `ttng.warp_group_dot {isAsync = true}`, on Hopper; a tcgen05 MMA,
  `ttng.tc_gen5_mma {is_async}`, on Blackwell) reads its buffers until it is retired: a
  `ttng.warp_group_dot_wait {pendings = k}` retires every wgmma but the k issued last; a
  `ttng.wait_barrier %bar, %phase deps %a, %b` waits for the MMA that signals %bar (or reads %a, %b),
  which completes after every MMA issued before it. Walking back from the refill over issues and retirements, every asynchronous
  reader still in flight reads r at its own iteration (r − 1 a loop iteration back). On Hopper, in
  Triton's schedule (wgmma, then its wait with pendings = W, then the refill), the W wgmmas issued
  last are in flight: r_min = 1 − W and buffers ≥ P + W; a refill before the dot meets the W
  wgmmas of the iterations before: r_min = −W, buffers ≥ P + W + 1. With W = 1, buffers ≥ num_stages:
  the extra buffer Triton gives a wgmma operand, and the one it loses when the operand tile also
  feeds register math (triton-lang/triton #6691: num_stages − 1 buffers, the wgmma still waited with
  pendings = 1).

The offsets come from the loop's counters, not from num_stages or from the copies issued before the
loop: a loop may run deeper than the kernel's num_stages (`tl.range(…, num_stages=…)`), and
Blackwell's pipeline peels the first MMA into the prologue (three copies before the loop, w = 3 and
r₀ = 1: two iterations ahead); the copies before the loop are counted only to confirm the distance
(w equals them). Each loop is read on its own, with names resolved by region (kernels/ttgir.py):
sibling loops (a sub-centre kernel's unrolled D loops) have their own rings. A buffer allocated from
a value inside the loop (`ttg.local_alloc %tile`) is a ring of one buffer that each iteration
rewrites. Triton 3.6 and 3.9 print the same operations for all of this; 3.9 also prefetches the
next iteration's first k-slice on Ampere (`ttg.memdesc_subslice` views carried around the loop).
Anything the rule cannot read (a slot index that is no counter, a distance other than the
prologue's, an unknown user of a ring) is reported, not passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from .ttgir import Operation, Region, Value, enclosing, parse, walk

SLOTS = ("ttg.memdesc_index", "ttg.memdesc_subview")
VIEWS = ("ttg.memdesc_subslice", "ttg.memdesc_trans", "ttg.memdesc_reinterpret", "ttg.memdesc_reshape")
WRITERS = ("ttg.async_copy_global_to_local", "ttg.local_store")
ASYNCHRONOUS_DOTS = {"ttng.warp_group_dot": "isAsync", "ttng.tc_gen5_mma": "is_async"}
RETIREMENTS = ("ttng.warp_group_dot_wait", "ttng.wait_barrier")
PASSIVE = ("scf.yield", "ttg.local_dealloc", *RETIREMENTS)
"""Users of a ring's buffer that neither read nor write it."""


class Unreadable(Exception):
    """The TTGIR does something the rule does not read."""


@dataclass(frozen=True)
class Ring:
    """A ring a loop refills, and what the rule asks of it."""

    name: str
    tile: str
    loop_line: int
    buffers: int
    ahead: int
    """Iterations the refill runs ahead of the first read, w − r₀."""
    held: int
    """Iterations whose buffers may still be read when the refill is issued, r₀ − r_min + 1."""

    @property
    def needed(self) -> int:
        return self.ahead + self.held

    def describe(self) -> str:
        return (f"ring {self.name} ({self.buffers}x{self.tile}) of the loop at TTGIR line {self.loop_line}: "
                f"{self.buffers} buffers, {self.needed} needed (copies {self.ahead} iterations ahead + the buffers "
                f"of {self.held} iteration(s) still read at the refill)")


@dataclass(frozen=True)
class Unread:
    """A loop the rule could not read, and why."""

    loop_line: int
    reason: str

    def describe(self) -> str:
        return f"the pipeline of the loop at TTGIR line {self.loop_line} cannot be read: {self.reason}"


@dataclass(frozen=True)
class Access:
    """A read or write of a ring's buffer at offset `offset`, at `position` in the loop body."""

    ring: Operation
    offset: int
    position: int


Key = tuple[Value, Optional[int]]
"""A value an asynchronous dot uses, and the iteration that defined it relative to the one that
uses it: 0 for a value the loop body defines (one per iteration), None for one defined outside."""


@dataclass(frozen=True)
class Issue:
    """An asynchronous dot issued at `position`: the buffers it reads, the values it uses, and
    whether it sits in a nested region (which may not run)."""

    position: int
    reads: tuple[Access, ...]
    uses: tuple[Key, ...]
    nested: bool


@dataclass(frozen=True)
class Retirement:
    """A wait at `position`: `pendings`, the dots a `ttng.warp_group_dot_wait` leaves in flight, or
    `awaited`, the barrier and buffers of the dot a `ttng.wait_barrier` waits for."""

    position: int
    pendings: Optional[int]
    awaited: tuple[Key, ...]


def is_ring(owner: Union[Operation, Region]) -> bool:
    """Whether a value's owner is a `ttg.local_alloc` allocated empty: buffers the pipeline fills."""
    return isinstance(owner, Operation) and owner.name == "ttg.local_alloc" and not owner.operands


def body(loop: Operation) -> Region:
    """The region an `scf.for` runs each iteration."""
    return loop.regions[0]


def _yielded(loop: Operation, argument: Value) -> Value:
    """What the loop's body yields for iteration argument `argument` (region argument 1 + k is
    iter_arg k; argument 0 is the induction variable)."""
    terminator = body(loop).operations[-1]
    if terminator.name != "scf.yield" or argument.index == 0:
        raise Unreadable(f"{argument.name} is not an iteration argument")
    return terminator.operands[argument.index - 1]


def _initial(loop: Operation, argument: Value) -> Value:
    """The value iteration argument `argument` takes on entry (scf.for's operands: lower bound,
    upper bound, step, then the initial values)."""
    return loop.operands[2 + argument.index]


def _steps(value: Value, loop: Operation) -> tuple[Value, int]:
    """(the loop's iteration argument a counter value is built on, the increments applied to it):
    `arith.addi %c, 1`, and its wrap `arith.select %wrapped, 0, %c` (or a remainder) at N."""
    owner = value.owner
    if isinstance(owner, Region):
        if owner is body(loop) and value.index > 0:
            return value, 0
        raise Unreadable(f"slot index {value.name} is no counter of the loop")
    if owner.name == "arith.addi":
        for counter, step in (owner.operands, owner.operands[::-1]):
            if _constant(step) == 1:
                argument, increments = _steps(counter, loop)
                return argument, increments + 1
    if owner.name == "arith.select" and _constant(owner.operands[1]) == 0:
        return _steps(owner.operands[2], loop)
    if owner.name in ("arith.remsi", "arith.remui"):
        return _steps(owner.operands[0], loop)
    raise Unreadable(f"slot index {value.name} (TTGIR line {owner.line}) is no counter of the loop")


def _constant(value: Value) -> Optional[int]:
    return value.owner.constant() if isinstance(value.owner, Operation) else None


def _offset(index: Value, loop: Operation) -> int:
    """r such that `index` is i + r (mod N) in iteration i: the counter's initial value plus its
    increments, the counter advancing by exactly one per iteration."""
    argument, increments = _steps(index, loop)
    start = _constant(_initial(loop, argument))
    if start is None:
        raise Unreadable(f"counter {argument.name} does not start from a constant")
    if _steps(_yielded(loop, argument), loop) != (argument, 1):
        raise Unreadable(f"counter {argument.name} does not advance by one per iteration")
    return start + increments


def _source(value: Value, loop: Operation, seen: frozenset = frozenset()) -> Optional[tuple[Value, int]]:
    """(the buffer view a value reads or writes, iterations it lags by): followed back through
    views, a wgmma wait's pass-through results and the loop's iteration arguments (a view carried
    from the iteration before lags by one); None where it comes from no buffer view."""
    owner = value.owner
    if isinstance(owner, Region):
        if owner is body(loop) and value.index > 0 and value not in seen:
            found = _source(_yielded(loop, value), loop, seen | {value})
            return None if found is None else (found[0], found[1] + 1)
        return None
    if owner.name in SLOTS and is_ring(owner.operands[0].owner):
        return value, 0
    if owner.name == "ttg.local_alloc" and owner.operands:
        return value, 0
    if owner.name in (*VIEWS, *SLOTS):
        return _source(owner.operands[0], loop, seen)
    if owner.name == "ttng.warp_group_dot_wait":
        return _source(owner.operands[value.index], loop, seen)
    return None


def _access(value: Value, loop: Operation, position: int, writing: bool = False) -> Optional[Access]:
    """The ring buffer `value` views, at its offset in the loop's iterations; None where it is no
    buffer of a ring this loop refills: a ring allocated inside the loop lives one iteration (the
    prologue of an inner loop), and a view indexed in an inner loop belongs to that loop. A ring of
    one buffer may be refilled through the view the prologue made (its index is the same in every
    iteration): that refill is for the iteration as many ahead as the prologue filled."""
    found = _source(value, loop)
    if found is None:
        return None
    view, lag = found
    definition = view.owner
    if definition.name == "ttg.local_alloc":
        return Access(definition, -lag, position) if enclosing(definition, "scf.for") is loop else None
    ring = definition.operands[0].owner
    if _inside(ring, loop) or (_inside(definition, loop) and enclosing(definition, "scf.for") is not loop):
        return None
    if enclosing(definition, "scf.for") is loop:
        return Access(ring, _offset(definition.operands[1], loop) - lag, position)
    if writing and _layout(ring)[0] == 1:
        return Access(ring, _prologue(ring, loop), position)
    raise Unreadable(f"{view.name}, a buffer of ring {ring.results[0].name} indexed before the loop, is used in it")


def _prologue(ring: Operation, loop: Operation) -> int:
    """P: the copies into `ring` issued before `loop`, in the region that holds it."""
    count = 0
    for operation in loop.parent.operations[:loop.parent.operations.index(loop)]:
        if operation.name in WRITERS:
            view = operation.operands[1].owner
            count += isinstance(view, Operation) and view.name in SLOTS and view.operands[0].owner is ring
    return count


def _inside(operation: Operation, loop: Operation) -> bool:
    """Whether `operation` is in the body of `loop`, at any depth."""
    owner = operation.parent.owner
    while owner is not None and owner is not loop:
        owner = owner.parent.owner
    return owner is loop


def _awaited(operation: Operation) -> list[Value]:
    """What a `ttng.wait_barrier %barrier, %phase … deps %a, %b` waits for: the barrier and the
    buffers after `deps`."""
    _, _, deps = operation.text.partition(" deps ")
    return [operation.operands[0], *operation.operands[len(operation.operands) - deps.split(":")[0].count("%"):]]


def _key(value: Value, loop: Operation, seen: frozenset = frozenset()) -> Key:
    """`value` as a dot or a wait uses it in iteration i: a loop iteration argument is the value
    the body yielded in iteration i − 1 (one more iteration back), a value the body defines is that
    iteration's (0), any other is the same in every iteration (None)."""
    owner = value.owner
    if isinstance(owner, Region) and owner is body(loop) and value.index > 0:
        if value in seen:
            return value, None
        carried, lag = _key(_yielded(loop, value), loop, seen | {value})
        return carried, None if lag is None else lag + 1
    defined = owner.owner if isinstance(owner, Region) else owner
    return value, 0 if defined is loop or (defined is not None and _inside(defined, loop)) else None


@dataclass
class _Body:
    """What a loop body does to ring buffers, in the order printed."""

    writes: list[Access]
    reads: list[Access]
    events: list[Union[Issue, Retirement]]


def _read_body(loop: Operation) -> _Body:
    """The ring buffers a loop body writes and reads, its asynchronous dots and its waits."""
    found = _Body([], [], [])
    for position, operation in enumerate(walk(body(loop))):
        nested = operation.parent is not body(loop)
        if operation.name in WRITERS:
            found.writes += filter(None, [_access(operation.operands[1], loop, position, writing=True)])
        elif operation.name == "ttg.local_alloc" and operation.operands and enclosing(operation, "scf.for") is loop:
            found.writes.append(Access(operation, 0, position))
        elif operation.name == "ttg.local_load":
            found.reads += filter(None, [_access(operation.operands[0], loop, position)])
        elif operation.name in ASYNCHRONOUS_DOTS:
            reads = tuple(filter(None, (_access(v, loop, position) for v in operation.operands[:2])))
            found.reads += reads
            if operation.attribute(ASYNCHRONOUS_DOTS[operation.name]) in ("", "true"):
                uses = tuple(_key(v, loop) for v in operation.operands)
                found.events.append(Issue(position, reads, uses, nested))
        elif operation.name == "ttng.warp_group_dot_wait" and not nested:
            found.events.append(Retirement(position, int(operation.attribute("pendings")), ()))
        elif operation.name == "ttng.wait_barrier" and not nested:
            found.events.append(Retirement(position, None, tuple(_key(v, loop) for v in _awaited(operation))))
    return found


def _at(key: Key, iteration: int) -> Key:
    """A key as seen from `iteration` iterations back of the refill."""
    value, lag = key
    return value, None if lag is None else iteration - lag


def _in_flight(events: list, write: Access, ring: Operation, iterations: int) -> list[int]:
    """Offsets (relative to the write's iteration) of `ring` that asynchronous dots still in flight
    when `write` is issued read, walking back over at most `iterations` iterations.

    A `warp_group_dot_wait {pendings = k}` leaves the k dots issued last in flight; a `wait_barrier`
    retires the dot that uses its barrier and buffers, and every dot before it. A dot in a nested
    region may not run: it is counted in no wait's k and matched to no barrier, and stays in flight
    until everything before a wait is retired; a wait in a nested region retires nothing."""
    allowance, awaited, offsets = math.inf, set(), []
    for back in range(iterations + 1):
        for event in reversed(events):
            if back == 0 and event.position >= write.position:
                continue
            if allowance == 0:
                return offsets
            if isinstance(event, Retirement):
                if event.pendings is not None:
                    allowance = min(allowance, event.pendings)
                awaited |= {_at(key, -back) for key in event.awaited}
                continue
            if not event.nested and awaited & {_at(key, -back) for key in event.uses}:
                return offsets
            offsets += [a.offset - back for a in event.reads if a.ring is ring]
            if not event.nested:
                allowance -= 1
    return offsets


def _check_users(loop: Operation, rings: set[Operation]) -> None:
    """Every user of a buffer of these rings in the loop is one the rule reads."""
    known = (*WRITERS, "ttg.local_load", *ASYNCHRONOUS_DOTS, *VIEWS, *SLOTS, *PASSIVE)
    for operation in walk(body(loop)):
        if operation.name in known or is_ring(operation):
            continue
        for operand in operation.operands:
            found = _source(operand, loop)
            if found is not None and _ring_of(found[0]) in rings:
                raise Unreadable(f"{operation.name} (TTGIR line {operation.line}) uses a buffer of a ring")


def _ring_of(view: Value) -> Operation:
    """The ring a buffer view (from `_source`) belongs to."""
    definition = view.owner
    return definition if definition.name == "ttg.local_alloc" else definition.operands[0].owner


def _layout(ring: Operation) -> tuple[int, str]:
    """(buffers, one buffer's shape and element type as "128x64xbf16") of a ring; an allocation
    from a value is one buffer."""
    dims, element = ring.memdesc_shape()
    if is_ring(ring):
        return dims[0], "x".join(map(str, dims[1:])) + "x" + element
    return 1, "x".join(map(str, dims)) + "x" + element


def _ring(ring: Operation, loop: Operation, found: _Body) -> Optional[Ring]:
    """The rule for one ring the loop refills; None when nothing in the loop reads it."""
    reads = [a for a in found.reads if a.ring is ring]
    writes = [a for a in found.writes if a.ring is ring]
    if is_ring(ring) and any(write.offset != _prologue(ring, loop) for write in writes):
        raise Unreadable(f"ring {ring.results[0].name} is refilled at another distance than the "
                         f"{_prologue(ring, loop)} copies issued before the loop")
    if not reads:
        return None
    buffers, tile = _layout(ring)
    first = min(a.offset for a in reads)
    ahead = held = 0
    for write in writes:
        after = [a.offset if a.position > write.position else a.offset + 1 for a in reads]
        oldest = min(after + _in_flight(found.events, write, ring, buffers + 1))
        if write.offset - oldest + 1 > ahead + held:
            ahead, held = write.offset - first, first - oldest + 1
    return Ring(ring.results[0].name, tile, loop.line, buffers, ahead, held)


def loop_rings(loop: Operation) -> list[Ring]:
    """The rule for every ring `loop` refills (raises Unreadable)."""
    found = _read_body(loop)
    rings = list(dict.fromkeys(a.ring for a in found.writes))
    _check_users(loop, set(rings))
    return list(filter(None, (_ring(ring, loop, found) for ring in rings)))


def pipelined_rings(ttgir: str) -> tuple[list[Ring], list[Unread]]:
    """Every ring of every loop in a kernel's TTGIR, and the loops the rule could not read."""
    rings, unread = [], []
    for operation in walk(parse(ttgir)):
        if operation.name != "scf.for":
            continue
        try:
            rings += loop_rings(operation)
        except Unreadable as reason:
            unread.append(Unread(operation.line, str(reason)))
    return rings, unread


def short(rings: Iterable[Ring]) -> list[Ring]:
    """The rings with fewer buffers than the rule needs."""
    return [ring for ring in rings if ring.buffers < ring.needed]
