"""Numba CPU kernels of the ``numba`` backend (the data movement around BLAS GEMMs).

Shape convention: images are C-contiguous (N, C, H, W) arrays; conv weights are
(C_out, C_in, kH, kW). The GEMMs themselves run in BLAS, called from this module's
thread pool (``gemm_parts``) or numpy's matmul, except the skinny ones of the weight
gradients (``stacked_gram``); these kernels do everything else in one parallel pass
each:

* ``im2col_rows``: a band of output rows (of one or more images) -> a column matrix in exactly
  the (C*kH*kW, rows*Wo) layout the GEMM wants, with the zero padding written in the
  same pass (no padded copy of the input is ever made).
* ``im2col_2x2_stride2``: the same for the U-Net's 2x2 stride-2 convs (space to depth).
* ``col2im_gather``: the adjoint of im2col; each parallel step owns one input row and
  sums what lands in it, so there are no races and no atomics.
* ``depth_to_space_2x2``: the same for the 2x2 stride-2 transposed conv (a pixel shuffle).
* ``row_shift_sum``: the forward's row-shift path: adds each kernel row's share of a
  GEMM, shifted by its row, into the output rows.
* ``conv3x3_forward`` / ``conv3x3_grad_weight``: direct 3x3 stride-1 convolution for
  few channels, where a skinny GEMM wastes BLAS; they read a padded copy
  (``pad_images``) and do the arithmetic themselves.
* ``gemm_parts``: a stack of GEMMs shared out among the pool's threads, each calling
  single-threaded BLAS on its part (see tinyunet/backends/blas.py).
* ``stacked_gram``: the weight gradients' GEMMs a @ b^T when one has few rows, as
  4x4 blocks of dot products over their long shared dimension.
* ``winograd2_input_tiles`` / ``winograd2_output_tiles`` / ``winograd2_gradient_tiles``
  and the ``winograd4_`` ones: the transforms of Winograd F(2x2, 3x3) and F(4x4, 3x3),
  around the 16 or 36 GEMMs BLAS runs; the output transforms add the bias and apply
  the ReLU in the same pass. ``winograd_filters`` transforms the filters, and
  ``winograd_filter_gradient`` turns the weight gradient's sums back into taps.
* ``bias_relu`` (relu(y + bias) in place, the epilogue of a conv layer) and
  ``relu_backward_channel_sums`` (its backward: the ReLU mask and the bias gradient in
  one pass).
* max-pool forward with argmax, and its backward; ReLU and its backward; the bias
  gradient; a stable sigmoid; a one-channel Dice or IoU's forward and backward, one
  pass each; the SGD and Adam updates of every parameter in one call.

Every kernel is compiled twice, parallel and serial (see ``kernel``), both cached on
disk. Fast-math flags are used only where they buy vectorisation and never drop NaN/Inf
semantics: FMA contraction and reassociation in the direct convs and ``stacked_gram``,
FMA contraction in the filter transforms, reassociation in ``channel_sums``; the other
kernels copy data, accumulate in a fixed order, or must round exactly as the numpy
reference does. Callers pass contiguous float32/float64 arrays only, which keeps the
number of compiled specialisations (and the first-run compile time) small.
"""

from __future__ import annotations

import math
import os
import sys
import types

import numba
import numpy as np
from numba import njit, prange
from numba.core import types as nbtypes


