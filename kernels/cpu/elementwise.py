"""Elementwise passes and channel sums, each one parallel pass over its arrays.

* ``relu_forward``, ``relu_backward``, ``sigmoid``: flat arrays.
* ``bias_relu``, ``bias_add``: in place on y (N, C, H*W).
* ``relu_backward_channel_sums``, ``channel_sums``: dz and bias gradients of (N, C, H*W).
* ``sigmoid_overlap_sums``, ``sigmoid_overlap_backward``: a one-channel Dice or IoU's
  forward and gradient, on (N, K) rows.
"""

from __future__ import annotations

import math

from numba import prange

from .jit import kernel


@kernel()
def relu_forward(x, y):
    """y = max(x, 0) over flat arrays; NaN stays NaN, as numpy.maximum does."""
    zero = x.dtype.type(0)
    for k in prange(x.size):
        v = x[k]
        y[k] = v if (v > 0 or v != v) else zero
    return y


@kernel()
def relu_backward(dy, y, dx):
    """dx = dy where y > 0 else dy * 0 (flat arrays), exactly numpy's dy * (y > 0)."""
    one, zero = dy.dtype.type(1), dy.dtype.type(0)
    for k in prange(dy.size):
        dx[k] = dy[k] * (one if y[k] > 0 else zero)
    return dx


@kernel()
def bias_relu(y, bias):
    """In place: y (N, C, H*W) = relu(y + bias[c]), rounded as the unfused ops round;
    NaN stays NaN, as in relu_forward."""
    n_img, c_out, pixels = y.shape
    zero = y.dtype.type(0)
    for plane in prange(n_img * c_out):
        row, b = y[plane // c_out, plane % c_out], bias[plane % c_out]
        for p in range(pixels):
            v = row[p] + b
            row[p] = v if (v > 0 or v != v) else zero


# Reassociation for the sum only, as in channel_sums; each dz value is one exact multiply.
@kernel(fastmath={"reassoc"})
def relu_backward_channel_sums(dy, y, dz, out):
    """dz = relu_backward(dy, y) and out[c] = its sum over N and H*W (float64), one pass.

    dy, y, dz: (N, C, H*W). This is the backward of relu(conv + bias) up to the conv:
    dz is the conv output's gradient and ``out`` the bias gradient.
    """
    n_img, c_out, pixels = dy.shape
    one, zero = dy.dtype.type(1), dy.dtype.type(0)
    for c in prange(c_out):
        total = 0.0
        for n in range(n_img):
            plane_total = 0.0
            for p in range(pixels):
                g = dy[n, c, p] * (one if y[n, c, p] > 0 else zero)
                dz[n, c, p] = g
                plane_total += g
            total += plane_total
        out[c] = total
    return out


@kernel()
def bias_add(y, bias):
    """In place: y (N, C, H*W) += bias[c]."""
    n_img, c_out, pixels = y.shape
    for plane in prange(n_img * c_out):
        n = plane // c_out
        c = plane % c_out
        b = bias[c]
        for p in range(pixels):
            y[n, c, p] += b


# Reassociation only: it lets LLVM vectorise the sum by adding in another order (numpy's
# pairwise sum uses yet another). No other fast-math flag, so NaN and Inf still
# propagate exactly as in the reference.
@kernel(fastmath={"reassoc"})
def channel_sums(dy, out):
    """out[c] = sum of dy (N, C, H*W) over N and H*W, accumulated in float64."""
    n_img, c_out, pixels = dy.shape
    for task in prange(c_out):
        total = 0.0
        for n in range(n_img):
            plane_total = 0.0
            for p in range(pixels):
                plane_total += dy[n, task, p]
            total += plane_total
        out[task] = total
    return out


@kernel()
def sigmoid(x, y):
    """y = 1 / (1 + exp(-x)) over flat arrays, exp's argument kept non-positive."""
    one = x.dtype.type(1)
    for k in prange(x.size):
        v = x[k]
        e = math.exp(-abs(v))
        y[k] = one / (one + e) if v >= 0 else e / (one + e)
    return y


@kernel()
def sigmoid_overlap_sums(z, t, p, sums):
    """p = sigmoid(z) and sums[n] = (sum p*t, sum p, sum t) over row n, in float64.

    z, t, p: (N, K), one row per sample; sums: (N, 3). The forward of a one-channel soft
    Dice or IoU in one pass; p rounds as ``sigmoid`` does. Parallel over samples only
    (each sums its row in order); the U-Nets' batches of 2-8 keep the threads busy.
    """
    one = z.dtype.type(1)
    for n in prange(z.shape[0]):
        overlap = p_total = t_total = 0.0
        for k in range(z.shape[1]):
            v = z[n, k]
            e = math.exp(-abs(v))
            q = one / (one + e) if v >= 0 else e / (one + e)
            p[n, k] = q
            overlap += q * t[n, k]
            p_total += q
            t_total += t[n, k]
        sums[n, 0], sums[n, 1], sums[n, 2] = overlap, p_total, t_total


@kernel()
def sigmoid_overlap_backward(p, t, slope, offset, piece, dz):
    """dz[n, k] = (slope[n] * t[n, k] + offset[n]) * p[n, k] * (1 - p[n, k]), rounded as
    numpy evaluates that expression: a one-channel Dice or IoU's gradient to the logits.
    p, t, dz: (N, K); slope, offset: (N,). A parallel step owns ``piece`` elements of a
    row, so a batch of one or two still uses every thread, and its loop runs along the
    row (a step per element would find its row by a division each)."""
    one = p.dtype.type(1)
    row = p.shape[1]
    pieces = (row + piece - 1) // piece
    for task in prange(p.shape[0] * pieces):
        n = task // pieces
        lo = (task % pieces) * piece
        a, b = slope[n], offset[n]
        for k in range(lo, min(row, lo + piece)):
            q = p[n, k]
            dz[n, k] = (a * t[n, k] + b) * q * (one - q)
