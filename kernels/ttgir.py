"""Triton's TTGIR, as printed in `kernel.asm["ttgir"]`, read into a tree of operations whose
operands are the values they name.

MLIR prints a value's name once, where it is defined, and resolves a use against the regions
around it: a value is visible after its definition in its own region and in every region nested
there, and sibling regions may reuse a name (the printer numbers each region's values afresh, and
Triton names values after source variables, so the three unrolled D loops of a sub-centre kernel
define the same names). So names are resolved against a stack of scopes, one per open region, never
through one table of the whole function: a use inside the first of two sibling loops finds the first
loop's definition, not the second's. A name no open scope defines is an error, never a guess.

What is read of each line: the results it defines (`%x`, or `%x:3` for three results used as
`%x#0`…`%x#2`), the operation's name, the values it uses, the region arguments it declares
(`scf.for %i = … iter_args(%a = %init)`, a block's `^bb0(%a: f32)`, a function's `(%x_ptr: …)`),
and whether it opens or closes a region (a line ending in `{`, a line starting with `}`). Its
attributes and types stay as text for the reader (`Operation.text`). Locations (`loc(…)`) and
attribute aliases (`#blocked = …`) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

NAME = r"%[\w.$-]+"
RESULTS = re.compile(rf"^({NAME}(?::\d+)?(?:, {NAME}(?::\d+)?)*) = (.*)$")
REGION_ARGUMENT = re.compile(rf"({NAME}) = ")
TYPED_ARGUMENT = re.compile(rf"({NAME}):")
USE = re.compile(rf"{NAME}(?:#\d+)?")
CONSTANT = re.compile(r"^arith\.constant (-?\d+) : i\d+$")
MEMDESC = re.compile(r"!ttg\.memdesc<((?:\d+x)+)(\w+)")


@dataclass(eq=False)
class Value:
    """An SSA value: result `index` of `owner` (an Operation), or argument `index` of `owner` (a
    Region)."""

    name: str
    owner: Union["Operation", "Region"]
    index: int


@dataclass(eq=False)
class Region:
    """A region of `owner` (None for the text's top level): its arguments and operations."""

    owner: Optional["Operation"]
    arguments: list[Value] = field(default_factory=list)
    operations: list["Operation"] = field(default_factory=list)


@dataclass(eq=False)
class Operation:
    """One printed operation, in region `parent`, with the values it uses and defines and the
    regions it holds."""

    name: str
    text: str
    """The line from the operation's name on: operands, attributes, types."""
    line: int
    """1-based, in the TTGIR text."""
    parent: Region
    operands: list[Value] = field(default_factory=list)
    results: list[Value] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)

    def attribute(self, name: str) -> Optional[str]:
        """The value of attribute `name` (`{pendings = 1 : i32}` → "1"; a unit attribute such as
        `{is_async}` → ""), or None."""
        match = re.search(rf"[{{,]\s*{re.escape(name)}(?:\s*=\s*([\w.-]+)(?:\s*:\s*\w+)?)?\s*[,}}]", self.text)
        if match is None:
            return None
        return match.group(1) or ""

    def constant(self) -> Optional[int]:
        """The value of an integer `arith.constant`, else None."""
        match = CONSTANT.match(self.text)
        return int(match.group(1)) if match else None

    def memdesc_shape(self) -> Optional[tuple[tuple[int, ...], str]]:
        """(dimensions, element type) of the shared-memory descriptor this operation returns, the
        last `!ttg.memdesc<…>` of its line."""
        found = MEMDESC.findall(self.text)
        if not found:
            return None
        dims, element = found[-1]
        return tuple(int(d) for d in dims.rstrip("x").split("x")), element


def enclosing(operation: Operation, name: str) -> Optional[Operation]:
    """The innermost operation called `name` whose regions hold `operation`, or None."""
    owner = operation.parent.owner
    while owner is not None and owner.name != name:
        owner = owner.parent.owner
    return owner


