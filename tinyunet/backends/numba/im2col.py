"""The im2col, row-shift and transposed-conv paths of the numba backend."""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import im2col as kernels
from ...kernels.cpu.runtime import run
from . import blas, policy
from .scratch import ScratchBuffers, _contiguous


def _im2col(x, n0, count, row0, rows, kernel_hw, geometry, wo, cols):
    """Columns of output rows [row0, row0 + rows) of ``count`` images (see im2col_rows)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, geometry.stride, geometry.dilation
    top, _, left, _ = geometry.padding
    if policy._is_2x2_stride2(kernel_hw, geometry):
        run(kernels.im2col_2x2_stride2, cols.size, x, n0, count, row0, rows, wo, cols)
    else:
        run(kernels.im2col_rows, cols.size, x, n0, count, row0, rows, kh, kw, sh, sw, top,
            left, dh, dw, wo, cols)


class Im2colConvs(ScratchBuffers):
    """Column-based convs of the numba backend (mixed into NumbaBackend)."""

    def _conv2d_gemms(self, x, w2, geometry, kernel_hw, y):
        """y = conv2d as im2col bands + one GEMM per band (see the module docstring)."""
        n, o, ho, wo = y.shape
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo)):
            if images > 1:
                # (O, images*pixels) -> (images, O, pixels): one wide GEMM, one small copy.
                wide = self._buffer(x.dtype, o * cols.shape[1], "product").reshape(o, -1)
                blas.gemm(w2, cols, wide)
                y[n0 : n0 + images] = wide.reshape(o, images, ho, wo).transpose(1, 0, 2, 3)
            else:
                band = y[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
                blas.gemm(w2, cols, band)

    def _transposed_columns(self, dy, w):
        """(N, C*kH*kW, Ho*Wo) = w^T @ dy per image: one batched GEMM (blas.gemm shares
        the images among the threads) into the scratch buffer. For a 2x2 stride-2
        transposed conv these columns are exactly the output's values, before the pixel
        shuffle."""
        n, o, ho, wo = dy.shape
        depth = w[0].size
        cols = self._buffer(dy.dtype, n * depth * ho * wo).reshape(n, depth, ho * wo)
        blas.gemm(w.reshape(o, depth).T, dy.reshape(n, o, ho * wo), cols)
        return cols

    def _grad_weight_row_shifts(self, dy, x, geometry, kernel_hw):
        """dW of a conv with row stride 1 from columns of the kernel's width only.

        Kernel row i sees the columns of ``_row_shift_bands`` shifted by i*dh rows, a
        plain column window, so dW[:, :, i, :] is one GEMM per i. That writes kH times
        fewer columns than im2col (measured 10-25% faster on the U-Net's 3x3 layers).
        """
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        dh = geometry.dilation[0]
        grad = np.zeros((kh, o, c * kw), dtype=dy.dtype)
        for cols, _, image, r0, rows in self._row_shift_bands(x, kernel_hw, geometry, (ho, wo),
                                                              batch_images=False):
            band = dy[image].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
            for i in range(kh):
                window = cols[:, i * dh * wo : i * dh * wo + rows * wo]
                blas.gemm(band, window.T, grad[i], accumulate=True)
        return np.ascontiguousarray(grad.reshape(kh, o, c, kw).transpose(1, 2, 0, 3))

    def _conv2d_row_shifts(self, x, w, geometry, y):
        """conv2d with row stride 1 from columns of the kernel's width only.

        One GEMM of the weight's kernel rows, stacked (kH*O, C*kW), with the columns of
        ``_row_shift_bands`` gives each kernel row's share of every output row; output
        row r sums kernel row i's share from column row r + i*dh (``row_shift_sum``). The
        columns are kH times fewer than im2col's and the GEMM kH times taller. Measured
        against im2col, alternating in one process, on the U-Nets' layers: 1.12-1.28x
        faster with O <= C on 32x32 and 64x64 maps (0.93-1.0x in two cases); 0.8x for
        64->128 on 32x32, whose kH*O-row product is too big to sum cheaply (so O > C keeps
        im2col); 0.91x on 16x16 maps, whose kH - 1 extra rows a band are 12% more
        arithmetic (so maps under policy.ROW_SHIFT_MIN_PIXELS keep im2col).
        """
        o, c, kh, kw = w.shape
        ho, wo = y.shape[2:]
        dh = geometry.dilation[0]
        stacked = _contiguous(w.transpose(2, 0, 1, 3)).reshape(kh * o, c * kw)
        for cols, count, n0, r0, rows in self._row_shift_bands(x, (kh, kw), geometry, (ho, wo),
                                                               batch_images=True):
            shares = self._buffer(x.dtype, kh * o * cols.shape[1], "product")
            shares = shares.reshape(kh * o, cols.shape[1])
            blas.gemm(stacked, cols, shares)
            run(kernels.row_shift_sum, count * o * rows * wo, shares, count,
                rows + dh * (kh - 1), dh, y, n0, r0)

    def _row_shift_bands(self, x, kernel_hw, geometry, output_hw, batch_images):
        """Yield (cols, count, n0, r0, rows): columns of the kernel's width only.

        cols[(c, j), (k, r, ow)] = x_padded[n0 + k, c, r0 + r, ow*sw + j*dw] for the
        rows + dh*(kH - 1) input rows that output rows r0 .. r0 + rows - 1 of images
        n0 .. n0 + count - 1 read (row stride 1). Bands of rows keep the columns within
        policy.COLUMN_BUDGET; with ``batch_images`` small maps put whole images side by side.
        The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        (_, sw), (dh, dw) = geometry.stride, geometry.dilation
        top, _, left, _ = geometry.padding
        depth, extra = c * kw, dh * (kh - 1)
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, policy.COLUMN_BUDGET // row_bytes - extra))
        images = 1
        if batch_images and rows == ho:
            images = max(1, min(n, policy.COLUMN_BUDGET // (row_bytes * (ho + extra))))
        buffer = self._buffer(x.dtype, depth * images * (rows + extra) * wo)
        for n0 in range(0, n, images):
            count = min(images, n - n0)
            for r0 in range(0, ho, rows):
                band_rows = min(rows, ho - r0)
                span = count * (band_rows + extra) * wo
                cols = buffer[: depth * span].reshape(depth, span)
                run(kernels.im2col_rows, cols.size, x, n0, count, r0, band_rows + extra, 1,
                    kw, 1, sw, top, left, 1, dw, wo, cols)
                yield cols, count, n0, r0, band_rows

    def _column_bands(self, x, kernel_hw, geometry, output_hw):
        """Yield (cols, images, n0, r0, rows): im2col of bands of output rows.

        cols is (C*kH*kW, images*rows*Wo). A band is either ``images`` > 1 whole
        images side by side (small maps) or ``rows`` output rows of image n0 from row
        r0. The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        depth = c * kh * kw
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, policy.COLUMN_BUDGET // row_bytes))
        images = max(1, min(n, policy.COLUMN_BUDGET // (row_bytes * ho))) if rows == ho else 1
        if images > 1:
            pixels = ho * wo
            buffer = self._buffer(x.dtype, depth * images * pixels)
            for n0 in range(0, n, images):
                count = min(images, n - n0)
                cols = buffer[: depth * count * pixels].reshape(depth, count * pixels)
                _im2col(x, n0, count, 0, ho, kernel_hw, geometry, wo, cols)
                yield cols, count, n0, 0, ho
            return
        buffer = self._buffer(x.dtype, depth * rows * wo)
        for image in range(n):
            for r0 in range(0, ho, rows):
                band_rows = min(rows, ho - r0)
                cols = buffer[: depth * band_rows * wo].reshape(depth, band_rows * wo)
                _im2col(x, image, 1, r0, band_rows, kernel_hw, geometry, wo, cols)
                yield cols, 1, image, r0, band_rows
