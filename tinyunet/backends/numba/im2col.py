"""The column paths of the numba backend: im2col, row shift, pointwise (1x1) and the
transposed conv's col2im and pixel shuffle.

Shapes: x (N, C, H, W); w (O, C, kH, kW); y and dy (N, O, Ho, Wo). im2col's columns are
(C*kH*kW, pixels), the row shift's (C*kW, pixels), written band by band of output rows
into a reused buffer of at most ``band_bytes`` (the plan's), each band consumed by its
GEMMs while it is in cache. The kernels are in kernels/cpu/im2col.py.
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import elementwise as elementwise_kernels
from ...kernels.cpu import im2col as kernels
from ...kernels.cpu.runtime import run
from . import blas, policy
from .scratch import ScratchBuffers, contiguous


def _im2col(x, n0, count, row0, rows, kernel_hw, geometry, wo, cols):
    """Columns of output rows [row0, row0 + rows) of ``count`` images (see im2col_rows)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, geometry.stride, geometry.dilation
    top, _, left, _ = geometry.padding
    if policy.is_2x2_stride2(kernel_hw, geometry):
        run(kernels.im2col_2x2_stride2, cols.size, x, n0, count, row0, rows, wo, cols)
    else:
        run(kernels.im2col_rows, cols.size, x, n0, count, row0, rows, kh, kw, sh, sw, top,
            left, dh, dw, wo, cols)


