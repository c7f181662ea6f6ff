"""Scratch buffers reused across calls, and small array helpers of the numba backend.

Temporaries that scale with the maps (im2col columns, padded copies, GEMM products,
Winograd tiles) live in one buffer per (dtype, use), grown on demand and reused across
calls and steps, so each is allocated once and its pages fault in once. Those that scale
with a layer's weights (Winograd's transformed filters) are fresh arrays each call:
kept as scratch, the largest layer's would stay resident, and malloc reuses the block.
"""

from __future__ import annotations

import math

import numpy as np

from ...kernels.cpu import im2col
from ...kernels.cpu.runtime import run


def contiguous(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def flipped(w: np.ndarray) -> np.ndarray:
    """The weight (C, O, kH, kW) of the adjoint conv of w (O, C, kH, kW): each filter
    rotated by 180 degrees, input and output channels swapped."""
    return contiguous(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


class ScratchBuffers:
    """Scratch arrays by (dtype, use), in ``self._scratch``, and padded copies in them."""

    _scratch: dict[tuple[np.dtype, str], np.ndarray]

    def _buffer(self, dtype, size, use="columns"):
        """A reusable scratch array of ``size`` elements, valid until the next call for
        the same ``use``: "columns" (im2col columns, padded inputs), "product" (a GEMM's
        result before it is rearranged into the output, or Winograd's other GEMM
        operand) or "gradient" (a padded dy, or Winograd-transformed input tiles)."""
        key = (np.dtype(dtype), use)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=key[0])
            self._scratch[key] = buffer
        return buffer[:size]

    def _padded(self, x, padding, use="columns"):
        """x (N, C, H, W) in a zero border of ``padding`` (top, bottom, left, right).

        The copy lives in the scratch buffer ``use``, valid until its next call."""
        n, c, h, w = x.shape
        top, bottom, left, right = padding
        shape = (n, c, h + top + bottom, w + left + right)
        padded = self._buffer(x.dtype, math.prod(shape), use).reshape(shape)
        run(im2col.pad_images, padded.size, x, top, left, padded)
        return padded
