"""Which path each conv of the numba backend takes: the thresholds and the route rules."""

from __future__ import annotations

from ...kernels.cpu import direct3x3, gemm

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
# The row-shift paths (forward and weight gradient) need maps of this many output pixels:
# on 16x16 and smaller, the weight gradient's GEMMs over one image each ran up to 5x
# slower than one GEMM over the batch's columns, and the forward's kH - 1 extra rows
# per image are 12% more arithmetic (measured on the U-Net's deep levels).
ROW_SHIFT_MIN_PIXELS = 32 * 32


def _gram_wins(rows_a, rows_b, length):
    """Whether a @ b^T, for a of ``rows_a`` rows and b of ``rows_b``, both ``length``
    long, goes to gemm.stacked_gram rather than BLAS (see GRAM_MAX_ROWS)."""
    return (min(rows_a, rows_b) <= GRAM_MAX_ROWS
            and max(rows_a, rows_b) <= GRAM_MAX_OTHER_ROWS and length >= GRAM_MIN_LENGTH
            and rows_a % gemm.GRAM_BLOCK == 0 and rows_b % gemm.GRAM_BLOCK == 0)


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
