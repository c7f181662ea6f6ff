"""Direct 3x3 stride-1 convolution for few channels: the arithmetic done here, no GEMM.

Both read zero-padded planes (``im2col.pad_images``) with rows of Wo + 2:

* ``conv3x3_forward``: y (N, O, Ho, Wo) from the padded input (N, C, Ho+2, Wo+2) and
  weight (O, C, 3, 3); O a multiple of DIRECT_OUTPUT_BLOCK.
* ``conv3x3_grad_weight``: dw (O, C, 3, 3) from the padded dy (N, O, Ho+2, Wo+2) and
  padded input; O a multiple of GRAD_WEIGHT_OUTPUT_BLOCK.
"""

from __future__ import annotations

from numba import njit, prange

from .jit import kernel

# With few channels an im2col GEMM is skinny (16 output rows over tens of thousands of
# pixels): BLAS runs it far below its peak, and the column matrix is 9x the input. These
# kernels read a zero-padded copy of the input instead and keep the 3x3 windows in
# registers: the forward's pass over two rows of pixels loads 12 shifted vectors (4
# input rows) and feeds them to 2 output channels (36 FMAs per 16 loads and 4 stores),
# with the 18 taps held in registers. The padded copy pays for itself: the planes of a
# 2^k-wide map lie a power of two apart and their rows compete for the same L1 sets;
# the padded planes do not, and the kernels need no border cases.
# The flags allow contraction to FMA and, in the weight gradient's sums, reassociation
# (to vectorise them); NaN and Inf still propagate.

# Output channels per parallel step of conv3x3_forward, whose body is written for
# exactly two; the policy sends it only layers whose O is a multiple.
DIRECT_OUTPUT_BLOCK = 2


@njit(cache=True, inline="always")
def _taps(weight, o, c):
    """The 9 weights of (o, c) as a tuple, so they stay in registers."""
    k = weight[o, c]
    return (k[0, 0], k[0, 1], k[0, 2], k[1, 0], k[1, 1], k[1, 2], k[2, 0], k[2, 1], k[2, 2])


@njit(cache=True, inline="always")
def _stencil(k, a0, a1, a2, b0, b1, b2, c0, c1, c2):
    """One output pixel's share of a 3x3 window (rows a, b, c) under taps ``k``."""
    return (k[0] * a0 + k[1] * a1 + k[2] * a2 + k[3] * b0 + k[4] * b1 + k[5] * b2
            + k[6] * c0 + k[7] * c1 + k[8] * c2)


