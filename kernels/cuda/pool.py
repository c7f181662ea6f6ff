"""Max-pool forward with argmax and its backward as a gather. x (N, C, H, W); y and
argmax (N, C, Ho, Wo), argmax holding the flat index h*W + w of each window's winner.

* ``max_pool_forward``: one thread per output.
* ``max_pool_backward``: one thread per input pixel.
"""

from __future__ import annotations

import math

from numba import cuda


@cuda.jit
def max_pool_forward(x, y, argmax, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                     dil_h, dil_w):
    """One thread per output: the window's maximum and the flat index of its first winner."""
    n_, c_, ho, wo = y.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, y.size, step):
        ow = index % wo
        rest = index // wo
        oh = rest % ho
        rest //= ho
        c = rest % c_
        n = rest // c_
        best = -math.inf
        best_index = -1
        for i in range(kernel_h):
            h = oh * stride_h - pad_h + i * dil_h
            if h < 0 or h >= height:
                continue
            for j in range(kernel_w):
                w = ow * stride_w - pad_w + j * dil_w
                if w < 0 or w >= width:
                    continue
                value = x[n, c, h, w]
                # Strictly greater keeps the first maximum (PyTorch's tie rule); the
                # first NaN wins and stays, so that it propagates as in numpy.
                if best_index < 0 or value > best or (math.isnan(value)
                                                      and not math.isnan(best)):
                    best = value
                    best_index = h * width + w
        y[n, c, oh, ow] = best
        argmax[n, c, oh, ow] = best_index


@cuda.jit
def max_pool_backward(dy, argmax, dx, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                      dil_h, dil_w):
    """One thread per input pixel: add the gradient of every window that it won."""
    n_, c_, ho, wo = dy.shape
    height, width = dx.shape[2], dx.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, dx.size, step):
        w = index % width
        rest = index // width
        h = rest % height
        rest //= height
        c = rest % c_
        n = rest // c_
        flat = h * width + w
        total = 0.0
        for i in range(kernel_h):
            oh_scaled = h + pad_h - i * dil_h
            if oh_scaled < 0 or oh_scaled % stride_h != 0:
                continue
            oh = oh_scaled // stride_h
            if oh >= ho:
                continue
            for j in range(kernel_w):
                ow_scaled = w + pad_w - j * dil_w
                if ow_scaled < 0 or ow_scaled % stride_w != 0:
                    continue
                ow = ow_scaled // stride_w
                if ow < wo and argmax[n, c, oh, ow] == flat:
                    total += dy[n, c, oh, ow]
        dx[n, c, h, w] = total
