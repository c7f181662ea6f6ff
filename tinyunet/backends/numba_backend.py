"""The fast CPU backend: numba kernels for data movement, BLAS GEMMs for the arithmetic.

Shapes: x (N, C, H, W); w (O, C, kH, kW); y (N, O, Ho, Wo), all C-contiguous numpy
arrays, so ``xp`` is numpy and tensors move freely between this backend and ``numpy``.

How a convolution runs here (``python -m benchmarks.ops`` times each U-Net layer):

* 3x3 stride-1 convs with many channels run as Winograd convolutions (Lavin & Gray
  2016), unless the direct kernels below take them (the weight gradient tries
  Winograd first; see conv2d_grad_weight): F(4x4, 3x3) computes each 4x4 block of
  outputs from a 6x6 input tile with 36 multiplies instead of 144, F(2x2, 3x3) each 2x2
  block from a 4x4 tile with 16 instead of 36, so alpha^2 GEMMs (C_out, C_in) @ (C_in,
  tiles) (alpha = 6 or 4) do 4x or 2.25x less arithmetic than im2col's one. Those GEMMs
  are shared out among the threads, whole GEMMs each (blas.gemm). F(4x4) takes
  output sides that are multiples of 4 on maps 16 or more wide, with enough tiles
  (``WINOGRAD_4X4_MIN_WIDTH``, ``WINOGRAD_4X4_MIN_TILES``, ``WINOGRAD_4X4_MIN_CHANNELS``;
  fewer channels on maps narrower than ``WINOGRAD_4X4_NARROW_BELOW_WIDTH``), F(2x2) the
  8-wide deep levels and other even sides (``WINOGRAD_MIN_CHANNELS``,
  ``WINOGRAD_MIN_WORK``). The forward, the input gradient (the adjoint conv, whose
  filter transforms are the forward's with the taps reversed) and the weight gradient
  (the adjoint of the forward's steps) all take them, band by band of tile rows
  (``WINOGRAD_BUDGET``). Rounding: each output sums other products than im2col's,
  within float32 rounding of the GEMM paths (F(4x4)'s transforms lose a few more bits:
  about 5e-6 of the largest output on 64 channels).
  Inf and NaN: the transforms add and subtract neighbouring values whose coefficients
  cancel only in exact arithmetic, so an Inf input can give NaN where the other paths
  give Inf, and under F(4x4) a NaN input reaches outputs of its 4x4 tiles beyond its
  3x3 neighbourhood (outputs outside those tiles are unaffected).
* 3x3 stride-1 convs with few channels on wide maps (``DIRECT_RULES``, and
  ``DIRECT_OVER_WINOGRAD_RULES`` where Winograd competes: the U-Net's outer levels)
  skip im2col and BLAS: a padded copy of the input and the direct kernels of direct3x3,
  for the forward, the input gradient (again a conv, with the flipped weight) and the
  weight gradient. Their GEMMs would be skinny (16 rows over
  65536 pixels) and run far below BLAS's peak. The weight gradient's direct kernel
  also wins on somewhat more channels (``GRAD_WEIGHT_DIRECT_RULES``).
* Row stride 1 on maps of ROW_SHIFT_MIN_PIXELS or more, with no more output channels
  than input channels (most of the U-Net's other 3x3 convs): columns of the kernel's
  width only, kH times fewer than im2col's, over a band of input rows; one GEMM with
  the weight's kernel rows stacked, then ``row_shift_sum`` adds each kernel row's
  share, shifted by its row, into the output.
* Every other conv is im2col + BLAS GEMMs. Forward: output rows are processed in
  bands. ``im2col_rows`` writes one band's columns, padding included, straight into
  a reusable buffer of at most ``COLUMN_BUDGET`` bytes, and one GEMM writes
  (O, band pixels) into the output. The buffer stays in cache between the two, and
  no padded copy or full column matrix of the batch is made. Small maps (deep
  levels) put several images side by side into one wider GEMM instead of N narrow
  ones.
* Input gradient, stride 1: a forward conv of dy with the weight flipped and
  transposed (the adjoint), so it takes one of the paths above and needs no col2im.
  Other strides (the U-Net's 2x2 stride-2 transposed conv): one batched GEMM and
  one gather (``col2im_gather``), which for 2x2 stride 2 is a pixel shuffle. Where a
  direct 3x3 'same' conv's input and weight gradients are both wanted
  (``conv2d_grads``), they read one padded dy; the up-conv's three gradients
  (``conv_transpose2d_grads``) one space-to-depth of dy.
* Weight gradient (row stride 1, maps of ROW_SHIFT_MIN_PIXELS or more): columns of
  the kernel's width only, over the input rows of a band; each kernel row is a
  shifted window of that one matrix and one GEMM, so kH times fewer columns are
  written than by im2col. Other strides and smaller maps use the forward's bands.
  Either way the batch's columns never exist all at once.
* 1x1 stride-1 convs (the U-Net's head) skip im2col: the input already is the
  column matrix.
* The weight gradients' GEMMs dY @ X^T (Winograd's per tile value, im2col's on
  whole images, the 1x1 conv's) multiply two matrices of few rows over a long shared
  dimension, which BLAS runs far below its peak. Where one has at most
  ``GRAM_MAX_ROWS`` rows and the shared dimension is long enough (``_gram_wins``),
  gemm.stacked_gram computes them as dot products instead. im2col's bands of rows
  of one image and the row-shift path's windows are views with gaps and stay in BLAS.

Every kernels/cpu kernel but the direct convs goes through ``_run``: calls on fewer than
``PARALLEL_MIN_ELEMENTS`` elements take the kernel's serial compile.
"""

from __future__ import annotations

import math

import numpy as np
from numba import typed

from ..kernels.cpu import direct3x3, elementwise, gemm, im2col, optim, pool, winograd
from . import blas
from .interface import Backend, ConvGeometry, PoolGeometry

