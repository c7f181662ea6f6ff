"""GEMMs: BLAS called from numba's thread pool, and skinny products done here.

* ``gemm_parts``: a stack of (m, k) @ (k, n) GEMMs, given as addresses, shared out among
  the pool's threads, each calling single-threaded cblas on its part
  (tinyunet/backends/numba/blas.py plans the calls).
* ``address``: an array's data address.
* ``stacked_gram``: out (S, I, J) = a (S, I, T) @ b (S, J, T)^T for few rows I, J and a
  long T, as 4x4 blocks of dot products.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import types as nbtypes

from .jit import kernel

# Rows of each operand per parallel step of ``stacked_gram``, whose body is written for
# exactly four of each (its 16 sums); the backend needs both row counts to be multiples.
GRAM_BLOCK = 4


# BLAS's row-major cblas_sgemm and cblas_dgemm with 64-bit integers (an ILP64 build),
# under the names tinyunet/backends/numba/blas.py registers their addresses by before
# calling gemm_parts. Declared by name, not address, so the compiled kernel can be cached.
# Matrices are passed as addresses (int64): the C ABIs numba targets pass a pointer
# and a 64-bit integer alike.
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112
_CBLAS_INT = nbtypes.int64
_cblas_sgemm = nbtypes.ExternalFunction("tinyunet_cblas_sgemm", nbtypes.void(
    nbtypes.int32, nbtypes.int32, nbtypes.int32, *[_CBLAS_INT] * 3, nbtypes.float32,
    *[_CBLAS_INT] * 4, nbtypes.float32, *[_CBLAS_INT] * 2))
_cblas_dgemm = nbtypes.ExternalFunction("tinyunet_cblas_dgemm", nbtypes.void(
    nbtypes.int32, nbtypes.int32, nbtypes.int32, *[_CBLAS_INT] * 3, nbtypes.float64,
    *[_CBLAS_INT] * 4, nbtypes.float64, *[_CBLAS_INT] * 2))


@njit(cache=True, inline="always")
def _gemm_call(double, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
    if double:
        _cblas_dgemm(CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a, lda, b, ldb, beta,
                     c, ldc)
    else:
        _cblas_sgemm(CBLAS_ROW_MAJOR, trans_a, trans_b, m, n, k, np.float32(1.0), a, lda,
                     b, ldb, np.float32(beta), c, ldc)


@njit(cache=True)
def address(a):
    """The address of a's first element (about a sixth of the cost of ``a.ctypes.data``)."""
    return a.ctypes.data


@kernel()
def gemm_parts(double, a, a_step, b, b_step, c, c_step, stack, m, n, k, trans_a, lda,
               trans_b, ldb, ldc, beta, parts):
    """c[s] = a[s] @ b[s] + beta * c[s] for s < stack, in ``parts`` parallel steps.

    a, b and c are addresses of row-major matrices (float64 if ``double``, else
    float32); matrix s of each starts ``s * step`` bytes on (a step of 0 shares one
    matrix). a is (m, k) and b (k, n), stored transposed where trans_* is CBLAS_TRANS;
    lda, ldb and ldc are their row strides in elements, as cblas takes them. When the
    stack divides evenly, each step takes whole matrices; otherwise each matrix is cut
    in ``parts`` along its longer side (rows of a and c, or columns of b and c).
    """
    size = 8 if double else 4
    whole = stack % parts == 0
    tasks = parts if whole else stack * parts
    for task in prange(tasks):
        if whole:
            for matrix in range(stack * task // parts, stack * (task + 1) // parts):
                _gemm_call(double, trans_a, trans_b, m, n, k, a + matrix * a_step, lda,
                           b + matrix * b_step, ldb, beta, c + matrix * c_step, ldc)
        else:
            s, part = task // parts, task % parts
            a_s, b_s, c_s = a + s * a_step, b + s * b_step, c + s * c_step
            if m > n:
                lo, hi = m * part // parts, m * (part + 1) // parts
                a_lo = a_s + lo * size * (lda if trans_a == CBLAS_NO_TRANS else 1)
                _gemm_call(double, trans_a, trans_b, hi - lo, n, k, a_lo, lda, b_s, ldb,
                           beta, c_s + lo * ldc * size, ldc)
            else:
                lo, hi = n * part // parts, n * (part + 1) // parts
                b_lo = b_s + lo * size * (1 if trans_b == CBLAS_NO_TRANS else ldb)
                _gemm_call(double, trans_a, trans_b, m, hi - lo, k, a_s, lda, b_lo, ldb,
                           beta, c_s + lo * size, ldc)


@kernel(fastmath={"contract", "reassoc"})
def stacked_gram(a, b, accumulate, out):
    """out[s, i, j] = sum over t of a[s, i, t] * b[s, j, t], plus out's own value if
    ``accumulate``.

    a: (S, I', T), b: (S, J', T), out: (S, I, J), with I and J multiples of GRAM_BLOCK
    (rows of a and b past I and J are not read: the Winograd bands' spare rows): a
    stack of GEMMs a @ b^T whose shared dimension T is long and whose rows are few, as
    in the weight gradients (T: tiles or pixels; I, J: channels, or channels times
    taps). BLAS runs such skinny products far below its peak. Here a parallel step owns
    4 rows of a and 4 of b and keeps their 16 dot products in registers, so each vector
    loaded feeds 4 FMAs; each block ends in 16 reductions across the vector lanes, which
    dominate on short T. Where it beats BLAS is the policy's ``use_stacked_gram``.
    """
    stack, i_rows, j_rows = out.shape
    length = a.shape[2]
    i_blocks, j_blocks = i_rows // GRAM_BLOCK, j_rows // GRAM_BLOCK
    zero = a.dtype.type(0)
    # Column blocks vary fastest, so a thread's consecutive steps reuse a's 4 rows.
    for task in prange(stack * i_blocks * j_blocks):
        s = task // (i_blocks * j_blocks)
        i = GRAM_BLOCK * ((task // j_blocks) % i_blocks)
        j = GRAM_BLOCK * (task % j_blocks)
        a0, a1, a2, a3 = a[s, i], a[s, i + 1], a[s, i + 2], a[s, i + 3]
        b0, b1, b2, b3 = b[s, j], b[s, j + 1], b[s, j + 2], b[s, j + 3]
        s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
        s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
        for t in range(length):
            x0, x1, x2, x3 = a0[t], a1[t], a2[t], a3[t]
            y0, y1, y2, y3 = b0[t], b1[t], b2[t], b3[t]
            s00 += x0 * y0
            s01 += x0 * y1
            s02 += x0 * y2
            s03 += x0 * y3
            s10 += x1 * y0
            s11 += x1 * y1
            s12 += x1 * y2
            s13 += x1 * y3
            s20 += x2 * y0
            s21 += x2 * y1
            s22 += x2 * y2
            s23 += x2 * y3
            s30 += x3 * y0
            s31 += x3 * y1
            s32 += x3 * y2
            s33 += x3 * y3
        block = out[s, i : i + GRAM_BLOCK, j : j + GRAM_BLOCK]
        if not accumulate:
            block[:] = zero
        block[0, 0] += s00
        block[0, 1] += s01
        block[0, 2] += s02
        block[0, 3] += s03
        block[1, 0] += s10
        block[1, 1] += s11
        block[1, 2] += s12
        block[1, 3] += s13
        block[2, 0] += s20
        block[2, 1] += s21
        block[2, 2] += s22
        block[2, 3] += s23
        block[3, 0] += s30
        block[3, 1] += s31
        block[3, 2] += s32
        block[3, 3] += s33
