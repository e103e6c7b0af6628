"""Numbers as users pass them: Python's ints and floats, and numpy's scalars, whose types are
registered with `numbers` (a numpy float32 is a numbers.Real, a numpy int64 a numbers.Integral).
Booleans are not numbers here, though Python counts them as ints."""

from __future__ import annotations

import numbers


def is_real(value: object) -> bool:
    """A real number of any of those types, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An integer of any of those types, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