# Bytes of im2col columns produced per GEMM. Big enough for GEMMs of a few thousand
# columns, small enough to stay in the L2/L3 cache and to keep peak memory low.
COLUMN_BUDGET = 4 << 20
# Which 3x3 stride-1 convs run the direct forward kernel (their forward and, a conv
# itself, their input gradient): (minimum output width, maximum C_in * C_out) pairs,
# any one of which suffices. The direct kernels vectorise along image rows, so they
# need long rows; the GEMMs win once channels are many. Set from a sweep over the
# benchmark U-Nets' layers, before the weight gradient got rules of its own (forward and
# weight gradient, direct vs GEMM): direct won on the 128- and 256-wide maps up to
# 32x32 channels, GEMMs on every map of 32 pixels or narrower. On 64-wide maps, timing
# a layer's three passes with the two paths alternating: direct 1.7-2.3x faster for
# 8->8 and 16->8, 1.18x for 16->32, even at 32->32, GEMMs 1.1x faster at 64->32.
# Since Winograd's GEMM stacks are split among the threads (now blas.gemm), F(4x4)
# beats direct on B's 32->32 layer at 256x256 (forward 16.4 -> 13.6 ms, input gradient
# 15.9 -> 13.7 ms, alone) and its rule (32x32 channels on 128-wide maps) went: B's step
# 763 -> 710 ms, with the next rule's change (12 alternated pairs). Once the forward
# kernel took two rows of two channels a step (1.3-1.9x faster alone), wider rules were
# measured again and lost or tied: up to 32x32 channels on 64-wide maps (A's step 2%
# slower, C's the same), up to 16x32 on 32-wide maps (A and C the same), up to 32x32 on
# 128-wide maps (B's step 2% slower).
DIRECT_RULES = ((64, 16 * 32),)
# The same rules for the layers that Winograd takes too (_winograd_tile), tried first.
# Once the Winograd bands got a spare row and the filter transforms a kernel of their
# own, F(4x4) beat the direct kernels on A's 16 <-> 32-channel layers (three passes,
# alone: 1.45-1.55x on 64-wide maps, 1.13x for 32 -> 16 at 128x128; 0.87x for 16 -> 16
# at 128x128), so among them only 16x16 channels on 128-wide maps stay direct: with
# WINOGRAD_4X4_MIN_CHANNELS at 16, A's step 1.4% and 1.6% faster (25 and 30 alternated
# pairs), its inference 1.6% (40 pairs), its step's peak 95 MiB against 98.
DIRECT_OVER_WINOGRAD_RULES = ((128, 16 * 16),)
# The same for the weight gradient alone, whose direct kernel beats its GEMMs on more
# channels than the forward's. Measured on the benchmark U-Nets' layers, the two paths
# alternating: direct 1.25x for 32->32 and 1.5x for 64->32 on 64-wide maps, 0.97x for
# 32->64 (which the rule, counting C_in * C_out, admits: within this machine's noise);
# on 128-wide maps 1.1x up to 64->64, 0.97x for 128->64; on 256-wide 1.3x for 32->32,
# 1.02x for 64->32; on 32-wide maps GEMMs 1.2-2x faster. Measured before Winograd, which
# the weight gradient tries first: the direct kernel now keeps the layers that F(4x4)
# does not take (under 16 channels on a side, see WINOGRAD_4X4_MIN_CHANNELS).
GRAD_WEIGHT_DIRECT_RULES = ((128, 64 * 64), (64, 64 * 32))
# Which 3x3 stride-1 convs with even output sides run as Winograd F(2x2, 3x3): 2.25x
# fewer multiplies, in 16 GEMMs of (C_out, C_in) @ (C_in, tiles), plus transforms that
# cost about as much as a padded copy. It pays once those GEMMs are big enough to run
# near BLAS's peak: both channel counts at least WINOGRAD_MIN_CHANNELS and C_in * C_out *
# tiles (the work of one of the 16 GEMMs) at least WINOGRAD_MIN_WORK. Measured per pass
# against the paths below, alternating: 1.3-1.9x faster for the forward and both
# gradients of 128- to 1024-channel layers on config B's 16- to 64-wide maps, 1.04-1.37x
# on 64 channels over 128-wide maps and on config A's 64- to 256-channel layers (before
# F(4x4), which now takes the maps 32 or more wide); slower for 32 -> 64 channels (0.84x
# forward) and for 64 -> 64 channels on 8x8 maps of 8 images (0.8x), which the two
# limits leave out. The work limit was 2^23 until the GEMM stacks were split among
# threads (now blas.gemm); 2^21 then also admits A's 64- to 256-channel layers
# on its 8- and 16-wide maps: A's step 5.7% faster (medians of 30 alternated pairs,
# twice; 2^22: 2.5%). Once the GEMMs ran on numba's pool, 32 channels and 2^18 also
# admit config C's bottom (32 <-> 64 channels, 8x8 maps of 8 images), whose im2col
# GEMMs they replace: C's step 4% faster (40 alternated pairs; 64 channels and 2^19,
# its 64 -> 64 layers alone: 1-3%). No layer of A's or B's changes route.
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_WORK = 1 << 18
# Winograd F(4x4, 3x3) (4x4 output tiles, 36 multiplies instead of 144: 1.78x fewer than
# F(2x2, 3x3), and transformed inputs 2.25x the input's size instead of 4x) takes output
# sides that are multiples of 4 on maps at least WINOGRAD_4X4_MIN_WIDTH wide, where its
# transforms' loops are long enough, with both channel counts at least
# WINOGRAD_4X4_MIN_CHANNELS and (but for the weight gradient) outside the direct
# kernels' rules. Measured per pass, alternating, against the path each layer took
# before: 1.13-1.34x faster than F(2x2) on 64- and 128-wide maps of 64-128 channels,
# 1.1-1.55x faster than the GEMMs for 32 -> 64 channels on 32- and 128-wide maps,
# 2.5-2.75x for 64 -> 32 channels on 256-wide maps (forward and input gradient); slower
# than the direct kernels on their layers then (0.76-0.97x; but see
# DIRECT_OVER_WINOGRAD_RULES). With its GEMM stacks split (now blas.gemm), its weight
# gradient also beats the direct one on B's 256-wide 64 -> 32 layer (36.9 -> 23.3 ms
# alone), which a rule had kept from it while the direct one was 1.5x faster. On 16-wide
# maps it lost to F(2x2) (0.57-0.88x per pass) until the GEMM stacks were split and the
# weight gradient's GEMMs went to stacked_gram; then, per layer (three passes, alone),
# F(4x4) was 1.15-1.2x faster on A's 64- to 256-channel layers at 16x16 (64 tiles of 4x4
# in its batch of 4) but 0.73-0.9x on B's 256- to 1024-channel ones (32 tiles in its
# batch of 2): GEMMs over 32 tiles run far below BLAS's peak. So it takes maps from 16
# wide with at least WINOGRAD_4X4_MIN_TILES tiles in the batch: A's step 2.2-2.6% faster
# (medians of 20 and 30 alternated pairs), C's 4.6% (30), A's inference 2% (30). From 8
# wide (A's 16 tiles), A's step was 1% slower.
WINOGRAD_4X4_MIN_WIDTH = 16
WINOGRAD_4X4_MIN_TILES = 64
# F(4x4) needs 16 channels on each side (and the map width and tiles above). At 32,
# A's 16-channel weight gradients went direct: from 16 they were 1.15-1.8x faster alone
# and A's step 1.4-7.5% faster, but with 16 MiB bands the step's peak rose from 95-101
# to 120 MiB, above PyTorch's 88-113, until WINOGRAD_FEW_CHANNELS_BUDGET (below).
WINOGRAD_4X4_MIN_CHANNELS = 16
# On maps narrower than this, where no direct kernel competes (DIRECT_RULES), F(4x4)
# takes layers from WINOGRAD_4X4_NARROW_MIN_CHANNELS on: config C's 32-wide layers of
# 8-32 channels, whose im2col GEMMs are skinny. C's step 5% and 7% faster (medians of
# 50 alternated pairs, twice); A and B have no such layer. From 8 channels on every map
# width instead made A's step 6.5% slower (its 16-channel weight gradients).
WINOGRAD_4X4_NARROW_BELOW_WIDTH = 64
WINOGRAD_4X4_NARROW_MIN_CHANNELS = 8
# Bytes of transformed input (and of the GEMMs' product) per band of tile rows: bands
# keep those scratch arrays, 2.25x (F(4x4)) or 4x (F(2x2)) the size of the input and
# output they stand for, from growing with the map. Bigger bands mean bigger GEMMs and
# fewer calls: with F(4x4) on, 16 MiB bands against 4 MiB made B's step 11% faster
# (1088 vs 1208 ms, 10 alternated pairs) and A's 5% (242 vs 256 ms, 25 pairs), and raised
# the step's peak from 298 to 321 MiB on B and from 90 to 94 MiB on A (8 MiB: 321 and
# 96).
WINOGRAD_BUDGET = 16 << 20
# Channel rows that the Winograd bands' transformed tiles and products have beyond the
# layer's channels, unused. Without them the alpha^2 runs that a transform writes or
# reads together lie C * span floats apart, a multiple of 4 KiB whenever C * span is a
# multiple of 1024, as it is on the U-Nets' power-of-two layers: all in the same few
# cache sets. One spare row spreads them, unless span * itemsize is itself a multiple
# of 4 KiB (A's 64-wide F(4x4) layers, one band of 1024 tiles, gain nothing): A's
# F(4x4) transforms took 18.8 rather than 22.2 ms of its step (20 alternated steps).
# Alone, the input transform ran 1.2-1.5x faster on 16- and 32-wide maps of 64, 256
# and 512 channels, 0.86-1.03x on others.
WINOGRAD_SPARE_ROWS = 1
# Layers with fewer than WINOGRAD_FEW_CHANNELS channels on a side keep their bands within
# WINOGRAD_FEW_CHANNELS_BUDGET instead, so they fit the scratch buffers that A's 64-
# channel layers need anyway (9 MiB each): its step's peak stayed at 95 MiB with F(4x4)
# on its 16-channel layers. 16 MiB bands there were no faster (A's step 0.9% slower, 30
# alternated pairs). 1 MiB rather than 8 cut config C's step peak from 39.5 to 36.0 MiB
# (PyTorch's: 37.5-40.0 in the same probes), its 8- to 32-channel layers then taking
# 2-3 bands, for a step 1.3% and 1.8% slower (1 and 2 MiB; 200 alternated pairs each);
# A's step and peak stayed the same (0.5%, 92.8 against 92.3 MiB).
WINOGRAD_FEW_CHANNELS = 32
WINOGRAD_FEW_CHANNELS_BUDGET = 1 << 20
# The weight gradients' GEMMs a @ b^T (a: output channels by tiles or pixels; b: input
# channels, or channels times taps, by the same) run in gemm.stacked_gram when one
# operand has at most GRAM_MAX_ROWS rows, the other at most GRAM_MAX_OTHER_ROWS, both a
# multiple of its block, and their shared length is at least GRAM_MIN_LENGTH; else in
# BLAS. Measured alone, against BLAS, on shared lengths of 512 or more: 1.3-2.2x faster
# on Winograd's (36, O, tiles) stacks up to 64 x 128 channels, 1.14-1.5x for 32-64 x
# 256-512, 1.05x at 128 x 128, 0.75x at 256 x 256; 1.05-5.2x on im2col's for 8-64
# output channels over up to 2304 rows (256 channels x 9 taps), 0.72x for 32 x 4608;
# 1.05x for 128 x 1152 and 0.79x for 256 x 1152. On lengths of 64-256 it is 0.57-1.07x
# as fast: each 4x4 block then ends in 16 lane reductions after few FMAs.
GRAM_MAX_ROWS = 64
GRAM_MAX_OTHER_ROWS = 2304
GRAM_MIN_LENGTH = 512
# Kernels on fewer elements than this run serially on the calling thread: waking
# numba's pool (about 0.1 ms on workqueue when GEMMs run in between, 20-45 us on
# passive OpenMP once its workers sleep) costs more than they take. Measured with GEMMs
# in between, on workqueue: a ReLU of 300k float32 values ran faster serially (72 vs 103
# us), im2col of 130k inputs too, im2col of 260k faster in parallel; on OpenMP with no
# spinning, 2^16 instead of 2^18 changed nothing on C's step (40 alternated pairs) and
# 2^20 made it 13% slower. Once OpenMP's workers spun briefly (runtime.
# OPENMP_SPIN_COUNT, then 1000 spins), a call right after another found them awake:
# against 2^18, 2^16 made C's step 5.6% and A's 3.8% faster (40 and 20 alternated
# pairs); against 2^16, 2^14 C's 2.4% (A's the same), 2^12 C's 2-2.4%, A's and B's
# within 1%, 0 C's 2%. Not measured again since they spin for 2-3 ms.
PARALLEL_MIN_ELEMENTS = 1 << 14
# The row-shift paths (forward and weight gradient) need maps of this many output pixels:
# on 16x16 and smaller, the weight gradient's GEMMs over one image each ran up to 5x
# slower than one GEMM over the batch's columns, and the forward's kH - 1 extra rows
# per image are 12% more arithmetic (measured on the U-Net's deep levels).
ROW_SHIFT_MIN_PIXELS = 32 * 32
# The optimizer updates take the gradients as a tuple (_gradient_tuple), whose length
# numba compiles for: rounded up to a multiple of this, a few lengths cover every model.
GRADIENT_TUPLE_STEP = 16
# Elements of a sample's row per parallel step of the one-channel Dice/IoU gradient
# (elementwise.sigmoid_overlap_backward).
OVERLAP_BACKWARD_PIECE = 2048
# Elements per parallel step of the optimizer updates: big enough to stream, small
# enough that the pieces of a model's parameters share the threads evenly.
UPDATE_PIECE = 1 << 15


