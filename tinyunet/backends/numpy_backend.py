"""The numpy reference backend: im2col + one GEMM, written to be read.

Shapes: x (N, C, H, W); w (O, C, kH, kW); y (N, O, Ho, Wo). The column matrix of
im2col is (N, C*kH*kW, Ho*Wo), so the conv forward is one batched GEMM
``w.reshape(O, C*kH*kW) @ cols``. The input gradient reverses that path
(``w.T @ dy`` then col2im), which is exactly the forward of a transposed conv.
"""

from __future__ import annotations

import numpy as np

from .interface import Backend, ConvGeometry, PoolGeometry


def _pad(x, top, bottom, left, right, value=0.0):
    if top == bottom == left == right == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def _tap(i, j, out_hw, geometry: ConvGeometry):
    """Slices of the padded input that kernel tap (i, j) reads for every output pixel."""
    (sh, sw), (dh, dw), (ho, wo) = geometry.stride, geometry.dilation, out_hw
    return (
        slice(None),
        slice(None),
        slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (wo - 1) + 1, sw),
    )


def im2col(x, kernel_hw, geometry: ConvGeometry):
    """(N, C, H, W) -> columns (N, C, kH, kW, Ho, Wo) of every receptive field."""
    n, c, h, w = x.shape
    kh, kw = kernel_hw
    ho, wo = geometry.output_hw((h, w), kernel_hw)
    padded = _pad(x, *geometry.padding)
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    # One strided slice per kernel tap: kH*kW cheap copies instead of N*Ho*Wo small ones.
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[_tap(i, j, (ho, wo), geometry)]
    return cols


def col2im(cols, input_hw, geometry: ConvGeometry):
    """Adjoint of im2col: add every column entry back onto the pixel it was read from."""
    n, c, kh, kw, ho, wo = cols.shape
    h, w = input_hw
    top, bottom, left, right = geometry.padding
    padded = np.zeros((n, c, h + top + bottom, w + left + right), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            padded[_tap(i, j, (ho, wo), geometry)] += cols[:, :, i, j]
    return padded[:, :, top : top + h, left : left + w]


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def asarray(self, host_array):
        return np.asarray(host_array)

    def to_numpy(self, array):
        return np.asarray(array)

    def conv2d(self, x, w, geometry):
        n = x.shape[0]
        o, c, kh, kw = w.shape
        cols = im2col(x, (kh, kw), geometry)
        ho, wo = cols.shape[-2:]
        y = w.reshape(o, c * kh * kw) @ cols.reshape(n, c * kh * kw, ho * wo)
        return y.reshape(n, o, ho, wo)

    def conv2d_grad_input(self, dy, w, geometry, input_hw):
        n, o, ho, wo = dy.shape
        _, c, kh, kw = w.shape
        cols = w.reshape(o, c * kh * kw).T @ dy.reshape(n, o, ho * wo)
        return col2im(cols.reshape(n, c, kh, kw, ho, wo), input_hw, geometry)

    def conv2d_grad_weight(self, dy, x, geometry, kernel_hw):
        n, o, ho, wo = dy.shape
        c = x.shape[1]
        cols = im2col(x, kernel_hw, geometry).reshape(n, -1, ho * wo)
        dw = np.tensordot(dy.reshape(n, o, ho * wo), cols, axes=([0, 2], [0, 2]))
        return dw.reshape(o, c, *kernel_hw)

    def max_pool2d(self, x, geometry: PoolGeometry):
        n, c, h, w = x.shape
        kh, kw = geometry.kernel
        ph, pw = geometry.padding
        padded = _pad(x, ph, ph, pw, pw, value=-np.inf)
        windows = im2col(padded, (kh, kw), ConvGeometry(geometry.stride, (0, 0, 0, 0),
                                                         geometry.dilation))
        ho, wo = windows.shape[-2:]
        windows = windows.reshape(n, c, kh * kw, ho, wo)
        # np.argmax returns the first maximum, so ties go to the earliest tap in
        # row-major window order, as in PyTorch's CPU kernel.
        tap = windows.argmax(axis=2)
        y = np.take_along_axis(windows, tap[:, :, None], axis=2)[:, :, 0]
        (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
        rows = np.arange(ho)[:, None] * sh - ph + (tap // kw) * dh
        cols = np.arange(wo)[None, :] * sw - pw + (tap % kw) * dw
        return y, (rows * w + cols).astype(np.int64)

    def max_pool2d_backward(self, dy, argmax, input_shape, geometry=None):
        n, c, h, w = input_shape
        dx = np.zeros((n * c, h * w), dtype=dy.dtype)
        plane = np.arange(n * c)[:, None]
        # add.at adds repeated indexes (overlapping windows) instead of overwriting.
        np.add.at(dx, (plane, argmax.reshape(n * c, -1)), dy.reshape(n * c, -1))
        return dx.reshape(input_shape)
