"""Output arrays reused across training steps, without a free() call from their users.

Every step of a training loop asks for the same shapes in the same order: conv outputs,
their gradients, pooling indexes. Fresh multi-MB numpy arrays come from the C
allocator, which hands memory back to the OS between steps, so each step pays a page
fault per 4 KiB again (measured on the training step of benchmarks config A: about
5,000 faults a step, and a step 6% faster with none).

An ``ArrayPool`` keeps every array it has handed out. An array is free again once
nothing outside the pool refers to it: no Tensor, no graph node, no user variable and
no view (a view of a view refers to the array that owns the memory, so one reference
count covers them all). ``empty`` returns a free array of the exact shape and dtype
asked for, or a new one.
"""

from __future__ import annotations

import sys

import numpy as np


def _references(array) -> int:
    return sys.getrefcount(array)


def _calibrate() -> int:
    """What ``_references`` gives for an array that only a pool list holds, called from
    a ``for array in arrays`` loop as the pool calls it: measured, since what the call
    and the loop add to the count depends on the interpreter version."""
    held = [np.empty(1)]
    for array in held:
        return _references(array)
    raise AssertionError("unreachable")


_UNUSED = _calibrate()


class ArrayPool:
    """Uninitialised arrays like ``np.empty``, reused once their users have dropped them."""

    def __init__(self):
        self._arrays: dict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = {}

    def empty(self, shape, dtype) -> np.ndarray:
        key = (tuple(int(s) for s in shape), np.dtype(dtype))
        arrays = self._arrays.setdefault(key, [])
        for array in arrays:
            if _references(array) == _UNUSED:
                return array
        self._release_if_mostly_idle(np.prod(key[0], dtype=np.int64) * key[1].itemsize)
        array = np.empty(key[0], dtype=key[1])
        arrays.append(array)
        return array

    def _release_if_mostly_idle(self, wanted_bytes):
        """Drop the unused arrays when they outweigh the used ones and this request.

        In a training loop every shape is already pooled after the first step, so this
        runs only when shapes change (another batch size, an evaluation pass); it keeps
        the pool within about twice what is in use.
        """
        idle = used = 0
        for arrays in self._arrays.values():
            for array in arrays:
                if _references(array) == _UNUSED:
                    idle += array.nbytes
                else:
                    used += array.nbytes
        if idle > used + wanted_bytes:
            for arrays in self._arrays.values():
                kept = []
                for array in arrays:
                    if _references(array) != _UNUSED:
                        kept.append(array)
                arrays[:] = kept

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool, in use or not."""
        return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)