def _contiguous(a):
    return np.ascontiguousarray(a)


def _run(kernel, elements, *args):
    """Call a kernels/cpu kernel: in parallel, or serially when ``elements`` is too few."""
    return (kernel if elements >= PARALLEL_MIN_ELEMENTS else kernel.serial)(*args)


def _gram_wins(rows_a, rows_b, length):
    """Whether a @ b^T, for a of ``rows_a`` rows and b of ``rows_b``, both ``length``
    long, goes to gemm.stacked_gram rather than BLAS (see GRAM_MAX_ROWS)."""
    return (min(rows_a, rows_b) <= GRAM_MAX_ROWS
            and max(rows_a, rows_b) <= GRAM_MAX_OTHER_ROWS and length >= GRAM_MIN_LENGTH
            and rows_a % gemm.GRAM_BLOCK == 0 and rows_b % gemm.GRAM_BLOCK == 0)


def _add_gram(a, b, out):
    """out += a @ b^T for 2-D a (I, T), b (J, T) and out (I, J); BLAS where the kernel
    would lose, or where a or b is a view with gaps (a band of rows of an image)."""
    if (_gram_wins(len(a), len(b), a.shape[1])
            and a.flags.c_contiguous and b.flags.c_contiguous):
        _run(gemm.stacked_gram, a.size + b.size, a[None], b[None], True, out[None])
    else:
        blas.gemm(a, b.T, out, accumulate=True)


def _direct_3x3(c_in, c_out, kernel_hw, geometry, output_width, rules):
    """Whether a conv goes to the direct 3x3 kernels rather than im2col + BLAS."""
    if kernel_hw != (3, 3) or geometry.stride != (1, 1) or geometry.dilation != (1, 1):
        return False
    return any(output_width >= width and c_in * c_out <= channels for width, channels in rules)


def _grad_weight_route(c_in, c_out, kernel_hw, geometry, batch, output_hw):
    """(direct, tile) for a conv's weight gradient: whether the direct 3x3 kernel takes
    it, and the output tile of the Winograd variant that does (0 for none). Winograd is
    tried first (see conv2d_grad_weight), so at most one of the two is set."""
    tile = _winograd_tile(c_in, c_out, kernel_hw, geometry, batch, output_hw)
    direct = (not tile and c_out % direct3x3.GRAD_WEIGHT_OUTPUT_BLOCK == 0
              and _direct_3x3(c_in, c_out, kernel_hw, geometry, output_hw[1],
                              GRAD_WEIGHT_DIRECT_RULES))
    return direct, tile


