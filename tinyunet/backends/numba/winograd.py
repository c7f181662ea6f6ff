"""The Winograd paths of the numba backend: F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2016).

Shapes: x (N, C, H, W); w (O, C, 3, 3); y and dy (N, O, Ho, Wo) with Ho, Wo multiples
of the output tile m (2 or 4); alpha = m + 2. Per band of tile rows: the input
transform writes v (alpha^2, C, tiles), alpha^2 GEMMs multiply the transformed filters
(alpha^2, O, C) with it, and the output transform turns the product back into y. The
transforms are the kernels of kernels/cpu/winograd.py; the GEMMs run in blas.gemm.
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import gemm
from ...kernels.cpu import winograd as kernels
from ...kernels.cpu.runtime import run
from . import blas, policy
from .scratch import ScratchBuffers

# Channel rows that a band's transformed tiles and products have beyond the layer's
# channels, never read. Without them the alpha^2 runs a transform writes together lie
# C * span floats apart, a multiple of 4 KiB on power-of-two layers, and all map to the
# same few cache sets; a spare row spreads them.
WINOGRAD_SPARE_ROWS = 1

# G of F(2x2, 3x3) and of F(4x4, 3x3), by output tile and dtype. F(2x2)'s entries are
# 0, +-1/2 or 1, so its float32 matrix is exact; F(4x4)'s 1/6, 1/12 and 1/24 are
# rounded, which the filter transform's error absorbs.
_WINOGRAD_G = {
    tile: {np.dtype(t): np.array(g, dtype=t) for t in (np.float32, np.float64)}
    for tile, g in (
        (2, [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
        (4, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
    )
}


class WinogradConvs(ScratchBuffers):
    """Winograd convs (mixed into NumbaBackend)."""

    def _winograd_filters(self, w, tile, adjoint=False):
        """The filters' Winograd transforms G g G^T as (alpha^2, O, C), alpha = tile + 2
        (kernels.winograd_filters), a fresh array (see scratch.py).

        With ``adjoint``: those of the input gradient's conv, whose filter (c, o) is
        w[o, c] rotated by 180 degrees, as a (alpha^2, C, O) view.
        """
        o, c = w.shape[:2]
        filters = np.empty(((tile + 2) ** 2, o, c), dtype=w.dtype)
        run(kernels.winograd_filters, filters.size, w.reshape(o, c, 9),
            _WINOGRAD_G[tile][w.dtype], adjoint, filters)
        return filters.transpose(0, 2, 1) if adjoint else filters

    def _winograd_bands(self, x, tile, padding, output_hw, c_out, band_bytes):
        """Yield (first_row, v, m) per band of tile rows of a Winograd conv of x.

        v (alpha^2, C + WINOGRAD_SPARE_ROWS, span) holds the band's transformed input
        tiles in its first C channel rows; m is a scratch (alpha^2, c_out +
        WINOGRAD_SPARE_ROWS, span) array for the band's other GEMM operand or product,
        likewise. Both live in reused buffers, so each band must be consumed before the
        next. Bands keep v and m within ``band_bytes``, spare rows aside. F(4x4)'s input
        transform pads x as it reads it; F(2x2)'s reads a padded copy (in "columns"; v
        is in "gradient", m in "product").
        """
        n, c = x.shape[:2]
        th, tw = output_hw[0] // tile, output_hw[1] // tile
        values = (tile + 2) ** 2
        if tile == 4:
            top, left = padding[0], padding[2]

            def transform(first, v):
                run(kernels.winograd4_input_tiles, v.size, x, top, left, th, tw, first, v)
        else:
            padded = self._padded(x, padding)

            def transform(first, v):
                run(kernels.winograd2_input_tiles, v.size, padded, first, v)
        per_row = values * max(c, c_out) * tw * x.itemsize
        rows = max(1, min(n * th, band_bytes // per_row))
        c_rows, o_rows = c + WINOGRAD_SPARE_ROWS, c_out + WINOGRAD_SPARE_ROWS
        tiles = self._buffer(x.dtype, values * c_rows * rows * tw, "gradient")
        product = self._buffer(x.dtype, values * o_rows * rows * tw, "product")
        for first in range(0, n * th, rows):
            span = min(rows, n * th - first) * tw
            v = tiles[: values * c_rows * span].reshape(values, c_rows, span)
            transform(first, v)
            yield first, v, product[: values * o_rows * span].reshape(values, o_rows, span)

    def _conv2d_winograd(self, x, filters, tile, padding, relu_bias, y, band_bytes):
        """y = a 3x3 stride-1 conv of x as Winograd F(tile x tile, 3x3), band by band of
        tile rows: input transform, alpha^2 GEMMs with the transformed filters
        (alpha^2, O, C), output transform with relu(y + relu_bias[o]) unless relu_bias
        is None."""
        c, o = x.shape[1], y.shape[1]
        output_tiles = getattr(kernels, f"winograd{tile}_output_tiles")
        relu = relu_bias is not None
        bias = relu_bias if relu else np.zeros(o, dtype=x.dtype)
        for first, v, m in self._winograd_bands(x, tile, padding, y.shape[2:], o, band_bytes):
            blas.gemm(filters, v[:, :c], m[:, :o])
            run(output_tiles, m.size, m, first, bias, relu, y)

    def _grad_weight_winograd(self, dy, x, tile, padding, band_bytes):
        """dW of a 3x3 stride-1 conv through Winograd F(tile x tile, 3x3): the adjoint of
        the forward's steps. Per band, dU (alpha^2, O, C) += (A dY A^T) @ (B^T d B)^T,
        alpha^2 GEMMs; then dW = G^T dU G (kernels.winograd_filter_gradient)."""
        o, c = dy.shape[1], x.shape[1]
        if not len(dy):
            return np.zeros((o, c, 3, 3), dtype=dy.dtype)  # no bands: nothing to sum
        gradient_tiles = getattr(kernels, f"winograd{tile}_gradient_tiles")
        total_du = np.empty(((tile + 2) ** 2, o, c), dtype=dy.dtype)
        for first, v, dm in self._winograd_bands(x, tile, padding, dy.shape[2:], o,
                                                 band_bytes):
            run(gradient_tiles, dm.size, dy, first, dm)
            if policy.use_stacked_gram(o, c, dm.shape[2]):
                run(gemm.stacked_gram, dm.size + v.size, dm, v, first > 0, total_du)
            else:
                blas.gemm(dm[:, :o], v[:, :c].transpose(0, 2, 1), total_du,
                          accumulate=first > 0)
        dw = np.empty((o, c, 3, 3), dtype=dy.dtype)
        run(kernels.winograd_filter_gradient, total_du.size, total_du,
            _WINOGRAD_G[tile][dy.dtype], dw.reshape(o, c, 9))
        return dw