def walk(region: Region) -> Iterator[Operation]:
    """Every operation in `region` and the regions nested in it, in the order printed."""
    for operation in region.operations:
        yield operation
        for inner in operation.regions:
            yield from walk(inner)


def _strip_location(line: str) -> str:
    """The line without a trailing `loc(…)` (which may nest parentheses)."""
    start = line.rfind(" loc(")
    while start >= 0:
        depth = 0
        for position in range(start + 4, len(line)):
            depth += {"(": 1, ")": -1}.get(line[position], 0)
            if depth == 0:
                if line[position + 1:].strip() == "":
                    return line[:start].rstrip()
                break
        start = line.rfind(" loc(", 0, start)
    return line.rstrip()


class _Reader:
    """Builds the tree line by line, with one scope of names per open region."""

    def __init__(self):
        self.top = Region(owner=None)
        self.regions: list[Region] = [self.top]
        self.scopes: list[dict[str, Value]] = [{}]

    def lookup(self, name: str, line: int) -> Value:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise ValueError(f"TTGIR line {line}: {name} is used where no definition of it is visible")

    def open_region(self, owner: Operation, arguments: list[str]) -> None:
        region = Region(owner=owner)
        owner.regions.append(region)
        self.regions.append(region)
        self.scopes.append({})
        self.declare(arguments)

    def close_region(self, line: int) -> None:
        if len(self.regions) == 1:
            raise ValueError(f"TTGIR line {line}: a region closes that was never opened")
        self.regions.pop()
        self.scopes.pop()

    def declare(self, arguments: list[str]) -> None:
        region = self.regions[-1]
        for name in arguments:
            value = Value(name, region, len(region.arguments))
            region.arguments.append(value)
            self.scopes[-1][name] = value

    def operation(self, results: str, text: str, line: int) -> Operation:
        name = text.split(" ", 1)[0].split("(", 1)[0].strip('"')
        operation = Operation(name=name, text=text, line=line, parent=self.regions[-1])
        self.regions[-1].operations.append(operation)
        declared = self._region_arguments(text)
        for use in USE.findall(text):
            if use not in declared:
                operation.operands.append(self.lookup(use, line))
        for group in filter(None, results.split(", ")):
            base, _, count = group.partition(":")
            names = [f"{base}#{i}" for i in range(int(count))] if count else [base]
            for result in names:
                value = Value(result, operation, len(operation.results))
                operation.results.append(value)
                self.scopes[-1][result] = value
        if text.endswith("{"):
            self.open_region(operation, declared)
        return operation

    @staticmethod
    def _region_arguments(text: str) -> list[str]:
        """Names an operation's line declares for its region: `%i = %lb to …`, `iter_args(%a =
        %x)` (scf.for, scf.while), or a function's `(%x_ptr: type)`."""
        if text.startswith(("tt.func", "func.func")):
            return TYPED_ARGUMENT.findall(text)
        return REGION_ARGUMENT.findall(text)

    def read_line(self, raw: str, line: int) -> None:
        text = _strip_location(raw).strip()
        if not text or text.startswith(("#", "//")):
            return
        if text.startswith("}"):
            self.close_region(line)
            if text.endswith("{"):
                self.open_region(self.regions[-1].operations[-1], [])
            return
        if text.startswith("^"):
            self.declare(TYPED_ARGUMENT.findall(text))
            return
        match = RESULTS.match(text)
        results, body = (match.group(1), match.group(2)) if match else ("", text)
        self.operation(results, body, line)


def parse(ttgir: str) -> Region:
    """The module of a TTGIR text as a tree: its top region holds the `module` operation."""
    reader = _Reader()
    for number, raw in enumerate(ttgir.splitlines(), start=1):
        reader.read_line(raw, number)
    if len(reader.regions) != 1:
        raise ValueError("TTGIR ends inside an open region")
    return reader.top
