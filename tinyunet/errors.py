"""Errors that name the op and say what was expected and what arrived."""

from typing import NoReturn


class ShapeError(ValueError):
    """Bad input to an op: wrong rank, shape, dtype or argument value."""


def fail(op: str, expect: str, actual: str) -> NoReturn:
    """Raise ``ShapeError`` reading "op: Expect: ... Actual: ...".

    For checks on every step's path: ``if bad: fail(...)`` formats its message only
    when it raises, where ``check``'s arguments are formatted on every call (shapes,
    and numpy dtypes at about 2.5 us each)."""
    raise ShapeError(f"{op}: Expect: {expect}. Actual: {actual}.")


def check(condition: bool, op: str, expect: str, actual: str) -> None:
    """Raise ``ShapeError`` reading "op: Expect: ... Actual: ..." unless ``condition``."""
    if not condition:
        fail(op, expect, actual)
