"""Max-pool of the numba backend.

Shapes: x and dx (N, C, H, W); y, dy and argmax (N, C, Ho, Wo), argmax holding the flat
index h*W + w of each window's winner. The U-Net's 2x2 stride-2 pooling has a kernel of
its own (kernels/cpu/pool.py).
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import pool as kernels
from ...kernels.cpu.runtime import run
from ..interface import PoolGeometry
from .scratch import contiguous


class MaxPool:
    """Max-pool forward with argmax, and its backward (mixed into NumbaBackend)."""

    def max_pool2d(self, x: np.ndarray, geometry: PoolGeometry
                   ) -> tuple[np.ndarray, np.ndarray]:
        x = contiguous(x)
        n, c, h, w = x.shape
        ho, wo = geometry.output_hw((h, w))
        y = np.empty((n, c, ho, wo), dtype=x.dtype)
        argmax = np.empty((n, c, ho, wo), dtype=np.int64)
        (kh, kw), (sh, sw) = geometry.kernel, geometry.stride
        (ph, pw), (dh, dw) = geometry.padding, geometry.dilation
        if (kh, kw, sh, sw, ph, pw, dh, dw) == (2, 2, 2, 2, 0, 0, 1, 1):
            run(kernels.max_pool2x2_forward, x.size, x, y, argmax)
        else:
            run(kernels.max_pool2d_forward, x.size, x, kh, kw, sh, sw, ph, pw, dh, dw, y,
                argmax)
        return y, argmax

    def max_pool2d_backward(self, dy: np.ndarray, argmax: np.ndarray,
                            input_shape: tuple[int, ...],
                            geometry: PoolGeometry | None = None) -> np.ndarray:
        dx = np.empty(input_shape, dtype=dy.dtype)
        run(kernels.max_pool2d_backward, dx.size, contiguous(dy), contiguous(argmax), dx)
        return dx
