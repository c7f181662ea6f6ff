"""im2col and its adjoint col2im. Images (N, C, H, W); columns (N, C, kH, kW, Ho, Wo).

* ``im2col``: one thread per column entry.
* ``col2im``: one thread per input pixel, summing every column entry read from it
  (also the transposed conv's forward).
"""

from __future__ import annotations

from numba import cuda


@cuda.jit
def im2col(x, cols, pad_top, pad_left, stride_h, stride_w, dil_h, dil_w):
    """cols[n, c, i, j, oh, ow] = x[n, c, oh*s + i*d - pad, ow*s + j*d - pad] (0 outside)."""
    n_, c_, kh, kw, ho, wo = cols.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, cols.size, step):
        ow = index % wo
        rest = index // wo
        oh = rest % ho
        rest //= ho
        j = rest % kw
        rest //= kw
        i = rest % kh
        rest //= kh
        c = rest % c_
        n = rest // c_
        h = oh * stride_h + i * dil_h - pad_top
        w = ow * stride_w + j * dil_w - pad_left
        value = 0.0
        if 0 <= h < height and 0 <= w < width:
            value = x[n, c, h, w]
        cols[n, c, i, j, oh, ow] = value


@cuda.jit
def col2im(cols, x, pad_top, pad_left, stride_h, stride_w, dil_h, dil_w):
    """x[n, c, h, w] = sum of every column entry read from (h, w): one thread per pixel."""
    n_, c_, kh, kw, ho, wo = cols.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, x.size, step):
        w = index % width
        rest = index // width
        h = rest % height
        rest //= height
        c = rest % c_
        n = rest // c_
        total = 0.0
        for i in range(kh):
            oh_scaled = h + pad_top - i * dil_h
            if oh_scaled < 0 or oh_scaled % stride_h != 0:
                continue
            oh = oh_scaled // stride_h
            if oh >= ho:
                continue
            for j in range(kw):
                ow_scaled = w + pad_left - j * dil_w
                if ow_scaled < 0 or ow_scaled % stride_w != 0:
                    continue
                ow = ow_scaled // stride_w
                if ow < wo:
                    total += cols[n, c, i, j, oh, ow]
        x[n, c, h, w] = total
