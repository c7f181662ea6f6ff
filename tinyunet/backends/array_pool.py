"""Output arrays reused across training steps, without a free() call from their users.

Every step of a training loop asks for the same shapes in the same order: conv outputs,
their gradients, pooling indexes. Fresh multi-MB numpy arrays come from the C
allocator, which hands memory back to the OS between steps, so each step pays a page
fault per 4 KiB again (measured on the training step of benchmarks config A: about
5,000 faults a step, and a step 6% faster with none).

An ``ArrayPool`` keeps every block of memory it has handed out, and hands out views of
them. A block is free again once nothing outside the pool refers to it: no Tensor, no
graph node, no user variable and no view (every view, and every view of a view, refers
to the array that owns the memory, so one reference count covers them all). ``empty``
returns a view of a free block of exactly the bytes asked for, or of a new block. Any
shape and dtype of that size can reuse a block (a conv output and a gradient, float32
maps and int64 pooling indexes), which keeps the pool near the peak of what is in use
at once.
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


def _view(block, nbytes, shape, dtype):
    """The first ``nbytes`` of ``block`` as an array of ``shape`` and ``dtype``."""
    return block.view(np.uint8)[:nbytes].view(dtype).reshape(shape)


class ArrayPool:
    """Uninitialised arrays like ``np.empty``, reused once their users have dropped them."""

    def __init__(self):
        self._blocks: dict[int, list[np.ndarray]] = {}

    def empty(self, shape, dtype) -> np.ndarray:
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        blocks = self._blocks.setdefault(nbytes, [])
        for block in blocks:
            if _references(block) == _UNUSED:
                return _view(block, nbytes, shape, dtype)
        self._release_if_mostly_idle(nbytes)
        # float64 blocks, so that a view of any dtype is aligned (rounded up to 8 bytes).
        block = np.empty(-(-nbytes // 8), dtype=np.float64)
        blocks.append(block)
        return _view(block, nbytes, shape, dtype)

    def _release_if_mostly_idle(self, wanted_bytes):
        """Drop the unused arrays when they outweigh the used ones and this request.

        In a training loop every shape is already pooled after the first step, so this
        runs only when shapes change (another batch size, an evaluation pass); it keeps
        the pool within about twice what is in use.
        """
        idle = used = 0
        for blocks in self._blocks.values():
            for block in blocks:
                if _references(block) == _UNUSED:
                    idle += block.nbytes
                else:
                    used += block.nbytes
        if idle > used + wanted_bytes:
            for blocks in self._blocks.values():
                kept = []
                for block in blocks:
                    if _references(block) != _UNUSED:
                        kept.append(block)
                blocks[:] = kept

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool, in use or not."""
        return sum(block.nbytes for blocks in self._blocks.values() for block in blocks)