def _flipped(w):
    """The weight (C, O, kH, kW) of the adjoint conv of w (O, C, kH, kW): each filter
    rotated by 180 degrees, input and output channels swapped."""
    return _contiguous(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def _is_2x2_stride2(kernel_hw, geometry):
    """The U-Net's up-conv geometry: 2x2 windows at stride 2 that tile the map exactly."""
    return (kernel_hw == (2, 2) and geometry.stride == (2, 2) and geometry.dilation == (1, 1)
            and not any(geometry.padding))


def _winograd_tile(c_in, c_out, kernel_hw, geometry, batch, output_hw):
    """The output tile of the Winograd variant a conv goes to: 4 (F(4x4, 3x3)), 2
    (F(2x2, 3x3)) or 0 for none (see WINOGRAD_MIN_CHANNELS, WINOGRAD_4X4_MIN_WIDTH)."""
    ho, wo = output_hw
    if (kernel_hw != (3, 3) or geometry.stride != (1, 1) or geometry.dilation != (1, 1)
            or ho % 2 or wo % 2 or not ho or not wo):
        return 0
    min_channels_4x4 = (WINOGRAD_4X4_NARROW_MIN_CHANNELS if wo < WINOGRAD_4X4_NARROW_BELOW_WIDTH
                        else WINOGRAD_4X4_MIN_CHANNELS)
    if (ho % 4 == 0 and wo % 4 == 0 and wo >= WINOGRAD_4X4_MIN_WIDTH
            and batch * (ho // 4) * (wo // 4) >= WINOGRAD_4X4_MIN_TILES
            and min(c_in, c_out) >= min_channels_4x4):
        return 4
    tiles = batch * (ho // 2) * (wo // 2)
    if (min(c_in, c_out) >= WINOGRAD_MIN_CHANNELS
            and c_in * c_out * tiles >= WINOGRAD_MIN_WORK):
        return 2
    return 0


def _forward_route(c_in, c_out, kernel_hw, geometry, batch, output_hw):
    """(direct, tile) for a conv's forward: whether the direct 3x3 kernel takes it,
    else the output tile of the Winograd variant that does (0 for none)."""
    tile = _winograd_tile(c_in, c_out, kernel_hw, geometry, batch, output_hw)
    rules = DIRECT_OVER_WINOGRAD_RULES if tile else DIRECT_RULES
    direct = (_direct_3x3(c_in, c_out, kernel_hw, geometry, output_hw[1], rules)
              and c_out % direct3x3.DIRECT_OUTPUT_BLOCK == 0)
    return (True, 0) if direct else (False, tile)


# G of F(2x2, 3x3) and of F(4x4, 3x3) (Lavin & Gray 2016), by output tile and dtype.
# F(2x2)'s entries are 0, +-1/2 or 1, so its float32 matrix is exact; F(4x4)'s 1/6,
# 1/12 and 1/24 are rounded, which the filter transform's error absorbs.
_WINOGRAD_G = {
    tile: {np.dtype(t): np.array(g, dtype=t) for t in (np.float32, np.float64)}
    for tile, g in (
        (2, [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
        (4, [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
    )
}


def _im2col(x, n0, count, row0, rows, kernel_hw, geometry, wo, cols):
    """Columns of output rows [row0, row0 + rows) of ``count`` images (see im2col_rows)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, geometry.stride, geometry.dilation
    top, _, left, _ = geometry.padding
    if _is_2x2_stride2(kernel_hw, geometry):
        _run(im2col.im2col_2x2_stride2, cols.size, x, n0, count, row0, rows, wo, cols)
    else:
        _run(im2col.im2col_rows, cols.size, x, n0, count, row0, rows, kh, kw, sh, sw, top,
             left, dh, dw, wo, cols)


def _flat(a):
    """A 1-D view of a contiguous array; updates through it land in ``a`` itself."""
    if not a.flags.c_contiguous:
        raise ValueError("optimizer update: Expect: C-contiguous parameters and state. "
                         f"Actual: an array of shape {a.shape} with strides {a.strides}.")
    return a.reshape(-1)


class NumbaBackend(Backend):
    name = "numba"
    xp = np

    def __init__(self):
        # Scratch arrays per (dtype, use), grown on demand and reused across calls and
        # steps, so the temporaries that scale with the maps (columns, padded copies,
        # GEMM products, Winograd tiles) are allocated once; those that scale with a
        # layer's weights (Winograd's transformed filters and dU sums, alpha^2 * C_out *
        # C_in values) are fresh arrays each call, which malloc reuses under
        # tinyunet.memory.keep_freed_memory. A fresh
        # multi-MB array costs its page faults on every call (measured: a 2x2 transposed
        # conv to a 128x128 map took 4.3 ms with fresh columns, 2.7 ms reusing them).
        self._scratch: dict[tuple[np.dtype, str], np.ndarray] = {}
        # The optimizer updates' typed Lists, by role, and their piece tables (_spans).
        self._lists: dict[str, tuple] = {}
        self._piece_tables: dict[tuple, np.ndarray] = {}

    def asarray(self, host_array):
        return np.asarray(host_array)

    def to_numpy(self, array):
        return np.asarray(array)

    def _buffer(self, dtype, size, use="columns"):
        """A reusable scratch array of ``size`` elements, valid until the next call for
        the same ``use``: "columns" (im2col columns, padded inputs), "product" (a GEMM's
        result before it is rearranged into the output, or Winograd's other GEMM
        operand) or "gradient" (a padded dy, or Winograd-transformed input tiles)."""
        key = (np.dtype(dtype), use)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=key[0])
            self._scratch[key] = buffer
        return buffer[:size]

    # ---- convolution --------------------------------------------------------------
    def conv2d(self, x, w, geometry: ConvGeometry):
        return self._conv2d(x, w, geometry, None)

    def conv2d_bias_relu(self, x, w, b, geometry: ConvGeometry):
        bias = np.zeros(w.shape[0], dtype=x.dtype) if b is None else _contiguous(b)
        return self._conv2d(x, w, geometry, bias)

    def _conv2d(self, x, w, geometry, relu_bias):
        """conv2d, then relu(y + relu_bias[o]) in the same call unless ``relu_bias`` is None."""
        x, w = _contiguous(x), _contiguous(w)
        n, c, h, width = x.shape
        o, _, kh, kw = w.shape
        ho, wo = geometry.output_hw((h, width), (kh, kw))
        w2 = w.reshape(o, c * kh * kw)
        y = np.empty((n, o, ho, wo), dtype=x.dtype)
        direct, tile = _forward_route(c, o, (kh, kw), geometry, n, (ho, wo))
        if tile:
            filters = self._winograd_filters(w, tile)
            self._conv2d_winograd(x, filters, tile, geometry.padding, relu_bias, y)
            return y
        if direct:
            direct3x3.conv3x3_forward(self._padded(x, geometry.padding), w, y)
        elif (kh, kw) == (1, 1) and geometry.stride == (1, 1) and not any(geometry.padding):
            # One input channel makes each image's GEMM an outer product, which BLAS ran
            # 10x slower than numpy's broadcast multiply (the input gradient of B's
            # one-class head: 4.7 vs 0.47 ms).
            if c == 1:
                np.multiply(w2, x.reshape(n, c, h * width), out=y.reshape(n, o, ho * wo))
            else:
                blas.gemm(w2, x.reshape(n, c, h * width), y.reshape(n, o, ho * wo))
        elif geometry.stride[0] == 1 and kh > 1 and ho * wo >= ROW_SHIFT_MIN_PIXELS and o <= c:
            self._conv2d_row_shifts(x, w, geometry, y)
        else:
            self._conv2d_gemms(x, w2, geometry, (kh, kw), y)
        if relu_bias is not None:
            _run(elementwise.bias_relu, y.size, y.reshape(n, o, ho * wo), relu_bias)
        return y

    def _winograd_filters(self, w, tile, adjoint=False):
        """The filters' Winograd transforms G g G^T as (alpha^2, O, C), alpha = tile + 2
        (winograd.winograd_filters).

        With ``adjoint``: those of the input gradient's conv, whose filter (c, o) is
        w[o, c] rotated by 180 degrees, as a (alpha^2, C, O) view. A fresh array, not
        scratch: kept as scratch, the largest layer's transform stayed resident (A's step
        peak 93 vs 82 MiB, measured with F(2x2) alone), and malloc reuses the freed block.
        """
        o, c = w.shape[:2]
        filters = np.empty(((tile + 2) ** 2, o, c), dtype=w.dtype)
        _run(winograd.winograd_filters, filters.size, w.reshape(o, c, 9),
             _WINOGRAD_G[tile][w.dtype], adjoint, filters)
        return filters.transpose(0, 2, 1) if adjoint else filters

    def _winograd_bands(self, x, tile, padding, output_hw, c_out):
        """Yield (first_row, v, m) per band of tile rows of a Winograd conv of x.

        v (alpha^2, C + WINOGRAD_SPARE_ROWS, span) holds the band's transformed input
        tiles in its first C channel rows; m is a scratch (alpha^2, c_out +
        WINOGRAD_SPARE_ROWS, span) array for the band's other GEMM operand or product,
        likewise. The spare rows are never read. Both live in reused buffers, so each
        band must be consumed before the next. Bands keep v and m within WINOGRAD_BUDGET
        (WINOGRAD_FEW_CHANNELS_BUDGET on layers of few channels), spare rows aside.
        F(4x4)'s input transform pads x as it reads it; F(2x2)'s reads a padded copy (in
        "columns"; v is in "gradient", m in "product").
        """
        n, c = x.shape[:2]
        th, tw = output_hw[0] // tile, output_hw[1] // tile
        values = (tile + 2) ** 2
        if tile == 4:
            top, left = padding[0], padding[2]

            def transform(first, v):
                _run(winograd.winograd4_input_tiles, v.size, x, top, left, th, tw, first, v)
        else:
            padded = self._padded(x, padding)

            def transform(first, v):
                _run(winograd.winograd2_input_tiles, v.size, padded, first, v)
        budget = (WINOGRAD_BUDGET if min(c, c_out) >= WINOGRAD_FEW_CHANNELS
                  else WINOGRAD_FEW_CHANNELS_BUDGET)
        per_row = values * max(c, c_out) * tw * x.itemsize
        rows = max(1, min(n * th, budget // per_row))
        c_rows, o_rows = c + WINOGRAD_SPARE_ROWS, c_out + WINOGRAD_SPARE_ROWS
        tiles = self._buffer(x.dtype, values * c_rows * rows * tw, "gradient")
        product = self._buffer(x.dtype, values * o_rows * rows * tw, "product")
        for first in range(0, n * th, rows):
            span = min(rows, n * th - first) * tw
            v = tiles[: values * c_rows * span].reshape(values, c_rows, span)
            transform(first, v)
            yield first, v, product[: values * o_rows * span].reshape(values, o_rows, span)

    def _conv2d_winograd(self, x, filters, tile, padding, relu_bias, y):
        """y = a 3x3 stride-1 conv of x as Winograd F(tile x tile, 3x3), band by band of
        tile rows: input transform, alpha^2 GEMMs with the transformed filters
        (alpha^2, O, C), output transform with relu(y + relu_bias[o]) unless relu_bias
        is None (see kernels/cpu/winograd.py)."""
        c, o = x.shape[1], y.shape[1]
        output_tiles = getattr(winograd, f"winograd{tile}_output_tiles")
        relu = relu_bias is not None
        bias = relu_bias if relu else np.zeros(o, dtype=x.dtype)
        for first, v, m in self._winograd_bands(x, tile, padding, y.shape[2:], o):
            blas.gemm(filters, v[:, :c], m[:, :o])
            _run(output_tiles, m.size, m, first, bias, relu, y)

    def _grad_weight_winograd(self, dy, x, tile, padding):
        """dW of a 3x3 stride-1 conv through Winograd F(tile x tile, 3x3): the adjoint of
        the forward's steps. Per band, dU (alpha^2, O, C) += (A dY A^T) @ (B^T d B)^T,
        alpha^2 GEMMs; then dW = G^T dU G (winograd.winograd_filter_gradient)."""
        o, c = dy.shape[1], x.shape[1]
        if not len(dy):
            return np.zeros((o, c, 3, 3), dtype=dy.dtype)  # no bands: nothing to sum
        gradient_tiles = getattr(winograd, f"winograd{tile}_gradient_tiles")
        total_du = np.empty(((tile + 2) ** 2, o, c), dtype=dy.dtype)
        for first, v, dm in self._winograd_bands(x, tile, padding, dy.shape[2:], o):
            _run(gradient_tiles, dm.size, dy, first, dm)
            if _gram_wins(o, c, dm.shape[2]):
                _run(gemm.stacked_gram, dm.size + v.size, dm, v, first > 0, total_du)
            else:
                blas.gemm(dm[:, :o], v[:, :c].transpose(0, 2, 1), total_du,
                          accumulate=first > 0)
        dw = np.empty((o, c, 3, 3), dtype=dy.dtype)
        _run(winograd.winograd_filter_gradient, total_du.size, total_du,
             _WINOGRAD_G[tile][dy.dtype], dw.reshape(o, c, 9))
        return dw

    def _conv2d_gemms(self, x, w2, geometry, kernel_hw, y):
        """y = conv2d as im2col bands + one GEMM per band (see the module docstring)."""
        n, o, ho, wo = y.shape
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo)):
            if images > 1:
                # (O, images*pixels) -> (images, O, pixels): one wide GEMM, one small copy.
                wide = self._buffer(x.dtype, o * cols.shape[1], "product").reshape(o, -1)
                blas.gemm(w2, cols, wide)
                y[n0 : n0 + images] = wide.reshape(o, images, ho, wo).transpose(1, 0, 2, 3)
            else:
                band = y[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
                blas.gemm(w2, cols, band)

    def conv2d_grad_input(self, dy, w, geometry: ConvGeometry, input_hw):
        dy, w = _contiguous(dy), _contiguous(w)
        n, o, ho, wo = dy.shape
        _, c, kh, kw = w.shape
        (dh, dw), (top, bottom, left, right) = geometry.dilation, geometry.padding
        reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
        adjoint_pads = (reach_h - top, reach_h - bottom, reach_w - left, reach_w - right)
        if geometry.stride == (1, 1) and min(adjoint_pads) >= 0:
            adjoint = ConvGeometry((1, 1), adjoint_pads, geometry.dilation)
            # Routed as conv2d would route the adjoint conv, but a Winograd one gets its
            # filter transforms from w directly, with no flipped copy.
            _, tile = _forward_route(o, c, (kh, kw), adjoint, n, input_hw)
            if tile:
                dx = np.empty((n, c, *input_hw), dtype=dy.dtype)
                self._conv2d_winograd(dy, self._winograd_filters(w, tile, adjoint=True), tile,
                                      adjoint_pads, None, dx)
                return dx
            # The adjoint of a stride-1 conv is a conv with the flipped, transposed
            # weight and the complementary padding; its output is exactly input_hw.
            return self.conv2d(dy, _flipped(w), adjoint)
        (sh, sw) = geometry.stride
        dx = np.empty((n, c, *input_hw), dtype=dy.dtype)
        # One batched GEMM into the scratch buffer, then one gather; for the U-Net's 2x2
        # stride-2 transposed conv the gather is a pixel shuffle (depth_to_space_2x2).
        cols = self._transposed_columns(dy, w)
        if _is_2x2_stride2((kh, kw), geometry) and tuple(input_hw) == (2 * ho, 2 * wo):
            _run(im2col.depth_to_space_2x2, dx.size, cols, np.zeros(c, dy.dtype), dx, 0)
        else:
            _run(im2col.col2im_gather, dx.size, cols, kh, kw, sh, sw, top, left, dh, dw, ho,
                 wo, dx)
        return dx

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

    def conv_transpose2d_concat(self, skip, x, w, b, geometry, output_hw):
        x, w = _contiguous(x), _contiguous(w)
        n, h, width = x.shape[0], x.shape[2], x.shape[3]
        if not (_is_2x2_stride2(w.shape[2:], geometry) and tuple(output_hw) == (2 * h, 2 * width)):
            return super().conv_transpose2d_concat(skip, x, w, b, geometry, output_hw)
        c_skip, c_up = skip.shape[1], w.shape[1]
        joined = np.empty((n, c_skip + c_up, *output_hw), dtype=x.dtype)
        joined[:, :c_skip] = skip
        bias = np.zeros(c_up, x.dtype) if b is None else _contiguous(b)
        _run(im2col.depth_to_space_2x2, n * c_up * 4 * h * width,
             self._transposed_columns(x, w), bias, joined, c_skip)
        return joined

    def conv_transpose2d_grads(self, dy, x, w, geometry: ConvGeometry, need_input=True,
                               need_weight=True, need_bias=True):
        n, c_up = dy.shape[:2]
        c_in, h, width = x.shape[1:]
        depth, pixels = 4 * c_up, n * h * width
        # The U-Net's up-conv: dy's columns (space to depth, read straight from the
        # concat's gradient) once for all three gradients, which the interface's way
        # makes twice after a contiguous copy of dy.
        if not (_is_2x2_stride2(w.shape[2:], geometry) and dy.shape[2:] == (2 * h, 2 * width)
                and need_input and need_weight
                and depth * pixels * dy.itemsize <= COLUMN_BUDGET):
            return super().conv_transpose2d_grads(dy, x, w, geometry, need_input, need_weight,
                                                  need_bias)
        x, w = _contiguous(x), _contiguous(w)
        cols = self._buffer(dy.dtype, depth * pixels).reshape(depth, pixels)
        _run(im2col.im2col_2x2_stride2, cols.size, dy, 0, n, 0, h, width, cols)
        # dx = conv2d(dy, w): w (C_in, C_up, 2, 2) is that conv's (O, C, kH, kW).
        wide = self._buffer(dy.dtype, c_in * pixels, "product").reshape(c_in, pixels)
        blas.gemm(w.reshape(c_in, depth), cols, wide)
        dx = np.empty(x.shape, dtype=dy.dtype)  # not a view of the buffer, reused below
        dx[...] = wide.reshape(c_in, n, h, width).transpose(1, 0, 2, 3)
        # dW = x's pixels (the conv's output gradient) by channel, against the columns.
        wide.reshape(c_in, n, h * width)[...] = x.reshape(n, c_in, h * width).transpose(1, 0, 2)
        dw = np.zeros((c_in, depth), dtype=dy.dtype)
        _add_gram(wide, cols, dw)
        db = None
        if need_bias:
            # Rows 4c .. 4c+3 of the columns are channel c's pixels.
            db = np.empty(c_up, dtype=dy.dtype)
            _run(elementwise.channel_sums, cols.size, cols.reshape(1, c_up, 4 * pixels), db)
        return dx, dw.reshape(w.shape), db

    def conv2d_grads(self, dy, x, w, geometry: ConvGeometry, need_input=True, need_weight=True):
        n, o, ho, wo = dy.shape
        c = x.shape[1]
        # A 3x3 'same' conv's input gradient is a 3x3 'same' conv of dy: where it and the
        # weight gradient both take the direct kernels, they read one padded dy (config
        # C's step makes three fewer padded copies of 1.1 MiB: its level-0 layers' two
        # gradients took 0.04-0.12 ms less, alone).
        if (need_input and need_weight and geometry.padding == (1, 1, 1, 1)
                and _forward_route(o, c, w.shape[2:], geometry, n, x.shape[2:]) == (True, 0)
                and _grad_weight_route(c, o, w.shape[2:], geometry, n, (ho, wo)) == (True, 0)):
            dy, x, w = _contiguous(dy), _contiguous(x), _contiguous(w)
            padded_dy = self._padded(dy, (1, 1, 1, 1), "gradient")
            dx = np.empty(x.shape, dtype=dy.dtype)
            direct3x3.conv3x3_forward(padded_dy, _flipped(w), dx)
            dw = np.zeros(w.shape, dtype=dy.dtype)
            direct3x3.conv3x3_grad_weight(padded_dy, self._padded(x, geometry.padding), dw)
            return dx, dw
        return super().conv2d_grads(dy, x, w, geometry, need_input, need_weight)

    def conv2d_grad_weight(self, dy, x, geometry: ConvGeometry, kernel_hw):
        dy, x = _contiguous(dy), _contiguous(x)
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        # Unlike the forward, the weight gradient tries Winograd before the direct
        # kernel, which GRAD_WEIGHT_DIRECT_RULES also admits on these layers: alone,
        # F(4x4)'s beat it 1.44-1.56x on 64-wide maps of 32-64 channels, F(2x2)'s 1.37x
        # on B's 128-wide 64 -> 64 layer.
        direct, tile = _grad_weight_route(c, o, kernel_hw, geometry, n, (ho, wo))
        if tile:
            return self._grad_weight_winograd(dy, x, tile, geometry.padding)
        dw = np.zeros((o, c * kh * kw), dtype=dy.dtype)
        if (kh, kw) == (1, 1) and geometry.stride == (1, 1) and not any(geometry.padding):
            for image in range(n):
                _add_gram(dy[image].reshape(o, -1), x[image].reshape(c, -1), dw)
            return dw.reshape(o, c, kh, kw)
        if direct:
            dw = dw.reshape(o, c, kh, kw)
            direct3x3.conv3x3_grad_weight(self._padded(dy, (1, 1, 1, 1), "gradient"),
                                         self._padded(x, geometry.padding), dw)
            return dw
        if geometry.stride[0] == 1 and kh > 1 and ho * wo >= ROW_SHIFT_MIN_PIXELS:
            return self._grad_weight_row_shifts(dy, x, geometry, kernel_hw)
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo)):
            if images > 1:
                grads = self._buffer(dy.dtype, o * images * ho * wo, "product")
                grads = grads.reshape(o, images, ho * wo)
                grads[...] = dy[n0 : n0 + images].reshape(images, o, ho * wo).transpose(1, 0, 2)
                _add_gram(grads.reshape(o, images * ho * wo), cols, dw)
            else:
                _add_gram(dy[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo], cols, dw)
        return dw.reshape(o, c, kh, kw)

    def _grad_weight_row_shifts(self, dy, x, geometry, kernel_hw):
        """dW of a conv with row stride 1 from columns of the kernel's width only.

        Kernel row i sees the columns of ``_row_shift_bands`` shifted by i*dh rows, a
        plain column window, so dW[:, :, i, :] is one GEMM per i. That writes kH times
        fewer columns than im2col (measured 10-25% faster on the U-Net's 3x3 layers).
        """
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        dh = geometry.dilation[0]
        grad = np.zeros((kh, o, c * kw), dtype=dy.dtype)
        for cols, _, image, r0, rows in self._row_shift_bands(x, kernel_hw, geometry, (ho, wo),
                                                              batch_images=False):
            band = dy[image].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo]
            for i in range(kh):
                window = cols[:, i * dh * wo : i * dh * wo + rows * wo]
                blas.gemm(band, window.T, grad[i], accumulate=True)
        return np.ascontiguousarray(grad.reshape(kh, o, c, kw).transpose(1, 2, 0, 3))

    def _conv2d_row_shifts(self, x, w, geometry, y):
        """conv2d with row stride 1 from columns of the kernel's width only.

        One GEMM of the weight's kernel rows, stacked (kH*O, C*kW), with the columns of
        ``_row_shift_bands`` gives each kernel row's share of every output row; output
        row r sums kernel row i's share from column row r + i*dh (``row_shift_sum``). The
        columns are kH times fewer than im2col's and the GEMM kH times taller. Measured
        against im2col, alternating in one process, on the U-Nets' layers: 1.12-1.28x
        faster with O <= C on 32x32 and 64x64 maps (0.93-1.0x in two cases); 0.8x for
        64->128 on 32x32, whose kH*O-row product is too big to sum cheaply (so O > C keeps
        im2col); 0.91x on 16x16 maps, whose kH - 1 extra rows a band are 12% more
        arithmetic (so maps under ROW_SHIFT_MIN_PIXELS keep im2col).
        """
        o, c, kh, kw = w.shape
        ho, wo = y.shape[2:]
        dh = geometry.dilation[0]
        stacked = _contiguous(w.transpose(2, 0, 1, 3)).reshape(kh * o, c * kw)
        for cols, count, n0, r0, rows in self._row_shift_bands(x, (kh, kw), geometry, (ho, wo),
                                                               batch_images=True):
            shares = self._buffer(x.dtype, kh * o * cols.shape[1], "product")
            shares = shares.reshape(kh * o, cols.shape[1])
            blas.gemm(stacked, cols, shares)
            _run(im2col.row_shift_sum, count * o * rows * wo, shares, count,
                 rows + dh * (kh - 1), dh, y, n0, r0)

    def _row_shift_bands(self, x, kernel_hw, geometry, output_hw, batch_images):
        """Yield (cols, count, n0, r0, rows): columns of the kernel's width only.

        cols[(c, j), (k, r, ow)] = x_padded[n0 + k, c, r0 + r, ow*sw + j*dw] for the
        rows + dh*(kH - 1) input rows that output rows r0 .. r0 + rows - 1 of images
        n0 .. n0 + count - 1 read (row stride 1). Bands of rows keep the columns within
        COLUMN_BUDGET; with ``batch_images`` small maps put whole images side by side.
        The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        (_, sw), (dh, dw) = geometry.stride, geometry.dilation
        top, _, left, _ = geometry.padding
        depth, extra = c * kw, dh * (kh - 1)
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, COLUMN_BUDGET // row_bytes - extra))
        images = 1
        if batch_images and rows == ho:
            images = max(1, min(n, COLUMN_BUDGET // (row_bytes * (ho + extra))))
        buffer = self._buffer(x.dtype, depth * images * (rows + extra) * wo)
        for n0 in range(0, n, images):
            count = min(images, n - n0)
            for r0 in range(0, ho, rows):
                band_rows = min(rows, ho - r0)
                span = count * (band_rows + extra) * wo
                cols = buffer[: depth * span].reshape(depth, span)
                _run(im2col.im2col_rows, cols.size, x, n0, count, r0, band_rows + extra, 1,
                     kw, 1, sw, top, left, 1, dw, wo, cols)
                yield cols, count, n0, r0, band_rows

    def _padded(self, x, padding, use="columns"):
        """x (N, C, H, W) in a zero border of ``padding`` (top, bottom, left, right).

        The copy lives in the scratch buffer ``use``, valid until its next call."""
        n, c, h, w = x.shape
        top, bottom, left, right = padding
        shape = (n, c, h + top + bottom, w + left + right)
        padded = self._buffer(x.dtype, math.prod(shape), use).reshape(shape)
        _run(im2col.pad_images, padded.size, x, top, left, padded)
        return padded

    def _column_bands(self, x, kernel_hw, geometry, output_hw):
        """Yield (cols, images, n0, r0, rows): im2col of bands of output rows.

        cols is (C*kH*kW, images*rows*Wo). A band is either ``images`` > 1 whole
        images side by side (small maps) or ``rows`` output rows of image n0 from row
        r0. The buffer is reused, so each band must be consumed before the next.
        """
        n, c = x.shape[:2]
        (kh, kw), (ho, wo) = kernel_hw, output_hw
        depth = c * kh * kw
        row_bytes = depth * wo * x.itemsize
        rows = max(1, min(ho, COLUMN_BUDGET // row_bytes))
        images = max(1, min(n, COLUMN_BUDGET // (row_bytes * ho))) if rows == ho else 1
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

    # ---- pooling ------------------------------------------------------------------
    def max_pool2d(self, x, geometry: PoolGeometry):
        x = _contiguous(x)
        n, c, h, w = x.shape
        ho, wo = geometry.output_hw((h, w))
        y = np.empty((n, c, ho, wo), dtype=x.dtype)
        argmax = np.empty((n, c, ho, wo), dtype=np.int64)
        (kh, kw), (sh, sw) = geometry.kernel, geometry.stride
        (ph, pw), (dh, dw) = geometry.padding, geometry.dilation
        if (kh, kw, sh, sw, ph, pw, dh, dw) == (2, 2, 2, 2, 0, 0, 1, 1):
            _run(pool.max_pool2x2_forward, x.size, x, y, argmax)
        else:
            _run(pool.max_pool2d_forward, x.size, x, kh, kw, sh, sw, ph, pw, dh, dw, y,
                 argmax)
        return y, argmax

    def max_pool2d_backward(self, dy, argmax, input_shape, geometry=None):
        dx = np.empty(input_shape, dtype=dy.dtype)
        _run(pool.max_pool2d_backward, dx.size, _contiguous(dy), _contiguous(argmax), dx)
        return dx

    # ---- elementwise ----------------------------------------------------------------
    def relu(self, x):
        x = _contiguous(x)
        y = np.empty(x.shape, dtype=x.dtype)
        _run(elementwise.relu_forward, x.size, x.reshape(-1), y.reshape(-1))
        return y

    def relu_backward(self, dy, y):
        dy, y = _contiguous(dy), _contiguous(y)
        dx = np.empty(dy.shape, dtype=dy.dtype)
        _run(elementwise.relu_backward, dy.size, dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
        return dx

    def sigmoid(self, x):
        x = _contiguous(x)
        y = np.empty(x.shape, dtype=x.dtype)
        _run(elementwise.sigmoid, x.size, x.reshape(-1), y.reshape(-1))
        return y

    def sigmoid_overlap_sums(self, z, t):
        z, t = _contiguous(z), _contiguous(t).astype(z.dtype, copy=False)
        n = z.shape[0]
        p = np.empty(z.shape, dtype=z.dtype)
        sums = np.empty((n, 3), dtype=np.float64)
        _run(elementwise.sigmoid_overlap_sums, z.size, z.reshape(n, -1), t.reshape(n, -1),
             p.reshape(n, -1), sums)
        kept = (n,) + (1,) * (z.ndim - 1)
        return (p, *(sums[:, k].astype(z.dtype).reshape(kept) for k in range(3)))

    def sigmoid_overlap_backward(self, p, t, slope, offset):
        p, t = _contiguous(p), _contiguous(t)
        n = p.shape[0]
        dz = np.empty(p.shape, dtype=p.dtype)
        coefficients = [np.ascontiguousarray(np.broadcast_to(c, (n,) + (1,) * (p.ndim - 1)),
                                             dtype=p.dtype).reshape(n) for c in (slope, offset)]
        _run(elementwise.sigmoid_overlap_backward, p.size, p.reshape(n, -1), t.reshape(n, -1),
             *coefficients, OVERLAP_BACKWARD_PIECE, dz.reshape(n, -1))
        return dz

    def add_bias(self, y, bias):
        y = _contiguous(y)
        n, c = y.shape[:2]
        _run(elementwise.bias_add, y.size, y.reshape(n, c, -1), _contiguous(bias))
        return y

    def relu_backward_bias_grad(self, dy, y):
        dy, y = _contiguous(dy), _contiguous(y)
        n, c = dy.shape[:2]
        dz = np.empty(dy.shape, dtype=dy.dtype)
        db = np.empty(c, dtype=dy.dtype)
        _run(elementwise.relu_backward_channel_sums, dy.size, dy.reshape(n, c, -1),
             y.reshape(n, c, -1), dz.reshape(n, c, -1), db)
        return dz, db

    def bias_grad(self, dy):
        dy = _contiguous(dy)
        n, c = dy.shape[:2]
        out = np.empty(c, dtype=dy.dtype)
        return _run(elementwise.channel_sums, dy.size, dy.reshape(n, c, -1), out)

    # ---- optimizer updates ------------------------------------------------------------
    # One fused pass over every parameter (all of a step's arithmetic per element, in
    # place), instead of the reference's several whole-array numpy operations each.
    def sgd_update(self, params, grads, buffers, lr, momentum, dampening, nesterov,
                   weight_decay, first_step):
        for chosen in _by_dtype(params):
            gradients = _gradient_tuple(params, grads, chosen)
            # Without momentum the kernel never touches the buffers.
            buffer_list = (self._cached_typed_list("buffers", buffers, chosen) if momentum
                           else gradients)
            sizes = [params[i].size for i in chosen]
            _run(optim.sgd_update, sum(sizes), self._cached_typed_list("params", params, chosen),
                 gradients, buffer_list, self._spans(sizes), float(lr), float(momentum),
                 float(1 - dampening), bool(nesterov), float(weight_decay), bool(first_step))

    def adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                    weight_decay, decoupled):
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        for chosen in _by_dtype(params):
            lists = (self._cached_typed_list("params", params, chosen),
                     _gradient_tuple(params, grads, chosen),
                     self._cached_typed_list("exp_avgs", exp_avgs, chosen),
                     self._cached_typed_list("exp_avg_sqs", exp_avg_sqs, chosen))
            sizes = [params[i].size for i in chosen]
            _run(optim.adam_update, sum(sizes), *lists, self._spans(sizes),
                 float(lr / bias1), float(beta1), float(1 - beta1), float(beta2),
                 float(1 - beta2), float(bias2), float(eps), float(weight_decay),
                 float(1 - lr * weight_decay), bool(decoupled))

    def _cached_typed_list(self, role, arrays, chosen):
        """``_typed_list`` of arrays[i] for i in chosen, kept while the same arrays come
        back: parameters and optimizer state persist across steps, and building a list
        of config A's 46 arrays took about 75 us (measured). One list per role: the entry
        holds its arrays (so their ids stay theirs) until a call with other arrays of
        that role replaces it, so the backend keeps the last-updated model's parameters
        and state alive until then."""
        picked = [arrays[i] for i in chosen]
        key = tuple(map(id, picked))
        cached = self._lists.get(role)
        if cached is None or cached[0] != key:
            cached = (key, _typed_list(picked), picked)
            self._lists[role] = cached
        return cached[1]

    def _spans(self, sizes):
        """(pieces, 3) int64 rows (list index, start, stop) that cut arrays of ``sizes``
        into pieces of at most UPDATE_PIECE elements."""
        key = (tuple(sizes), UPDATE_PIECE)
        spans = self._piece_tables.get(key)
        if spans is None:
            rows = [(i, start, min(start + UPDATE_PIECE, size))
                    for i, size in enumerate(sizes) for start in range(0, size, UPDATE_PIECE)]
            spans = np.array(rows, dtype=np.int64).reshape(-1, 3)
            self._piece_tables[key] = spans
        return spans


def _by_dtype(arrays):
    """Index lists of ``arrays`` grouped by dtype: a typed List holds one array type."""
    groups: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.dtype, []).append(i)
    return list(groups.values())


def _gradient_tuple(params, grads, chosen):
    """Flat views of grads[i] for i in chosen, contiguous and in params[i]'s dtype, as a
    tuple for the update kernels, padded with empty arrays (which no span names) to a
    multiple of GRADIENT_TUPLE_STEP entries.

    Not a typed List, as parameters and state are: gradients are new arrays every step,
    and building a typed List of config C's 36 took 68 us (alone; numba unboxes a tuple
    of them in 3 us): C's step 1.7% and 2.3% faster (medians of 250 alternated pairs).
    numba compiles a kernel for each tuple length, hence the padding."""
    flat = [_flat(_writeable(_contiguous(grads[i]).astype(params[i].dtype, copy=False)))
            for i in chosen]
    padding = -len(flat) % GRADIENT_TUPLE_STEP
    return tuple(flat) + (np.empty(0, dtype=params[chosen[0]].dtype),) * padding


def _writeable(a):
    """a, or a copy of it if it is read-only: numba gives read-only arrays a type of their
    own, and a tuple's entries must share one type to be indexed in a loop."""
    return a if a.flags.writeable else a.copy()


def _typed_list(arrays):
    """A numba typed List of flat views of C-contiguous arrays, for the update kernels."""
    return typed.List([_flat(a) for a in arrays])