class Im2colConvs(ScratchBuffers):
    """Column-based convs (mixed into NumbaBackend)."""

    # ---- im2col ----------------------------------------------------------------------
    def _conv2d_gemms(self, x, w2, geometry, kernel_hw, y, band_bytes):
        """y = conv2d as im2col bands, one GEMM of w2 (O, C*kH*kW) per band."""
        n, o, ho, wo = y.shape
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo),
                                                             band_bytes):
            if images > 1:
                # (O, images*pixels) -> (images, O, pixels): one wide GEMM, one small copy.
                wide = self._buffer(x.dtype, o * cols.shape[1], "product").reshape(o, -1)
                blas.gemm(w2, cols, wide)
                y[n0 : n0 + images] = wide.reshape(o, images, ho, wo).transpose(1, 0, 2, 3)
            else:
                band = y[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
                blas.gemm(w2, cols, band)

    def _grad_weight_gemms(self, dy, x, geometry, kernel_hw, band_bytes):
        """dW = the sum over bands of dY_band @ cols^T (blas.add_gram)."""
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        dw = np.zeros((o, c * kh * kw), dtype=dy.dtype)
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo),
                                                             band_bytes):
            if images > 1:
                grads = self._buffer(dy.dtype, o * images * ho * wo, "product")
                grads = grads.reshape(o, images, ho * wo)
                grads[...] = dy[n0 : n0 + images].reshape(images, o, ho * wo).transpose(1, 0, 2)
                blas.add_gram(grads.reshape(o, images * ho * wo), cols, dw)
            else:
                blas.add_gram(dy[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo], cols, dw)
        return dw.reshape(o, c, kh, kw)

    def _column_bands(self, x, kernel_hw, geometry, output_hw, band_bytes):
        """Yield (cols, images, n0, r0, rows): im2col of bands of output rows.

        cols is (C*kH*kW, images*rows*Wo). A band is either ``images`` > 1 whole
        images side by side (small maps) or ``rows`` output rows of image n0 from row
        r0. The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        depth = c * kh * kw
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, band_bytes // row_bytes))
        images = max(1, min(n, band_bytes // (row_bytes * ho))) if rows == ho else 1
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

    # ---- row shift -----------------------------------------------------------------------
    def _conv2d_row_shifts(self, x, w, geometry, y, band_bytes):
        """conv2d with row stride 1 from columns of the kernel's width only.

        One GEMM of the weight's kernel rows, stacked (kH*O, C*kW), with the columns of
        ``_row_shift_bands`` gives each kernel row's share of every output row; output
        row r sums kernel row i's share from column row r + i*dh (``row_shift_sum``). The
        columns are kH times fewer than im2col's and the GEMM kH times taller.
        """
        o, c, kh, kw = w.shape
        ho, wo = y.shape[2:]
        dh = geometry.dilation[0]
        stacked = contiguous(w.transpose(2, 0, 1, 3)).reshape(kh * o, c * kw)
        for cols, count, n0, r0, rows in self._row_shift_bands(x, (kh, kw), geometry, (ho, wo),
                                                               True, band_bytes):
            shares = self._buffer(x.dtype, kh * o * cols.shape[1], "product")
            shares = shares.reshape(kh * o, cols.shape[1])
            blas.gemm(stacked, cols, shares)
            run(kernels.row_shift_sum, count * o * rows * wo, shares, count,
                rows + dh * (kh - 1), dh, y, n0, r0)

    def _grad_weight_row_shifts(self, dy, x, geometry, kernel_hw, band_bytes):
        """dW of a conv with row stride 1 from columns of the kernel's width only.

        Kernel row i sees the columns of ``_row_shift_bands`` shifted by i*dh rows, a
        plain column window, so dW[:, :, i, :] is one GEMM per i: kH times fewer columns
        than im2col writes.
        """
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        dh = geometry.dilation[0]
        grad = np.zeros((kh, o, c * kw), dtype=dy.dtype)
        for cols, _, image, r0, rows in self._row_shift_bands(x, kernel_hw, geometry, (ho, wo),
                                                              False, band_bytes):
            band = dy[image].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
            for i in range(kh):
                window = cols[:, i * dh * wo : i * dh * wo + rows * wo]
                blas.gemm(band, window.T, grad[i], accumulate=True)
        return np.ascontiguousarray(grad.reshape(kh, o, c, kw).transpose(1, 2, 0, 3))

    def _row_shift_bands(self, x, kernel_hw, geometry, output_hw, batch_images, band_bytes):
        """Yield (cols, count, n0, r0, rows): columns of the kernel's width only.

        cols[(c, j), (k, r, ow)] = x_padded[n0 + k, c, r0 + r, ow*sw + j*dw] for the
        rows + dh*(kH - 1) input rows that output rows r0 .. r0 + rows - 1 of images
        n0 .. n0 + count - 1 read (row stride 1). Bands of rows keep the columns within
        ``band_bytes``; with ``batch_images`` small maps put whole images side by side.
        The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        (_, sw), (dh, dw) = geometry.stride, geometry.dilation
        top, _, left, _ = geometry.padding
        depth, extra = c * kw, dh * (kh - 1)
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, band_bytes // row_bytes - extra))
        images = 1
        if batch_images and rows == ho:
            images = max(1, min(n, band_bytes // (row_bytes * (ho + extra))))
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

    # ---- pointwise (1x1) -----------------------------------------------------------------
    def _conv2d_pointwise(self, x, w, y):
        """y = a 1x1 stride-1 unpadded conv: each image's input (C, H*W) already is its
        column matrix, so one GEMM per image, shared out among the threads by blas.gemm.
        With one input channel each GEMM is an outer product, which BLAS runs far slower
        than numpy's broadcast multiply."""
        n, c, h, width = x.shape
        o = w.shape[0]
        w2 = w.reshape(o, c)
        if c == 1:
            np.multiply(w2, x.reshape(n, c, h * width), out=y.reshape(n, o, h * width))
        else:
            blas.gemm(w2, x.reshape(n, c, h * width), y.reshape(n, o, h * width))

    def _grad_weight_pointwise(self, dy, x):
        """dW (O, C, 1, 1) = the sum over images of dY (O, H*W) @ X^T."""
        n, o = dy.shape[:2]
        c = x.shape[1]
        dw = np.zeros((o, c), dtype=dy.dtype)
        for image in range(n):
            blas.add_gram(dy[image].reshape(o, -1), x[image].reshape(c, -1), dw)
        return dw.reshape(o, c, 1, 1)

    # ---- transposed conv: col2im and the pixel shuffle ------------------------------------
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

    def _grad_input_transposed(self, dy, w, geometry, input_hw, shuffle):
        """dx (N, C, *input_hw) = col2im(w^T @ dy): one batched GEMM and one gather,
        which for 2x2 stride-2 windows tiling dx is a pixel shuffle (``shuffle``)."""
        n, o, ho, wo = dy.shape
        _, c, kh, kw = w.shape
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        top, _, left, _ = geometry.padding
        dx = np.empty((n, c, *input_hw), dtype=dy.dtype)
        cols = self._transposed_columns(dy, w)
        if shuffle:
            run(kernels.depth_to_space_2x2, dx.size, cols, np.zeros(c, dy.dtype), dx, 0)
        else:
            run(kernels.col2im_gather, dx.size, cols, kh, kw, sh, sw, top, left, dh, dw, ho,
                wo, dx)
        return dx

    def _up_conv_into_concat(self, skip, x, w, b, output_hw):
        """concat([skip, conv_transpose2d(x, w) + b]) of a 2x2 stride-2 up-conv: the
        pixel shuffle adds the bias and writes into the up-conv's channels directly."""
        n, _, h, width = x.shape
        c_skip, c_up = skip.shape[1], w.shape[1]
        joined = np.empty((n, c_skip + c_up, *output_hw), dtype=x.dtype)
        joined[:, :c_skip] = skip
        bias = np.zeros(c_up, x.dtype) if b is None else contiguous(b)
        run(kernels.depth_to_space_2x2, n * c_up * 4 * h * width,
            self._transposed_columns(x, w), bias, joined, c_skip)
        return joined

    def _up_conv_grads(self, dy, x, w, need_bias):
        """(dx, dW, db) of a 2x2 stride-2 up-conv from one space-to-depth of dy (read in
        place, even as a channel slice of a concatenation's gradient): dx = conv2d(dy, w)
        and dW are GEMMs with those columns, db their channel sums."""
        n, c_up = dy.shape[:2]
        c_in, h, width = x.shape[1:]
        depth, pixels = 4 * c_up, n * h * width
        cols = self._buffer(dy.dtype, depth * pixels).reshape(depth, pixels)
        run(kernels.im2col_2x2_stride2, cols.size, dy, 0, n, 0, h, width, cols)
        # dx = conv2d(dy, w): w (C_in, C_up, 2, 2) is that conv's (O, C, kH, kW).
        wide = self._buffer(dy.dtype, c_in * pixels, "product").reshape(c_in, pixels)
        blas.gemm(w.reshape(c_in, depth), cols, wide)
        dx = np.empty(x.shape, dtype=dy.dtype)  # not a view of the buffer, reused below
        dx[...] = wide.reshape(c_in, n, h, width).transpose(1, 0, 2, 3)
        # dW = x's pixels (the conv's output gradient) by channel, against the columns.
        wide.reshape(c_in, n, h * width)[...] = x.reshape(n, c_in, h * width).transpose(1, 0, 2)
        dw = np.zeros((c_in, depth), dtype=dy.dtype)
        blas.add_gram(wide, cols, dw)
        db = None
        if need_bias:
            # Rows 4c .. 4c+3 of the columns are channel c's pixels.
            db = np.empty(c_up, dtype=dy.dtype)
            run(elementwise_kernels.channel_sums, cols.size, cols.reshape(1, c_up, 4 * pixels),
                db)
        return dx, dw.reshape(w.shape), db
