"""Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms (Lavin & Gray 2016), around BLAS GEMMs.

alpha = tile + 2 (4 or 6); a tile's alpha^2 values are a GEMM operand's first index.

* ``winograd_filters``: u (alpha^2, O, C) = G g G^T of w (O, C, 9), optionally rotated.
* ``winograd_filter_gradient``: dw (O, C, 9) = G^T dU G of du (alpha^2, O, C).
* ``winograd2_input_tiles`` / ``winograd4_input_tiles``: v (alpha^2, C, tiles) = B^T d B
  of the input tiles of a band of tile rows.
* ``winograd2_output_tiles`` / ``winograd4_output_tiles``: y's tile rows = A^T M A of m
  (alpha^2, O, tiles), plus bias and ReLU.
* ``winograd2_gradient_tiles`` / ``winograd4_gradient_tiles``: dm (alpha^2, O, tiles) =
  A dY A^T, the adjoint of the output transform.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import kernel

# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 2x2 block of a 3x3 stride-1 conv's
# outputs from a 4x4 input tile d and a 3x3 filter g is A^T [(G g G^T) * (B^T d B)] A,
# 16 multiplies instead of 36. Summed over input channels, the 16 elementwise products
# become 16 GEMMs (16, O, C) @ (16, C, tiles), run by BLAS; these kernels are the
# transforms around them. A tile's 16 values e = 4*i + j are a GEMM operand's first
# index. Tiles are numbered n * th + ty (a "tile row") times tw plus tx, so a band of
# consecutive tile rows, from first_row on, is one contiguous range of tile columns.
#   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
#   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
# The filter transforms G g G^T, and the adjoint G^T dU G, are winograd_filters and
# winograd_filter_gradient below, for F(4x4)'s G as well. The tile arrays (v, m, dm
# here and in F(4x4)'s kernels) may have more channel rows than C or O: the kernels
# take C and O from the images (x, y, dy) and leave the rows past them untouched.


@njit(cache=True, inline="always")
def _set_three_terms(target, s0, s1, s2, g, k):
    """target = g[k, 0] * s0 + g[k, 1] * s1 + g[k, 2] * s2, elementwise."""
    g0, g1, g2 = g[k, 0], g[k, 1], g[k, 2]
    for c in range(len(target)):
        target[c] = g0 * s0[c] + g1 * s1[c] + g2 * s2[c]


@kernel(fastmath={"contract"})
def winograd_filters(w, g, flip, u):
    """u[alpha*a + b, o, c] = (G f G^T)[a, b] for the filter f = w[o, c] as a 3x3 matrix,
    rotated by 180 degrees if ``flip`` (as the input gradient's conv needs it).

    w: (O, C, 9), the weight's filters flattened; g: G, (alpha, 3); u: (alpha^2, O, C).
    A parallel step owns one output channel and works across its C filters at once:
    their taps copied channel-minor, then G along the filters' columns and G^T along
    their rows, each a loop over the channels that vectorises (about twice as fast as
    one GEMM with the (alpha^2, 9) Kronecker product of G).
    """
    o_ch, c_in = w.shape[0], w.shape[1]
    alpha = g.shape[0]
    for o in prange(o_ch):
        taps = np.empty((9, c_in), dtype=w.dtype)
        for k in range(9):
            source, target = w[o, :, 8 - k if flip else k], taps[k]
            for c in range(c_in):
                target[c] = source[c]
        half = np.empty((alpha, 3, c_in), dtype=w.dtype)  # G f: alpha rows of 3 taps
        for a in range(alpha):
            for j in range(3):
                _set_three_terms(half[a, j], taps[j], taps[3 + j], taps[6 + j], g, a)
        for a in range(alpha):
            for b in range(alpha):
                _set_three_terms(u[alpha * a + b, o], half[a, 0], half[a, 1], half[a, 2], g, b)


@njit(cache=True, inline="always")
def _add_two_terms(t0, t1, t2, s0, s1, g, k):
    """t_j += g[k, j] * s0 + g[k + 1, j] * s1, elementwise, for j = 0, 1, 2."""
    p0, p1, p2 = g[k, 0], g[k, 1], g[k, 2]
    q0, q1, q2 = g[k + 1, 0], g[k + 1, 1], g[k + 1, 2]
    for c in range(len(t0)):
        t0[c] += p0 * s0[c] + q0 * s1[c]
        t1[c] += p1 * s0[c] + q1 * s1[c]
        t2[c] += p2 * s0[c] + q2 * s1[c]


@kernel(fastmath={"contract"})
def winograd_filter_gradient(du, g, dw):
    """dw[o, c] = G^T dU G, flattened, for dU[a, b] = du[alpha*a + b, o, c]: the adjoint of
    winograd_filters (unflipped), which turns the weight gradient's transformed sums
    back into taps.

    du: (alpha^2, O, C); g: G, (alpha, 3); dw: (O, C, 9). Laid out as
    winograd_filters, the same steps in reverse.
    """
    o_ch, c_in = du.shape[1], du.shape[2]
    alpha = g.shape[0]
    # alpha is 4 or 6, so the sums over it go two terms a pass.
    for o in prange(o_ch):
        half = np.zeros((alpha, 3, c_in), dtype=du.dtype)  # dU G: alpha rows of 3
        for a in range(alpha):
            for b in range(0, alpha, 2):
                _add_two_terms(half[a, 0], half[a, 1], half[a, 2], du[alpha * a + b, o],
                               du[alpha * a + b + 1, o], g, b)
        taps = np.zeros((9, c_in), dtype=du.dtype)  # G^T (dU G)
        for j in range(3):
            for a in range(0, alpha, 2):
                _add_two_terms(taps[j], taps[3 + j], taps[6 + j], half[a, j], half[a + 1, j],
                               g, a)
        for c in range(c_in):
            for k in range(9):
                dw[o, c, k] = taps[k, c]


@njit(cache=True, inline="always")
def _bias_relu_value(value, relu, zero):
    """relu(value) if ``relu`` else value; NaN stays NaN, as in bias_relu."""
    if relu and not (value > 0 or value != value):
        return zero
    return value


@kernel()
def winograd2_input_tiles(xp, first_row, v):
    """v (16, C, rows*tw) = B^T d B of the 4x4 tiles d of ``rows`` tile rows of xp.

    xp: the padded input (N, C, 2*th + 2, 2*tw + 2); tile (ty, tx) of image n starts at
    row 2*ty, column 2*tx and overlaps its neighbours by two. A parallel step owns one
    channel and transforms a tile at a time, its 16 values held in registers (whole-row
    sums would need one loop per output run, each only tw long).
    """
    n_img, c_in, hp, wp = xp.shape
    th, tw = (hp - 2) // 2, (wp - 2) // 2
    rows = v.shape[2] // tw
    for c in prange(c_in):
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            r = 2 * ty
            for tx in range(tw):
                j = 2 * tx
                # B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3) of the tile's 4 columns.
                a0 = xp[n, c, r, j] - xp[n, c, r + 2, j]
                a1 = xp[n, c, r, j + 1] - xp[n, c, r + 2, j + 1]
                a2 = xp[n, c, r, j + 2] - xp[n, c, r + 2, j + 2]
                a3 = xp[n, c, r, j + 3] - xp[n, c, r + 2, j + 3]
                b0 = xp[n, c, r + 1, j] + xp[n, c, r + 2, j]
                b1 = xp[n, c, r + 1, j + 1] + xp[n, c, r + 2, j + 1]
                b2 = xp[n, c, r + 1, j + 2] + xp[n, c, r + 2, j + 2]
                b3 = xp[n, c, r + 1, j + 3] + xp[n, c, r + 2, j + 3]
                e0 = xp[n, c, r + 2, j] - xp[n, c, r + 1, j]
                e1 = xp[n, c, r + 2, j + 1] - xp[n, c, r + 1, j + 1]
                e2 = xp[n, c, r + 2, j + 2] - xp[n, c, r + 1, j + 2]
                e3 = xp[n, c, r + 2, j + 3] - xp[n, c, r + 1, j + 3]
                f0 = xp[n, c, r + 1, j] - xp[n, c, r + 3, j]
                f1 = xp[n, c, r + 1, j + 1] - xp[n, c, r + 3, j + 1]
                f2 = xp[n, c, r + 1, j + 2] - xp[n, c, r + 3, j + 2]
                f3 = xp[n, c, r + 1, j + 3] - xp[n, c, r + 3, j + 3]
                # ... then B on each row: the same four sums of its columns.
                t = k * tw + tx
                v[0, c, t], v[1, c, t], v[2, c, t], v[3, c, t] = a0 - a2, a1 + a2, a2 - a1, a1 - a3
                v[4, c, t], v[5, c, t], v[6, c, t], v[7, c, t] = b0 - b2, b1 + b2, b2 - b1, b1 - b3
                v[8, c, t], v[9, c, t] = e0 - e2, e1 + e2
                v[10, c, t], v[11, c, t] = e2 - e1, e1 - e3
                v[12, c, t], v[13, c, t] = f0 - f2, f1 + f2
                v[14, c, t], v[15, c, t] = f2 - f1, f1 - f3


@kernel()
def winograd2_output_tiles(m, first_row, bias, relu, y):
    """y's tile rows from first_row on = A^T M A + bias[o] of m (16, O, rows*tw), then
    ReLU if ``relu`` (NaN stays NaN, as in bias_relu).

    y: (N, O, 2*th, 2*tw); each tile is a 2x2 block of outputs. A parallel step owns one
    output channel: A^T along M's rows as whole-run sums, then A along the columns.
    """
    n_img, o_ch, ho, wo = y.shape
    th, tw = ho // 2, wo // 2
    rows = m.shape[2] // tw
    zero = y.dtype.type(0)
    for o in prange(o_ch):
        b = bias[o]
        sums = np.empty((8, tw), dtype=y.dtype)
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            lo, hi = k * tw, (k + 1) * tw
            for j in range(4):
                m0, m1 = m[j, o, lo:hi], m[4 + j, o, lo:hi]
                m2, m3 = m[8 + j, o, lo:hi], m[12 + j, o, lo:hi]
                upper, lower = sums[j], sums[4 + j]
                for tx in range(tw):
                    upper[tx] = m0[tx] + m1[tx] + m2[tx]
                    lower[tx] = m1[tx] - m2[tx] - m3[tx]
            for i in range(2):
                out = y[n, o, 2 * ty + i]
                s0, s1, s2, s3 = sums[4 * i], sums[4 * i + 1], sums[4 * i + 2], sums[4 * i + 3]
                for tx in range(tw):
                    out[2 * tx] = _bias_relu_value((s0[tx] + s1[tx] + s2[tx]) + b, relu, zero)
                    out[2 * tx + 1] = _bias_relu_value((s1[tx] - s2[tx] - s3[tx]) + b, relu, zero)


@kernel()
def winograd2_gradient_tiles(dy, first_row, dm):
    """dm (16, O, rows*tw) = A dY A^T of the 2x2 tiles of dy's tile rows from first_row
    on: the adjoint of winograd2_output_tiles, for the weight gradient.

    dy: (N, O, 2*th, 2*tw). A parallel step owns one output channel and transforms a
    tile at a time, as the input transform does.
    """
    n_img, o_ch, ho, wo = dy.shape
    th, tw = ho // 2, wo // 2
    rows = dm.shape[2] // tw
    for o in prange(o_ch):
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            for tx in range(tw):
                t = k * tw + tx
                a, b = dy[n, o, 2 * ty, 2 * tx], dy[n, o, 2 * ty, 2 * tx + 1]
                c, d = dy[n, o, 2 * ty + 1, 2 * tx], dy[n, o, 2 * ty + 1, 2 * tx + 1]
                # A's rows (1, 0), (1, 1), (1, -1), (0, -1) on the tile's rows: (a, b),
                # (s0, s1), (u0, u1), (-c, -d); then on each of those rows' columns.
                s0, s1, u0, u1 = a + c, b + d, a - c, b - d
                dm[0, o, t], dm[1, o, t], dm[2, o, t], dm[3, o, t] = a, a + b, a - b, -b
                dm[4, o, t], dm[5, o, t], dm[6, o, t], dm[7, o, t] = s0, s0 + s1, s0 - s1, -s1
                dm[8, o, t], dm[9, o, t], dm[10, o, t], dm[11, o, t] = u0, u0 + u1, u0 - u1, -u1
                dm[12, o, t], dm[13, o, t], dm[14, o, t], dm[15, o, t] = -c, -c - d, d - c, d


# Winograd F(4x4, 3x3): the same with 6x6 input tiles, 4x4 output tiles and 36 values
# a tile (e = 6*i + j), from the interpolation points 0, +-1, +-2:
#   B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
#          [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
#   A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
#          [0, 1, -1, 8, -8, 1]]
# The constants are passed in the arrays' dtype, so float32 stays float32.


@njit(cache=True, inline="always")
def _winograd4_bt(d0, d1, d2, d3, d4, d5, two, four, five):
    """B^T of F(4x4, 3x3) times a column of 6 values."""
    return (four * d0 - five * d2 + d4,
            d3 + d4 - four * (d1 + d2),
            four * (d1 - d2) + d4 - d3,
            two * (d3 - d1) + d4 - d2,
            two * (d1 - d3) + d4 - d2,
            four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def _winograd4_at(m0, m1, m2, m3, m4, m5, two, four, eight):
    """A^T of F(4x4, 3x3) times a column of 6 values."""
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5)


@njit(cache=True, inline="always")
def _winograd4_a(y0, y1, y2, y3, two, four, eight):
    """A of F(4x4, 3x3) times a column of 4 values (the adjoint of _winograd4_at)."""
    s02, s13 = y0 + y2, y1 + y3
    f02, f13 = y0 + four * y2, two * y1 + eight * y3
    return (y0, s02 + s13, s02 - s13, f02 + f13, f02 - f13, y3)


@njit(cache=True, inline="always")
def _winograd4_input_row(s, i, v, c, lo, tw, two, four, five):
    """B along row i of a tile row's B^T d (s: (6, 4*tw + 2)) into v's runs 6*i .. 6*i + 5."""
    e = 6 * i
    for tx in range(tw):
        j, t = 4 * tx, lo + tx
        b0, b1, b2, b3, b4, b5 = _winograd4_bt(s[i, j], s[i, j + 1], s[i, j + 2], s[i, j + 3],
                                               s[i, j + 4], s[i, j + 5], two, four, five)
        v[e, c, t], v[e + 1, c, t], v[e + 2, c, t] = b0, b1, b2
        v[e + 3, c, t], v[e + 4, c, t], v[e + 5, c, t] = b3, b4, b5


@kernel()
def winograd4_input_tiles(x, top, left, th, tw, first_row, v):
    """v (36, C, rows*tw) = B^T d B of the 6x6 tiles d of ``rows`` tile rows of x padded.

    x: the input (N, C, H, W), read as if placed at (top, left) in a zero border of
    4*th + 2 rows and 4*tw + 2 columns; tile (ty, tx) of image n starts at padded row
    4*ty, column 4*tx. The padding is applied here, saving a padded copy of x. A
    parallel step owns one channel. Per tile row, B^T runs down the columns of its 6
    input rows as whole-row sums (contiguous, vectorised; rows in the border read a zero
    row), then B along each of the 6 resulting rows, one loop per row with 6 output runs
    (a tile at a time would hold 36 values, too many to vectorise).
    """
    n_img, c_in, h, w = x.shape
    wp = 4 * tw + 2
    rows = v.shape[2] // tw
    two, four, five = x.dtype.type(2), x.dtype.type(4), x.dtype.type(5)
    zeros = np.zeros(w, dtype=x.dtype)
    for c in prange(c_in):
        s = np.zeros((6, wp), dtype=x.dtype)
        # The image's columns of each row of s; those outside [left, left + w) stay zero.
        # Indexed by the loop's own j: with s[0, left + j] numba wraps a possibly negative
        # index, and the loop no longer vectorises.
        s0, s1, s2 = s[0, left : left + w], s[1, left : left + w], s[2, left : left + w]
        s3, s4, s5 = s[3, left : left + w], s[4, left : left + w], s[5, left : left + w]
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            r, lo = 4 * ty - top, k * tw
            d0 = x[n, c, r] if 0 <= r < h else zeros
            d1 = x[n, c, r + 1] if 0 <= r + 1 < h else zeros
            d2 = x[n, c, r + 2] if 0 <= r + 2 < h else zeros
            d3 = x[n, c, r + 3] if 0 <= r + 3 < h else zeros
            d4 = x[n, c, r + 4] if 0 <= r + 4 < h else zeros
            d5 = x[n, c, r + 5] if 0 <= r + 5 < h else zeros
            for j in range(w):
                s0[j], s1[j], s2[j], s3[j], s4[j], s5[j] = _winograd4_bt(
                    d0[j], d1[j], d2[j], d3[j], d4[j], d5[j], two, four, five)
            # Row by row, written out: a loop over the 6 rows is markedly slower.
            _winograd4_input_row(s, 0, v, c, lo, tw, two, four, five)
            _winograd4_input_row(s, 1, v, c, lo, tw, two, four, five)
            _winograd4_input_row(s, 2, v, c, lo, tw, two, four, five)
            _winograd4_input_row(s, 3, v, c, lo, tw, two, four, five)
            _winograd4_input_row(s, 4, v, c, lo, tw, two, four, five)
            _winograd4_input_row(s, 5, v, c, lo, tw, two, four, five)


@kernel()
def winograd4_output_tiles(m, first_row, bias, relu, y):
    """y's tile rows from first_row on = A^T M A + bias[o] of m (36, O, rows*tw), then
    ReLU if ``relu`` (NaN stays NaN, as in bias_relu).

    y: (N, O, 4*th, 4*tw); each tile is a 4x4 block of outputs. A parallel step owns one
    output channel: A^T down each of M's 6 columns for a whole tile row, then A along
    the 4 resulting rows.
    """
    n_img, o_ch, ho, wo = y.shape
    th, tw = ho // 4, wo // 4
    rows = m.shape[2] // tw
    two, four, eight = y.dtype.type(2), y.dtype.type(4), y.dtype.type(8)
    zero = y.dtype.type(0)
    for o in prange(o_ch):
        b = bias[o]
        p = np.empty((4, 6, tw), dtype=y.dtype)
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            out, r, lo = y[n, o], 4 * ty, k * tw
            for q in range(6):
                for tx in range(tw):
                    t = lo + tx
                    p[0, q, tx], p[1, q, tx], p[2, q, tx], p[3, q, tx] = _winograd4_at(
                        m[q, o, t], m[6 + q, o, t], m[12 + q, o, t], m[18 + q, o, t],
                        m[24 + q, o, t], m[30 + q, o, t], two, four, eight)
            for i in range(4):
                row = out[r + i]
                for tx in range(tw):
                    y0, y1, y2, y3 = _winograd4_at(p[i, 0, tx], p[i, 1, tx], p[i, 2, tx],
                                                   p[i, 3, tx], p[i, 4, tx], p[i, 5, tx],
                                                   two, four, eight)
                    row[4 * tx] = _bias_relu_value(y0 + b, relu, zero)
                    row[4 * tx + 1] = _bias_relu_value(y1 + b, relu, zero)
                    row[4 * tx + 2] = _bias_relu_value(y2 + b, relu, zero)
                    row[4 * tx + 3] = _bias_relu_value(y3 + b, relu, zero)


@kernel()
def winograd4_gradient_tiles(dy, first_row, dm):
    """dm (36, O, rows*tw) = A dY A^T of the 4x4 tiles of dy's tile rows from first_row
    on: the adjoint of winograd4_output_tiles, for the weight gradient.

    dy: (N, O, 4*th, 4*tw). A parallel step owns one output channel: A down the columns
    of a tile row's 4 rows as whole-row sums, then A along each of the 6 resulting rows.
    """
    n_img, o_ch, ho, wo = dy.shape
    th, tw = ho // 4, wo // 4
    rows = dm.shape[2] // tw
    two, four, eight = dy.dtype.type(2), dy.dtype.type(4), dy.dtype.type(8)
    for o in prange(o_ch):
        s = np.empty((6, wo), dtype=dy.dtype)
        for k in range(rows):
            n, ty = (first_row + k) // th, (first_row + k) % th
            g, r, lo = dy[n, o], 4 * ty, k * tw
            for j in range(wo):
                s[0, j], s[1, j], s[2, j], s[3, j], s[4, j], s[5, j] = _winograd4_a(
                    g[r, j], g[r + 1, j], g[r + 2, j], g[r + 3, j], two, four, eight)
            for i in range(6):
                row = s[i]
                out0, out1, out2 = dm[6 * i, o], dm[6 * i + 1, o], dm[6 * i + 2, o]
                out3, out4, out5 = dm[6 * i + 3, o], dm[6 * i + 4, o], dm[6 * i + 5, o]
                for tx in range(tw):
                    j, t = 4 * tx, lo + tx
                    out0[t], out1[t], out2[t], out3[t], out4[t], out5[t] = _winograd4_a(
                        row[j], row[j + 1], row[j + 2], row[j + 3], two, four, eight)
