"""The direct 3x3 paths of the numba backend: 3x3 stride-1 convs of few channels.

Shapes: x (N, C, H, W); w (O, C, 3, 3); y and dy (N, O, Ho, Wo). The kernels
(kernels/cpu/direct3x3.py) read zero-padded copies, made here in scratch buffers, and
do the arithmetic themselves, where an im2col GEMM would be skinny. The input gradient
is the same forward kernel on the adjoint conv (see backend.py).
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import direct3x3 as kernels
from .scratch import ScratchBuffers, flipped


class DirectConvs(ScratchBuffers):
    """Direct 3x3 convs (mixed into NumbaBackend)."""

    def _conv2d_direct(self, x, w, geometry, y):
        """y = the 3x3 stride-1 conv of x, from a padded copy of x."""
        kernels.conv3x3_forward(self._padded(x, geometry.padding), w, y)

    def _grad_weight_direct(self, dy, x, geometry):
        """dW (O, C, 3, 3) from a padded dy (rows as long as the padded input's)."""
        dw = np.zeros((dy.shape[1], x.shape[1], 3, 3), dtype=dy.dtype)
        kernels.conv3x3_grad_weight(self._padded(dy, (1, 1, 1, 1), "gradient"),
                                    self._padded(x, geometry.padding), dw)
        return dw

    def _grads_direct_same(self, dy, x, w):
        """(dx, dW) of a 3x3 'same' conv whose two gradients both go direct. Its input
        gradient is a 3x3 'same' conv of dy, so the two kernels read one padded dy."""
        padded_dy = self._padded(dy, (1, 1, 1, 1), "gradient")
        dx = np.empty(x.shape, dtype=dy.dtype)
        kernels.conv3x3_forward(padded_dy, flipped(w), dx)
        dw = np.zeros(w.shape, dtype=dy.dtype)
        kernels.conv3x3_grad_weight(padded_dy, self._padded(x, (1, 1, 1, 1)), dw)
        return dx, dw
