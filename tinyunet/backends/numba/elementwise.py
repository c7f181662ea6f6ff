"""Elementwise passes of the numba backend: ReLU, sigmoid, bias, one-channel Dice/IoU.

Shapes: ReLU and sigmoid take arrays of any shape (one flat pass); the bias passes y
and dy (N, C, H, W) with a bias (C,); the Dice/IoU passes z, t, p (N, ...), one sample a
row, with sums and coefficients (N, 1, ..., 1). Kernels: kernels/cpu/elementwise.py.
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import elementwise as kernels
from ...kernels.cpu.runtime import run
from .scratch import contiguous

# Elements of a sample's row per parallel step of the one-channel Dice/IoU gradient
# (elementwise.sigmoid_overlap_backward).
OVERLAP_BACKWARD_PIECE = 2048


class Elementwise:
    """Fused elementwise kernels (mixed into NumbaBackend)."""

    def relu(self, x: np.ndarray) -> np.ndarray:
        x = contiguous(x)
        y = np.empty(x.shape, dtype=x.dtype)
        run(kernels.relu_forward, x.size, x.reshape(-1), y.reshape(-1))
        return y

    def relu_backward(self, dy: np.ndarray, y: np.ndarray) -> np.ndarray:
        dy, y = contiguous(dy), contiguous(y)
        dx = np.empty(dy.shape, dtype=dy.dtype)
        run(kernels.relu_backward, dy.size, dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
        return dx

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        x = contiguous(x)
        y = np.empty(x.shape, dtype=x.dtype)
        run(kernels.sigmoid, x.size, x.reshape(-1), y.reshape(-1))
        return y

    def sigmoid_overlap_sums(self, z: np.ndarray, t: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        z, t = contiguous(z), contiguous(t).astype(z.dtype, copy=False)
        n = z.shape[0]
        p = np.empty(z.shape, dtype=z.dtype)
        sums = np.empty((n, 3), dtype=np.float64)
        run(kernels.sigmoid_overlap_sums, z.size, z.reshape(n, -1), t.reshape(n, -1),
            p.reshape(n, -1), sums)
        kept = (n,) + (1,) * (z.ndim - 1)
        s0, s1, s2 = (sums[:, k].astype(z.dtype).reshape(kept) for k in range(3))
        return p, s0, s1, s2

    def sigmoid_overlap_backward(self, p: np.ndarray, t: np.ndarray, slope: np.ndarray,
                                 offset: np.ndarray) -> np.ndarray:
        p, t = contiguous(p), contiguous(t)
        n = p.shape[0]
        dz = np.empty(p.shape, dtype=p.dtype)
        coefficients = [np.ascontiguousarray(np.broadcast_to(c, (n,) + (1,) * (p.ndim - 1)),
                                             dtype=p.dtype).reshape(n) for c in (slope, offset)]
        run(kernels.sigmoid_overlap_backward, p.size, p.reshape(n, -1), t.reshape(n, -1),
            *coefficients, OVERLAP_BACKWARD_PIECE, dz.reshape(n, -1))
        return dz

    def add_bias(self, y: np.ndarray, bias: np.ndarray) -> np.ndarray:
        y = contiguous(y)
        n, c = y.shape[:2]
        run(kernels.bias_add, y.size, y.reshape(n, c, -1), contiguous(bias))
        return y

    def relu_backward_bias_grad(self, dy: np.ndarray, y: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray]:
        dy, y = contiguous(dy), contiguous(y)
        n, c = dy.shape[:2]
        dz = np.empty(dy.shape, dtype=dy.dtype)
        db = np.empty(c, dtype=dy.dtype)
        run(kernels.relu_backward_channel_sums, dy.size, dy.reshape(n, c, -1),
            y.reshape(n, c, -1), dz.reshape(n, c, -1), db)
        return dz, db

    def bias_grad(self, dy: np.ndarray) -> np.ndarray:
        dy = contiguous(dy)
        n, c = dy.shape[:2]
        out = np.empty(c, dtype=dy.dtype)
        return run(kernels.channel_sums, dy.size, dy.reshape(n, c, -1), out)
