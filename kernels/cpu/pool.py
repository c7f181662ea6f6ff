"""Max-pool kernels. x (N, C, H, W); y and argmax (N, C, Ho, Wo), argmax holding the
flat index h*W + w of each window's winner.

* ``max_pool2d_forward``: any window, stride, padding and dilation.
* ``max_pool2x2_forward``: 2x2 windows at stride 2, no padding (the U-Net's).
* ``max_pool2d_backward``: dx (N, C, H, W) from dy and argmax.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import kernel


@njit(cache=True, inline="always")
def _wins(v, best):
    """Whether v replaces the running maximum: larger, or the first NaN."""
    return v > best or (v != v and best == best)


@kernel()
def max_pool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, y, argmax):
    """y[n, c, oh, ow] = max of the window; argmax = flat index h*W + w of the winner.

    Padding never wins (it counts as -inf). Ties go to the first maximum in
    row-major window order; a NaN wins over numbers (the first NaN), as in numpy.
    """
    n_img, c_in, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    for plane in prange(n_img * c_in):
        n = plane // c_in
        c = plane % c_in
        for oh in range(ho):
            for ow in range(wo):
                best = -np.inf
                best_index = -1
                for i in range(kh):
                    ih = oh * sh - ph + i * dh
                    if ih < 0 or ih >= h:
                        continue
                    for j in range(kw):
                        iw = ow * sw - pw + j * dw
                        if iw < 0 or iw >= w:
                            continue
                        v = x[n, c, ih, iw]
                        if best_index < 0 or _wins(v, best):
                            best = v
                            best_index = ih * w + iw
                y[n, c, oh, ow] = best
                argmax[n, c, oh, ow] = best_index


@kernel()
def max_pool2x2_forward(x, y, argmax):
    """max_pool2d_forward for the U-Net's 2x2 windows, stride 2, no padding.

    The same results, ties and NaN rule; with the window unrolled it needs no bounds
    checks. Each output row is worked out in two small arrays of the step's own and
    then copied out: a loop writing straight into y and argmax ran several times slower
    on narrow maps.
    """
    n_img, c_in, h, w = x.shape
    ho, wo = y.shape[2], y.shape[3]
    for plane in prange(n_img * c_in):
        n = plane // c_in
        c = plane % c_in
        best_row = np.empty(wo, dtype=y.dtype)
        where_row = np.empty(wo, dtype=argmax.dtype)
        for oh in range(ho):
            top, bottom = x[n, c, 2 * oh], x[n, c, 2 * oh + 1]
            for ow in range(wo):
                iw = 2 * ow
                best, where = top[iw], 2 * oh * w + iw
                if _wins(top[iw + 1], best):
                    best, where = top[iw + 1], where + 1
                if _wins(bottom[iw], best):
                    best, where = bottom[iw], (2 * oh + 1) * w + iw
                if _wins(bottom[iw + 1], best):
                    best, where = bottom[iw + 1], (2 * oh + 1) * w + iw + 1
                best_row[ow] = best
                where_row[ow] = where
            out, winners = y[n, c, oh], argmax[n, c, oh]
            for ow in range(wo):
                out[ow] = best_row[ow]
                winners[ow] = where_row[ow]


@kernel()
def max_pool2d_backward(dy, argmax, dx):
    """dx (N, C, H, W) = each output gradient added onto its window's winner.

    One (n, c) plane per parallel step, so overlapping windows add up without races.
    The winner's flat index h*W + w addresses the plane's flat view directly, without
    splitting it into row and column (two integer divisions an output).
    """
    n_img, c_in, h, w = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    for plane in prange(n_img * c_in):
        n = plane // c_in
        c = plane % c_in
        target = dx[n, c].reshape(h * w)
        for i in range(h * w):
            target[i] = 0
        grads, winners = dy[n, c].reshape(ho * wo), argmax[n, c].reshape(ho * wo)
        for k in range(ho * wo):
            target[winners[k]] += grads[k]