@kernel(fastmath={"contract"})
def conv3x3_forward(xp, weight, y):
    """y (N, O, Ho, Wo) = the 3x3 stride-1 conv of the padded input xp (N, C, Ho+2, Wo+2).

    weight: (O, C, 3, 3) with O a multiple of DIRECT_OUTPUT_BLOCK. A parallel step owns
    two output rows (one if Ho is odd and it is the last) of two channels and sums over
    the input channels in order: its 18 taps fit in the registers (a block of 36 taps
    did not, and was reloaded for every FMA). Bias and ReLU are a separate pass
    (``bias_relu``): applied here to each finished row, they slowed the loop even when
    switched off.
    """
    n_img, o_ch, ho, wo = y.shape
    blocks = o_ch // DIRECT_OUTPUT_BLOCK
    pairs = (ho + 1) // 2
    # Channel blocks vary fastest, so a thread's consecutive steps read the same input
    # rows from L1.
    for task in prange(n_img * pairs * blocks):
        n = task // (pairs * blocks)
        h = 2 * ((task // blocks) % pairs)
        o = DIRECT_OUTPUT_BLOCK * (task % blocks)
        if h + 1 < ho:
            _conv3x3_two_rows(xp, weight, y, n, o, h)
        else:
            _conv3x3_last_row(xp, weight, y, n, o, h)


@njit(cache=True, inline="always")
def _conv3x3_two_rows(xp, weight, y, n, o, h):
    """Output rows h and h + 1 of channels o and o + 1 of image n."""
    upper, lower = y[n, o, h], y[n, o, h + 1]
    upper_next, lower_next = y[n, o + 1, h], y[n, o + 1, h + 1]
    upper[:] = 0
    lower[:] = 0
    upper_next[:] = 0
    lower_next[:] = 0
    for c in range(xp.shape[1]):
        r0, r1, r2, r3 = xp[n, c, h], xp[n, c, h + 1], xp[n, c, h + 2], xp[n, c, h + 3]
        k, k_next = _taps(weight, o, c), _taps(weight, o + 1, c)
        for w in range(len(upper)):
            a0, a1, a2 = r0[w], r0[w + 1], r0[w + 2]
            b0, b1, b2 = r1[w], r1[w + 1], r1[w + 2]
            c0, c1, c2 = r2[w], r2[w + 1], r2[w + 2]
            d0, d1, d2 = r3[w], r3[w + 1], r3[w + 2]
            upper[w] += _stencil(k, a0, a1, a2, b0, b1, b2, c0, c1, c2)
            lower[w] += _stencil(k, b0, b1, b2, c0, c1, c2, d0, d1, d2)
            upper_next[w] += _stencil(k_next, a0, a1, a2, b0, b1, b2, c0, c1, c2)
            lower_next[w] += _stencil(k_next, b0, b1, b2, c0, c1, c2, d0, d1, d2)


@njit(cache=True, inline="always")
def _conv3x3_last_row(xp, weight, y, n, o, h):
    """Output row h of channels o and o + 1 of image n: the last row of an odd Ho."""
    row, row_next = y[n, o, h], y[n, o + 1, h]
    row[:] = 0
    row_next[:] = 0
    for c in range(xp.shape[1]):
        r0, r1, r2 = xp[n, c, h], xp[n, c, h + 1], xp[n, c, h + 2]
        k, k_next = _taps(weight, o, c), _taps(weight, o + 1, c)
        for w in range(len(row)):
            a0, a1, a2 = r0[w], r0[w + 1], r0[w + 2]
            b0, b1, b2 = r1[w], r1[w + 1], r1[w + 2]
            c0, c1, c2 = r2[w], r2[w + 1], r2[w + 2]
            row[w] += _stencil(k, a0, a1, a2, b0, b1, b2, c0, c1, c2)
            row_next[w] += _stencil(k_next, a0, a1, a2, b0, b1, b2, c0, c1, c2)


# Output channels per parallel step of conv3x3_grad_weight, whose body is written for
# exactly two (its s.. and t.. sums); the policy sends it only layers whose O is a multiple.
GRAD_WEIGHT_OUTPUT_BLOCK = 2


@kernel(fastmath={"contract", "reassoc"})
def conv3x3_grad_weight(dyp, xp, dw):
    """dw (O, C, 3, 3) = sum over n, h, w < Wo of dy[n, o, h, w] * xp[n, c, h + i, w + j].

    xp: the padded input (N, C, Ho+2, Wo+2); dyp: dy (N, O, Ho, Wo) in a zero border of
    one pixel, so both planes have rows of Wo+2 (the input gradient's direct conv reads
    the same array); O even. Read from its second row's second element on, dyp's flat
    plane is dy's rows, each followed by two zeros. Tap (i, j) pairs that run with xp's
    flat plane shifted by i*(Wo+2) + j, one long contiguous run per image: the
    vectorised sums are reduced across lanes once per plane instead of once per row
    (row by row, that reduction cost more than the row's FMAs). The zeros add 0 * x,
    which changes nothing unless x holds Inf or NaN: an Inf or NaN in the first or last
    columns of the padded input can then make any tap NaN where numpy's is finite or Inf.
    A parallel step owns two output channels and one input channel and keeps their 18
    sums in registers, so each input vector loaded feeds two FMAs.
    """
    n_img, o_ch, hp, wp = dyp.shape
    c_in = xp.shape[1]
    span = (hp - 2) * wp
    zero = dyp.dtype.type(0)
    for task in prange((o_ch // GRAD_WEIGHT_OUTPUT_BLOCK) * c_in):
        o = GRAD_WEIGHT_OUTPUT_BLOCK * (task // c_in)
        c = task % c_in
        s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = zero
        t00 = t01 = t02 = t10 = t11 = t12 = t20 = t21 = t22 = zero
        for n in range(n_img):
            grad = dyp[n, o].reshape(hp * wp)[wp + 1 : wp + 1 + span]
            grad_next = dyp[n, o + 1].reshape(hp * wp)[wp + 1 : wp + 1 + span]
            plane = xp[n, c].reshape(hp * wp)
            # Slices rather than index arithmetic: numba would wrap a possibly negative
            # index q + wp, and LLVM then gathers instead of loading contiguous runs.
            top, mid, bottom = plane[:span], plane[wp : wp + span], plane[2 * wp : 2 * wp + span]
            # The last two positions are zeros after dy's last row; reading them would
            # run past ``bottom``.
            for q in range(span - 2):
                g, u = grad[q], grad_next[q]
                a0, a1, a2 = top[q], top[q + 1], top[q + 2]
                b0, b1, b2 = mid[q], mid[q + 1], mid[q + 2]
                c0, c1, c2 = bottom[q], bottom[q + 1], bottom[q + 2]
                s00 += g * a0
                s01 += g * a1
                s02 += g * a2
                s10 += g * b0
                s11 += g * b1
                s12 += g * b2
                s20 += g * c0
                s21 += g * c1
                s22 += g * c2
                t00 += u * a0
                t01 += u * a1
                t02 += u * a2
                t10 += u * b0
                t11 += u * b1
                t12 += u * b2
                t20 += u * c0
                t21 += u * c1
                t22 += u * c2
        dw[o, c, 0, 0], dw[o, c, 0, 1], dw[o, c, 0, 2] = s00, s01, s02
        dw[o, c, 1, 0], dw[o, c, 1, 1], dw[o, c, 1, 2] = s10, s11, s12
        dw[o, c, 2, 0], dw[o, c, 2, 1], dw[o, c, 2, 2] = s20, s21, s22
        dw[o + 1, c, 0, 0], dw[o + 1, c, 0, 1], dw[o + 1, c, 0, 2] = t00, t01, t02
        dw[o + 1, c, 1, 0], dw[o + 1, c, 1, 1], dw[o + 1, c, 1, 2] = t10, t11, t12
        dw[o + 1, c, 2, 0], dw[o + 1, c, 2, 1], dw[o + 1, c, 2, 2] = t20, t21, t22
