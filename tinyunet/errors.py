"""Errors that name the op and say what was expected and what arrived."""


class ShapeError(ValueError):
    """Bad input to an op: wrong rank, shape, dtype or argument value."""


def check(condition: bool, op: str, expect: str, actual: str) -> None:
    """Raise ``ShapeError`` reading "op: Expect: ... Actual: ..." unless ``condition``."""
    if not condition:
        raise ShapeError(f"{op}: Expect: {expect}. Actual: {actual}.")