def _openmp_loaded():
    """Whether this process has loaded an OpenMP runtime already (GNU's, LLVM's or
    Intel's; PyTorch, for one, brings GNU's)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps
                       for name in ("libgomp", "libomp.so", "libiomp5"))
    except OSError:
        return True  # cannot tell: assume so


# Whether this module started numba's pool on GNU OpenMP told to wait passively, and
# the GOMP_SPINCOUNT that libgomp then read (None: libgomp's default for the policy).
OPENMP_WAITS_PASSIVELY = False
OPENMP_SPINCOUNT_IN_EFFECT = None
# How long GNU OpenMP's idle workers spin before they sleep, in libgomp's units
# (GOMP_SPINCOUNT: iterations of a pause loop; 1000 spun for 20-30 us here, so 10^5
# for 2-3 ms). See _start_thread_pool.
OPENMP_SPIN_COUNT = 100_000


def _start_thread_pool():
    """Pick numba's threading layer and start its threads.

    A training step makes about 150-180 parallel calls (configs C and A), many
    straight after another, so how the pool's idle workers wait matters. Waking a
    sleeping worker cost 45 us a call on the 2-core VM of benchmarks/RESULTS.md (numba's
    own workqueue pool: 62-82 us). The GEMMs run on this pool too
    (tinyunet/backends/blas.py), so no other pool of threads needs the cores while
    these workers wait, and they spin for 2-3 ms (GOMP_SPINCOUNT=OPENMP_SPIN_COUNT)
    before they sleep. While BLAS ran on threads of its own, spinning for long stole
    its cores: 10^5 spins made A 20% slower, and 1000 (20-30 us) was the best; with the
    GEMMs on this pool, one run of benchmarks/train_step.py each (A / C speed-up over
    PyTorch): 1000 spins 1.15x / 1.08x, 10^4 1.31x / 1.35x, 3*10^4 1.23x / 1.22x, 10^5
    1.35x / 1.35x, 3*10^5 1.27x / 1.31x. Without the spin, told to sleep at once
    (OMP_WAIT_POLICY=passive), OpenMP's workers still woke faster than workqueue's
    (training steps in fresh processes, alternating, C 32-34 vs 43-48 ms, A 130-172 vs
    142-190 ms). So on Linux, where we measured it, numba gets the OpenMP layer, falling
    back to workqueue where libgomp is missing, with OMP_WAIT_POLICY=passive and
    GOMP_SPINCOUNT set only while the pool starts: libgomp reads them once, when it
    loads. They then hold for the process's libgomp, which a library loaded later may
    share (PyTorch's CPU build does: its steps ran 15-50% slower passive). Where an
    OpenMP runtime is already loaded, its wait policy is set, so workqueue again; a
    layer, wait policy or spin count the user set (NUMBA_THREADING_LAYER,
    OMP_WAIT_POLICY, GOMP_SPINCOUNT) is left alone, and a passive policy the user set
    gets no spinning. If numba's pool was started before this module is first imported,
    its layer stays.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    policy = os.environ.get("OMP_WAIT_POLICY")
    if (not sys.platform.startswith("linux") or _openmp_loaded()
            or (policy or "passive").lower() != "passive"):
        numba.config.THREADING_LAYER = "workqueue"
        return
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    settings = {"OMP_WAIT_POLICY": "passive"}
    if policy is None and "GOMP_SPINCOUNT" not in os.environ:
        settings["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    spincount = os.environ.get("GOMP_SPINCOUNT")
    try:
        numba.get_num_threads()  # starts the pool, loading libgomp now
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    global OPENMP_WAITS_PASSIVELY, OPENMP_SPINCOUNT_IN_EFFECT
    OPENMP_WAITS_PASSIVELY = numba.threading_layer() == "omp"
    OPENMP_SPINCOUNT_IN_EFFECT = spincount if OPENMP_WAITS_PASSIVELY else None


_start_thread_pool()


def kernel(fastmath=False):
    """Compile a kernel twice: parallel (the dispatcher returned) and serial (``.serial``).

    Handing a call to numba's thread pool cost 20-100 us on the 2-core VM of
    benchmarks/RESULTS.md when its workers had gone to sleep (see _start_thread_pool),
    and 1.5 us while they spin. A small call is done sooner by the calling thread alone,
    so the backend sends calls under ``numba_backend.PARALLEL_MIN_ELEMENTS`` to the
    serial twin, a copy of the function with its own name and so its own cache file.
    """

    def compile_both(function):
        parallel = njit(parallel=True, cache=True, nogil=True, fastmath=fastmath)(function)
        twin = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                                  function.__defaults__, function.__closure__)
        twin.__qualname__ = function.__qualname__ + "_serial"
        parallel.serial = njit(cache=True, nogil=True, fastmath=fastmath)(twin)
        return parallel

    return compile_both


@njit(cache=True, inline="always")
def valid_outputs(shift, stride, size, count):
    """[lo, hi): the outputs o < count whose input o*stride + shift lies in [0, size)."""
    lo = 0 if shift >= 0 else min(count, (stride - 1 - shift) // stride)
    if size - 1 - shift < 0:
        return lo, lo
    return lo, max(lo, min(count, (size - 1 - shift) // stride + 1))


@kernel()
def im2col_rows(x, n0, count, row0, rows, kh, kw, sh, sw, top, left, dh, dw, wo, cols):
    """Columns of output rows [row0, row0 + rows) of images n0 .. n0 + count - 1.

    x: (N, C, H, W). cols: (C*kh*kw, >= count*rows*wo); entry (c*kh*kw + i*kw + j,
    (k*rows + r)*wo + ow) = x[n0 + k, c, (row0 + r)*sh - top + i*dh, ow*sw - left + j*dw],
    or 0 where that position falls in the padding. Several images side by side make
    one wide GEMM; one call per band keeps the thread-pool wake-ups few.
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    taps = kh * kw
    depth = c_in * taps
    for task in prange(count * depth):
        k = task // depth
        row = task % depth
        n = n0 + k
        c = row // taps
        i = (row % taps) // kw
        j = row % kw
        shift = j * dw - left
        ow_lo, ow_hi = valid_outputs(shift, sw, w, wo)
        if sh == 1 and sw == 1 and wo == w:
            # 'same'-style rows: the band is one contiguous run of the input plane
            # shifted by `shift`, so copy it in one go and then zero the few entries
            # that wrapped around from a neighbouring row or fell in the padding.
            plane = x[n, c].reshape(h * w)
            dest = cols[row]
            r_lo, r_hi = valid_outputs(row0 - top + i * dh, 1, h, rows)
            first = (k * rows) * wo
            for q in range(first, first + r_lo * wo):
                dest[q] = 0
            for q in range(first + r_hi * wo, first + rows * wo):
                dest[q] = 0
            if r_hi > r_lo:
                start = (row0 + r_lo - top + i * dh) * w + shift
                stop = (row0 + r_hi - top + i * dh) * w + shift
                lo, hi = max(start, 0), min(stop, h * w)
                out = first + r_lo * wo - start
                # A run wholly in the padding (inputs narrower than the kernel) is empty:
                # no slice then, since a parallel loop quietly stops at a slice of
                # negative length instead of copying nothing.
                if hi > lo:
                    dest[out + lo : out + hi] = plane[lo:hi]
                for r in range(r_lo, r_hi):
                    base = first + r * wo
                    for ow in range(ow_lo):
                        dest[base + ow] = 0
                    for ow in range(ow_hi, wo):
                        dest[base + ow] = 0
            continue
        for r in range(rows):
            base = (k * rows + r) * wo
            ih = (row0 + r) * sh - top + i * dh
            if ih < 0 or ih >= h:
                for ow in range(wo):
                    cols[row, base + ow] = 0
                continue
            for ow in range(ow_lo):
                cols[row, base + ow] = 0
            if sw == 1:
                # A contiguous run: a slice copy that LLVM turns into a memcpy.
                cols[row, base + ow_lo : base + ow_hi] = x[n, c, ih, ow_lo + shift : ow_hi + shift]
            else:
                for ow in range(ow_lo, ow_hi):
                    cols[row, base + ow] = x[n, c, ih, ow * sw + shift]
            for ow in range(ow_hi, wo):
                cols[row, base + ow] = 0


@kernel()
def im2col_2x2_stride2(x, n0, count, row0, rows, wo, cols):
    """im2col_rows for a 2x2 kernel at stride 2 with no padding (space to depth).

    cols[c*4 + i*2 + j, (k*rows + r)*wo + ow] = x[n0 + k, c, 2*(row0 + r) + i, 2*ow + j].
    Each parallel step splits one (image, channel) plane's rows, indexing the arrays
    directly: a step per pair of rows, taking four row views each, ran 1.03-1.19x
    slower on the U-Nets' up-conv gradients.
    """
    c_in = x.shape[1]
    for task in prange(count * c_in):
        k = task // c_in
        c = task % c_in
        for r in range(rows):
            ih = 2 * (row0 + r)
            base = (k * rows + r) * wo
            for ow in range(wo):
                cols[4 * c, base + ow] = x[n0 + k, c, ih, 2 * ow]
                cols[4 * c + 1, base + ow] = x[n0 + k, c, ih, 2 * ow + 1]
                cols[4 * c + 2, base + ow] = x[n0 + k, c, ih + 1, 2 * ow]
                cols[4 * c + 3, base + ow] = x[n0 + k, c, ih + 1, 2 * ow + 1]


@kernel()
def depth_to_space_2x2(cols, bias, out, first_channel):
    """out[n, first_channel + c, 2*h + i, 2*w + j] = cols[n, c*4 + i*2 + j, h*W + w] + bias[c].

    col2im_gather for a 2x2 kernel at stride 2 with no padding, whose windows do not
    overlap (the U-Net's up-conv forward), with the bias added in the same pass. out:
    (N, C_out, 2H, 2W) with C_out >= first_channel + C; writing from ``first_channel``
    on lets the up-conv land straight in its channels of the U-Net's concatenation.
    Each parallel step fills one (image, channel) plane, indexing the arrays directly
    (a step per pair of rows, taking four row views each, ran 1.07-3.9x slower on the
    U-Nets' up-convs, the most on the narrowest maps).
    """
    n_img, c_up = cols.shape[0], cols.shape[1] // 4
    h, w = out.shape[2] // 2, out.shape[3] // 2
    for task in prange(n_img * c_up):
        n = task // c_up
        c = task % c_up
        b = bias[c]
        plane = first_channel + c
        for r in range(h):
            base = r * w
            for q in range(w):
                out[n, plane, 2 * r, 2 * q] = cols[n, 4 * c, base + q] + b
                out[n, plane, 2 * r, 2 * q + 1] = cols[n, 4 * c + 1, base + q] + b
                out[n, plane, 2 * r + 1, 2 * q] = cols[n, 4 * c + 2, base + q] + b
                out[n, plane, 2 * r + 1, 2 * q + 1] = cols[n, 4 * c + 3, base + q] + b


@kernel()
def col2im_gather(cols, kh, kw, sh, sw, top, left, dh, dw, ho, wo, dx):
    """dx (N, C, H, W) = the adjoint of im2col applied to ``cols`` (N, C*kh*kw, ho*wo).

    Input pixel (h, w) receives the entry of tap (i, j) at output (oh, ow) when
    oh*sh = h + top - i*dh and ow*sw = w + left - j*dw. Each parallel step owns one
    input row (n, c, h) and sums everything that lands in it, taps in (i, j) order, so
    no two steps write the same pixel and no atomics are needed.
    """
    n_img, c_in, h, w = dx.shape
    for task in prange(n_img * c_in * h):
        n = task // (c_in * h)
        c = (task // h) % c_in
        ih = task % h
        for iw in range(w):
            dx[n, c, ih, iw] = 0
        for i in range(kh):
            oh_scaled = ih + top - i * dh
            if oh_scaled < 0 or oh_scaled % sh != 0 or oh_scaled // sh >= ho:
                continue
            oh = oh_scaled // sh
            for j in range(kw):
                row = (c * kh + i) * kw + j
                shift = j * dw - left
                ow_lo, ow_hi = valid_outputs(shift, sw, w, wo)
                for ow in range(ow_lo, ow_hi):
                    dx[n, c, ih, ow * sw + shift] += cols[n, row, oh * wo + ow]


@kernel()
def row_shift_sum(z, count, rows_in, dh, y, n0, r0):
    """y[n0 + k, o, r0 + r] = sum over i of z[i*O + o, row (k*rows_in + r + i*dh)].

    z: (kH*O, count*rows_in*Wo), the product of the weight's kernel rows with columns
    of the kernel's width over ``rows_in`` input rows per image (rows of Wo pixels);
    kernel row i sees those rows shifted by i*dh. y: (N, O, Ho, Wo); the band has
    rows_in - dh*(kH - 1) output rows. One parallel step per output row.
    """
    o_ch, wo = y.shape[1], y.shape[3]
    kh = z.shape[0] // o_ch
    rows = rows_in - dh * (kh - 1)
    for task in prange(count * o_ch * rows):
        k = task // (o_ch * rows)
        o = (task // rows) % o_ch
        r = task % rows
        dest = y[n0 + k, o, r0 + r]
        start = (k * rows_in + r) * wo
        dest[:] = z[o, start : start + wo]
        for i in range(1, kh):
            shifted = start + i * dh * wo
            source = z[i * o_ch + o]
            for q in range(wo):
                dest[q] += source[shifted + q]


# ---- direct 3x3 stride-1 convolution, for few channels ----------------------------------
# With 16-32 channels an im2col GEMM is skinny (16 output rows over 65536 pixels): BLAS
# runs it at a third of its peak and the column matrix is 9x the input, written and read
# back. These kernels read a zero-padded copy of the input instead and keep the 3x3
# windows in registers: the forward's pass over two rows of pixels loads 12 shifted
# vectors (4 input rows) and feeds them to 2 output channels (36 FMAs per 16 loads and 4
# stores), with the 18 taps held in registers. Measured 1.5-3x faster than im2col + GEMM
# on maps 128 or more pixels wide with up to 32x32 channels, slower on narrow maps and
# with many channels, where the backend takes the GEMMs or Winograd (its DIRECT_RULES
# and DIRECT_OVER_WINOGRAD_RULES).
# The padded copy pays for itself: a forward kernel that read the unpadded input (zero
# rows for the border, edge columns summed one by one) ran 1.4-1.7x slower than copy plus
# kernel on the U-Net's 64- and 128-wide maps (40 alternated calls each), most likely
# because the planes of a 2^k x 2^k map lie a power of two apart and their rows compete
# for the same L1 sets; the padded planes (130 x 130) do not.
# The flags allow contraction to FMA and, in the weight gradient's sums, reassociation
# (to vectorise them); NaN and Inf still propagate.
DIRECT_OUTPUT_BLOCK = 2


@kernel()
def pad_images(x, top, left, xp):
    """xp (N, C, Hp, Wp) = x (N, C, H, W) placed at (top, left) in a zero border."""
    n_img, c_in, h, w = x.shape
    hp = xp.shape[2]
    for plane in prange(n_img * c_in):
        n = plane // c_in
        c = plane % c_in
        for r in range(hp):
            ih = r - top
            if ih < 0 or ih >= h:
                xp[n, c, r, :] = 0
                continue
            xp[n, c, r, :left] = 0
            xp[n, c, r, left : left + w] = x[n, c, ih]
            xp[n, c, r, left + w :] = 0


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
    the input channels in order. Two rows of two channels beat one row of four (the
    kernel's earlier block), whose 36 taps did not fit in the registers and were
    reloaded for every FMA: 1.3-1.9x faster alone on nine U-Net layers; four rows of
    one channel came second (1.2-1.7x) and four rows of two did not vectorise. Bias and
    ReLU are a separate pass (``bias_relu``): applied here to each finished row, they
    made the kernel 15% slower, even when switched off (measured with the old block).
    """
    n_img, o_ch, ho, wo = y.shape
    blocks = o_ch // DIRECT_OUTPUT_BLOCK
    pairs = (ho + 1) // 2
    # Channel blocks vary fastest, so a thread's consecutive steps read the same input
    # rows from L1 (measured alone on seven U-Net layers with the old block: 1.06-1.16x
    # faster on five, 0.97-0.98x on two).
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
# exactly two (its s.. and t.. sums); the backend needs O to be a multiple.
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
    (row by row, that reduction cost more than the row's FMAs; measured 1.3-1.6x faster
    on the U-Net's 64- and 128-wide maps). The zeros add 0 * x, which changes nothing
    unless x holds Inf or NaN: an Inf or NaN in the first or last columns of the padded
    input can then make any tap NaN where numpy's is finite or Inf.
    A parallel step owns two output channels and one input channel and keeps their 18
    sums in registers: each input vector loaded feeds two FMAs (1.11-1.32x faster than
    one output channel a step, measured alone on six U-Net layers).
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


# Rows of each operand per parallel step of ``stacked_gram``, whose body is written for
# exactly four of each (its 16 sums); the backend needs both row counts to be multiples.
GRAM_BLOCK = 4


# BLAS's row-major cblas_sgemm and cblas_dgemm with 64-bit integers (an ILP64 build),
# under the names tinyunet.backends.blas registers their addresses by before calling
# gemm_parts. Declared by name, not address, so the compiled kernel can be cached.
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
    taps). BLAS runs those skinny products at 40-100 GFLOP/s on this project's 2-core
    machine (benchmarks/RESULTS.md). Here a parallel step owns 4 rows of a and 4 of b
    and keeps their 16 dot products in registers, so each vector loaded feeds 4 FMAs:
    1.3-2.2x faster than BLAS on the Winograd weight gradients of 16-128 channels and
    1.35-5x on im2col's of 8-64 output channels (measured alone); slower from 256
    channels, whose GEMMs BLAS runs near its peak, and on short T (the backend's
    ``_gram_wins`` says where it is used).
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
    their rows, each a loop over the channels that vectorises. As one GEMM with the
    (alpha^2, 9) Kronecker product of G, in numpy, it took a quarter of A's 8x8 256 ->
    256 forward (0.56 of 2.0 ms); on 256 x 256 filters this kernel takes 240-260 us
    against that GEMM's 380-400 (F(2x2)), and 440-500 against 970-1030 (F(4x4)).
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
    channel and transforms a tile at a time, its 16 values held in registers (measured
    on the U-Nets' layers: 1.5-2.5x faster than whole-row sums with one loop per output
    run, whose loops are only tw long).
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
    tile at a time (1.1-1.5x faster than whole-row sums, measured as for the input's).
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
    4*ty, column 4*tx. The padding is applied here, not copied first (a padded copy
    took 6-15% of B's Winograd convs). A parallel step owns one channel. Per tile row,
    B^T runs down the columns of its 6 input rows as whole-row sums (contiguous,
    vectorised; rows in the border read a zero row), then B along each of the 6
    resulting rows, one loop per row with 6 output runs (a tile at a time, 36 values in
    registers, ran 5-10x slower: too many to vectorise).
    """
    n_img, c_in, h, w = x.shape
    wp = 4 * tw + 2
    rows = v.shape[2] // tw
    two, four, five = x.dtype.type(2), x.dtype.type(4), x.dtype.type(5)
    zeros = np.zeros(w, dtype=x.dtype)
    for c in prange(c_in):
        s = np.zeros((6, wp), dtype=x.dtype)
        # The image's columns of each row of s; those outside [left, left + w) stay zero.
        # Indexed by the loop's own j (s[0, left + j] instead: numba wraps a possibly
        # negative index, and this loop ran 2-4x slower).
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
            # Row by row, written out: a loop over the 6 rows ran 1.4-1.7x slower.
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
    checks (measured 5-30x faster than the general kernel on the U-Net's maps). Each
    output row is worked out in two small arrays of the step's own and then copied out:
    written straight into y and argmax, the loop ran 5-12x slower on 16- and 32-wide
    maps (measured alone; level on 64- and 128-wide ones).
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
    The winner's flat index h*W + w addresses the plane's flat view directly (splitting
    it into row and column, two integer divisions an output, made the kernel 1.8-3.3x
    slower on the U-Nets' 2x2 pools, measured alone).
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
    row (a step per element, finding its row by division, ran 3x slower on the U-Nets'
    logits, measured alone)."""
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


# ---- optimizer updates: every parameter in one call ------------------------------------
# Parameter i's values, gradient and state are entry i of flat arrays in numba typed
# Lists (parameters, state) or tuples (gradients, new every step; and the buffers when
# the kernel ignores them); ``spans`` rows (i, start, stop) cut them into pieces of
# similar size, one parallel step each, so one call updates a whole model (measured on
# 46 arrays of 2.75M values in all, like a U-Net's: 1.05-1.24 ms against 1.26-1.53 ms
# for a call each).


@njit(cache=True, inline="always")
def _sgd_piece(param, grad, buf, lr, momentum, keep, nesterov, weight_decay, first):
    dt = param.dtype.type
    lr, momentum, keep, weight_decay = dt(lr), dt(momentum), dt(keep), dt(weight_decay)
    for k in range(param.size):
        g = grad[k]
        if weight_decay != 0:
            g = g + weight_decay * param[k]
        if momentum != 0:
            b = g if first else buf[k] * momentum + keep * g
            buf[k] = b
            g = g + momentum * b if nesterov else b
        param[k] = param[k] - lr * g


@kernel()
def sgd_update(params, grads, buffers, spans, lr, momentum, keep, nesterov, weight_decay,
               first):
    """One SGD step on every parameter, in place, in the numpy reference's order of operations.

    g = grad + wd*param; buf = g (first step) or buf*momentum + keep*g, keep = 1 -
    dampening; step = g + momentum*buf (nesterov) or buf; param -= lr*step. ``buf``
    is untouched when momentum is 0. Scalars arrive as Python floats and are rounded
    to the arrays' dtype once, as numpy does with Python scalars.
    """
    for piece in prange(spans.shape[0]):
        i, lo, hi = spans[piece, 0], spans[piece, 1], spans[piece, 2]
        _sgd_piece(params[i][lo:hi], grads[i][lo:hi], buffers[i][lo:hi], lr, momentum, keep,
                   nesterov, weight_decay, first)


@njit(cache=True, inline="always")
def _adam_piece(param, grad, m, v, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias2, eps, weight_decay, decay_factor, decoupled):
    dt = param.dtype.type
    step_size, beta1, one_minus_beta1 = dt(step_size), dt(beta1), dt(one_minus_beta1)
    beta2, one_minus_beta2, bias2, eps = dt(beta2), dt(one_minus_beta2), dt(bias2), dt(eps)
    weight_decay, decay_factor = dt(weight_decay), dt(decay_factor)
    for k in range(param.size):
        g = grad[k]
        p = param[k]
        if decoupled:
            p = p * decay_factor
        elif weight_decay != 0:
            g = g + weight_decay * p
        mk = m[k] * beta1 + one_minus_beta1 * g
        vk = v[k] * beta2 + one_minus_beta2 * g * g
        m[k] = mk
        v[k] = vk
        param[k] = p - step_size * mk / (np.sqrt(vk / bias2) + eps)


@kernel()
def adam_update(params, grads, exp_avgs, exp_avg_sqs, spans, step_size, beta1,
                one_minus_beta1, beta2, one_minus_beta2, bias2, eps, weight_decay,
                decay_factor, decoupled):
    """One Adam (AdamW when ``decoupled``) step on every parameter, in place.

    m = m*b1 + (1-b1)*g; v = v*b2 + ((1-b2)*g)*g;
    param -= (step_size*m) / (sqrt(v / bias2) + eps), step_size = lr / bias1;
    AdamW first scales param by decay_factor = 1 - lr*wd, Adam adds wd*param to g.
    The order of operations is the numpy reference's, so the rounding is the same.
    """
    for piece in prange(spans.shape[0]):
        i, lo, hi = spans[piece, 0], spans[piece, 1], spans[piece, 2]
        _adam_piece(params[i][lo:hi], grads[i][lo:hi], exp_avgs[i][lo:hi],
                    exp_avg_sqs[i][lo:hi], step_size, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, bias2, eps, weight_decay, decay_factor, decoupled)
