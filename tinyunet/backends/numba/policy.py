"""Which algorithm runs each pass of each conv layer on the numba backend.

Every algorithm choice and tuning threshold of the backend's convolutions is here;
docs/backend-numba.md explains the algorithms. The one decision is

    plan = plan_conv(pass_, batch, c_in, c_out, input_hw, kernel_hw, geometry)

for the conv of an input (batch, c_in, *input_hw) with a weight (c_out, c_in,
*kernel_hw); ``pass_`` is "forward", "grad_input" or "grad_weight". The backend plans
each pass once and runs ``plan.algo``:

    direct         3x3 stride-1 kernels that do the arithmetic themselves (few channels)
    winograd4      Winograd F(4x4, 3x3): 36 GEMMs over 6x6 input tiles
    winograd2      Winograd F(2x2, 3x3): 16 GEMMs over 4x4 input tiles
    pointwise      1x1 stride-1 unpadded conv: the input already is the column matrix
    row_shift      columns of the kernel's width only; each kernel row a shifted window
    im2col         columns of every tap, in bands of output rows: runs every conv
    col2im         input gradient only: columns w^T dy, then a gather onto the input
    pixel_shuffle  input gradient only, 2x2 stride-2 windows tiling the map

The input gradient of a stride-1 conv is a stride-1 conv of dy with the flipped weight
(``adjoint_geometry``), planned as that conv's forward; other input gradients take
col2im or pixel_shuffle.

Override: ``with force_conv_algo("im2col"):``, or the environment variable
TINYUNET_CONV_ALGO=im2col (read at plan time; the context manager wins), makes every
conv pass take that algorithm wherever it can run the layer. Where it cannot
(winograd4 on a 5x5 kernel, pixel_shuffle on a forward), the pass takes its general
path: im2col; for an input gradient, the adjoint conv by im2col, or col2im where the
conv has no stride-1 adjoint. ``force_conv_algo(..., band_bytes=n)`` also sets the
scratch bytes per band of the banded algorithms (im2col, row_shift, Winograd).

Plans are cached by layer and override, so a threshold changed in a running process
takes effect after ``_plan.cache_clear()``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, get_args

from ...kernels.cpu.direct3x3 import DIRECT_OUTPUT_BLOCK, GRAD_WEIGHT_OUTPUT_BLOCK
from ...kernels.cpu.gemm import GRAM_BLOCK
from ..interface import ConvGeometry

Algo = Literal["direct", "winograd4", "winograd2", "pointwise", "row_shift", "im2col",
               "col2im", "pixel_shuffle"]
Pass = Literal["forward", "grad_input", "grad_weight"]
ALGOS: tuple[str, ...] = get_args(Algo)
PASSES: tuple[str, ...] = get_args(Pass)
ENVIRONMENT_VARIABLE = "TINYUNET_CONV_ALGO"

# ---- bands: scratch memory per step of a banded algorithm --------------------------------
# Bytes of im2col (and row-shift) columns per GEMM: big enough for GEMMs of a few
# thousand columns, small enough to stay in the L2/L3 cache and keep peak memory low.
COLUMN_BUDGET = 4 << 20
# Bytes of Winograd-transformed input (and of the GEMMs' product) per band of tile rows.
# They are 2.25x (F(4x4)) or 4x (F(2x2)) the data they stand for; bands bound them, and
# bigger bands mean bigger, faster GEMMs and fewer calls.
WINOGRAD_BUDGET = 16 << 20
# Layers with fewer channels than this on a side get WINOGRAD_FEW_CHANNELS_BUDGET
# instead: their GEMMs are cheap at any band size, so smaller bands only cut the peak.
WINOGRAD_FEW_CHANNELS = 32
WINOGRAD_FEW_CHANNELS_BUDGET = 1 << 20

# ---- direct 3x3 kernels -----------------------------------------------------------------
# (minimum output width, maximum C_in * C_out) pairs, any one of which sends a 3x3
# stride-1 conv's forward (and its input gradient, a conv too) to the direct kernel. The
# kernel vectorises along image rows, so it needs long rows; GEMMs win once channels are
# many, and on maps narrower than 64 at any channel count.
DIRECT_RULES = ((64, 16 * 32),)
# The same rules where Winograd could also take the layer: it wins on most of them.
DIRECT_OVER_WINOGRAD_RULES = ((128, 16 * 16),)
# The weight gradient's direct kernel beats its GEMMs on more channels than the
# forward's (its sums run over whole planes). Winograd, where it applies, is tried first.
GRAD_WEIGHT_DIRECT_RULES = ((128, 64 * 64), (64, 64 * 32))

# ---- Winograd -----------------------------------------------------------------------------
# F(2x2, 3x3) does 2.25x fewer multiplies, in 16 GEMMs (C_out, C_in) @ (C_in, tiles),
# plus transforms costing about a padded copy. It pays once those GEMMs run near BLAS's
# peak: both channel counts at least WINOGRAD_MIN_CHANNELS and C_in * C_out * tiles (one
# GEMM's work) at least WINOGRAD_MIN_WORK.
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_WORK = 1 << 18
# F(4x4, 3x3) does 4x fewer multiplies than im2col (1.78x fewer than F(2x2)) with
# transforms of 6x6 tiles, whose loops run along tile rows: it needs maps at least
# WINOGRAD_4X4_MIN_WIDTH wide and at least WINOGRAD_4X4_MIN_TILES tiles in the batch
# (its GEMMs run over the tiles, and far below BLAS's peak on fewer).
WINOGRAD_4X4_MIN_WIDTH = 16
WINOGRAD_4X4_MIN_TILES = 64
# ... and at least this many channels on each side, or, on maps narrower than
# WINOGRAD_4X4_NARROW_BELOW_WIDTH (where no direct kernel competes and im2col's GEMMs
# would be skinny), at least WINOGRAD_4X4_NARROW_MIN_CHANNELS.
WINOGRAD_4X4_MIN_CHANNELS = 16
WINOGRAD_4X4_NARROW_BELOW_WIDTH = 64
WINOGRAD_4X4_NARROW_MIN_CHANNELS = 8

# ---- row shift ----------------------------------------------------------------------------
# The row-shift paths need maps of this many output pixels: on smaller maps the kH - 1
# extra input rows per band are a large share of the work, and the weight gradient's
# per-image GEMMs are short. The forward also needs C_out <= C_in: its product has
# kH * C_out rows to sum, which costs more than im2col saves when C_out is the larger.
ROW_SHIFT_MIN_PIXELS = 32 * 32

# ---- the weight gradients' skinny GEMMs --------------------------------------------------
# dY @ X^T has few rows (channels) over a long shared length (tiles or pixels); BLAS runs
# such shapes far below its peak. kernels/cpu/gemm.stacked_gram takes one when one side
# has at most GRAM_MAX_ROWS rows, the other at most GRAM_MAX_OTHER_ROWS, both a multiple
# of its block, and the length is at least GRAM_MIN_LENGTH (shorter, its per-block
# reductions cost more than the dot products).
GRAM_MAX_ROWS = 64
GRAM_MAX_OTHER_ROWS = 2304
GRAM_MIN_LENGTH = 512


@dataclass(frozen=True)
class ConvPlan:
    """How one pass of one conv layer runs.

    algo: one of ALGOS (see the module docstring).
    band_bytes: scratch bytes per band of im2col, row_shift and Winograd; 0 for the
        algorithms that work without bands.
    """

    algo: Algo
    band_bytes: int = 0


# (algo, band_bytes or None) while a force_conv_algo block runs.
_forced: ContextVar[tuple[str, int | None] | None] = ContextVar("tinyunet_conv_algo",
                                                                 default=None)


@contextmanager
def force_conv_algo(algo: Algo, band_bytes: int | None = None) -> Iterator[None]:
    """Within the block, every conv pass planned takes ``algo`` where it can run the
    layer (see the module docstring), with bands of ``band_bytes`` when given."""
    _check_algo(algo, "force_conv_algo")
    if band_bytes is not None and not (isinstance(band_bytes, int) and band_bytes > 0):
        raise ValueError("force_conv_algo: Expect: band_bytes a positive int or None. "
                         f"Actual: {band_bytes!r}.")
    token = _forced.set((algo, band_bytes))
    try:
        yield
    finally:
        _forced.reset(token)


def plan_conv(pass_: Pass, batch: int, c_in: int, c_out: int, input_hw: tuple[int, int],
              kernel_hw: tuple[int, int], geometry: ConvGeometry) -> ConvPlan:
    """The plan of one pass of the conv of x (batch, c_in, *input_hw) with a weight
    (c_out, c_in, *kernel_hw) under ``geometry``; an algorithm forced by
    ``force_conv_algo`` or TINYUNET_CONV_ALGO wherever it can run."""
    if pass_ not in PASSES:
        raise ValueError(f"plan_conv: Expect: pass_ one of {', '.join(PASSES)}. "
                         f"Actual: {pass_!r}.")
    return _plan(pass_, batch, c_in, c_out, tuple(input_hw), tuple(kernel_hw), geometry,
                 _forced_choice())


def adjoint_geometry(kernel_hw: tuple[int, int], geometry: ConvGeometry
                     ) -> ConvGeometry | None:
    """The geometry of the conv of dy that is a stride-1 conv's input gradient (its
    weight the conv's, flipped: ``scratch.flipped``), or None where there is none (other
    strides, or padding beyond the kernel's reach)."""
    (kh, kw), (dh, dw) = kernel_hw, geometry.dilation
    top, bottom, left, right = geometry.padding
    reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
    pads = (reach_h - top, reach_h - bottom, reach_w - left, reach_w - right)
    if geometry.stride != (1, 1) or min(pads) < 0:
        return None
    return ConvGeometry((1, 1), pads, geometry.dilation)


def is_2x2_stride2(kernel_hw: tuple[int, int], geometry: ConvGeometry) -> bool:
    """The U-Net's up-conv geometry: 2x2 windows at stride 2 that tile the map exactly."""
    return (tuple(kernel_hw) == (2, 2) and geometry.stride == (2, 2)
            and geometry.dilation == (1, 1) and not any(geometry.padding))


def use_stacked_gram(rows_a: int, rows_b: int, length: int) -> bool:
    """Whether a @ b^T, for a of ``rows_a`` rows and b of ``rows_b``, both ``length``
    long, goes to kernels/cpu/gemm.stacked_gram rather than BLAS (see GRAM_MAX_ROWS)."""
    return (min(rows_a, rows_b) <= GRAM_MAX_ROWS
            and max(rows_a, rows_b) <= GRAM_MAX_OTHER_ROWS and length >= GRAM_MIN_LENGTH
            and rows_a % GRAM_BLOCK == 0 and rows_b % GRAM_BLOCK == 0)


def share_up_conv_columns(batch: int, c_up: int, input_hw: tuple[int, int],
                          output_hw: tuple[int, int], kernel_hw: tuple[int, int],
                          geometry: ConvGeometry, itemsize: int) -> bool:
    """Whether the gradients of a transposed conv of x (batch, ., *input_hw) to (batch,
    c_up, *output_hw) share one space-to-depth of dy: 2x2 stride-2 windows tiling the
    output, and those columns (4 * c_up, batch * H * W) within one band of columns."""
    forced = _forced_choice()
    budget = forced[1] if forced is not None and forced[1] is not None else COLUMN_BUDGET
    h, w = input_hw
    return (is_2x2_stride2(kernel_hw, geometry) and tuple(output_hw) == (2 * h, 2 * w)
            and 4 * c_up * batch * h * w * itemsize <= budget)


def _check_algo(name, source):
    if name not in ALGOS:
        raise ValueError(f"{source}: Expect: one of {', '.join(ALGOS)}. Actual: {name!r}.")


def _forced_choice():
    """(algo, band_bytes or None) forced by force_conv_algo, else by the environment."""
    forced = _forced.get()
    if forced is None:
        name = os.environ.get(ENVIRONMENT_VARIABLE)
        if name:
            _check_algo(name, ENVIRONMENT_VARIABLE)
            forced = (name, None)
    return forced


# Plans by layer and override: a step plans the same few dozen layers every time.
@functools.lru_cache(maxsize=4096)
def _plan(pass_, batch, c_in, c_out, input_hw, kernel_hw, geometry, forced):
    output_hw = geometry.output_hw(input_hw, kernel_hw)
    if pass_ == "grad_input":
        return _plan_grad_input(batch, c_in, c_out, input_hw, output_hw, kernel_hw, geometry,
                                forced)
    layer = (pass_, batch, c_in, c_out, kernel_hw, geometry, output_hw)
    if forced is not None:
        algo = forced[0] if _runs(forced[0], *layer) else "im2col"
    elif pass_ == "forward":
        algo = _forward_algo(*layer[1:])
    else:
        algo = _grad_weight_algo(*layer[1:])
    return ConvPlan(algo, _band_bytes(algo, c_in, c_out, forced))


def _plan_grad_input(batch, c_in, c_out, input_hw, output_hw, kernel_hw, geometry, forced):
    """The adjoint conv's forward plan (it reads dy (batch, c_out, *output_hw) and writes
    (batch, c_in, *input_hw)), else col2im or pixel_shuffle."""
    adjoint = adjoint_geometry(kernel_hw, geometry)
    algo = forced[0] if forced is not None else None
    if adjoint is not None and algo != "col2im":
        return _plan("forward", batch, c_out, c_in, output_hw, kernel_hw, adjoint, forced)
    shuffle = (is_2x2_stride2(kernel_hw, geometry)
               and input_hw == (2 * output_hw[0], 2 * output_hw[1]))
    return ConvPlan("pixel_shuffle" if shuffle and algo in (None, "pixel_shuffle")
                    else "col2im")


def _runs(algo, pass_, batch, c_in, c_out, kernel_hw, geometry, output_hw):
    """Whether ``algo``'s kernels can run this pass of this conv (forward or weight
    gradient), whatever its speed."""
    ho, wo = output_hw
    stride_1_3x3 = (kernel_hw == (3, 3) and geometry.stride == (1, 1)
                    and geometry.dilation == (1, 1))
    match algo:
        case "im2col":
            return True
        case "direct":
            block = DIRECT_OUTPUT_BLOCK if pass_ == "forward" else GRAD_WEIGHT_OUTPUT_BLOCK
            return stride_1_3x3 and c_out % block == 0
        case "winograd4":
            return stride_1_3x3 and ho > 0 and wo > 0 and ho % 4 == 0 and wo % 4 == 0
        case "winograd2":
            return stride_1_3x3 and ho > 0 and wo > 0 and ho % 2 == 0 and wo % 2 == 0
        case "pointwise":
            return (kernel_hw == (1, 1) and geometry.stride == (1, 1)
                    and not any(geometry.padding))
        case "row_shift":
            return geometry.stride[0] == 1 and kernel_hw[0] > 1
        case _:  # col2im, pixel_shuffle: input gradients only
            return False


def _forward_algo(batch, c_in, c_out, kernel_hw, geometry, output_hw):
    ho, wo = output_hw
    layer = ("forward", batch, c_in, c_out, kernel_hw, geometry, output_hw)
    winograd = _winograd_algo(*layer)
    rules = DIRECT_OVER_WINOGRAD_RULES if winograd else DIRECT_RULES
    if _runs("direct", *layer) and _admitted(rules, wo, c_in * c_out):
        return "direct"
    if winograd:
        return winograd
    if _runs("pointwise", *layer):
        return "pointwise"
    if _runs("row_shift", *layer) and ho * wo >= ROW_SHIFT_MIN_PIXELS and c_out <= c_in:
        return "row_shift"
    return "im2col"


def _grad_weight_algo(batch, c_in, c_out, kernel_hw, geometry, output_hw):
    ho, wo = output_hw
    layer = ("grad_weight", batch, c_in, c_out, kernel_hw, geometry, output_hw)
    winograd = _winograd_algo(*layer)
    if winograd:
        return winograd
    if _runs("pointwise", *layer):
        return "pointwise"
    if _runs("direct", *layer) and _admitted(GRAD_WEIGHT_DIRECT_RULES, wo, c_in * c_out):
        return "direct"
    if _runs("row_shift", *layer) and ho * wo >= ROW_SHIFT_MIN_PIXELS:
        return "row_shift"
    return "im2col"


def _winograd_algo(pass_, batch, c_in, c_out, kernel_hw, geometry, output_hw):
    """The Winograd variant that takes this layer by default, or None."""
    ho, wo = output_hw
    layer = (pass_, batch, c_in, c_out, kernel_hw, geometry, output_hw)
    fewest = min(c_in, c_out)
    min_channels_4x4 = (WINOGRAD_4X4_NARROW_MIN_CHANNELS if wo < WINOGRAD_4X4_NARROW_BELOW_WIDTH
                        else WINOGRAD_4X4_MIN_CHANNELS)
    if (_runs("winograd4", *layer) and wo >= WINOGRAD_4X4_MIN_WIDTH
            and batch * (ho // 4) * (wo // 4) >= WINOGRAD_4X4_MIN_TILES
            and fewest >= min_channels_4x4):
        return "winograd4"
    if (_runs("winograd2", *layer) and fewest >= WINOGRAD_MIN_CHANNELS
            and c_in * c_out * batch * (ho // 2) * (wo // 2) >= WINOGRAD_MIN_WORK):
        return "winograd2"
    return None


def _admitted(rules, output_width, channel_product):
    """Whether any (minimum width, maximum C_in * C_out) rule admits the layer."""
    return any(output_width >= width and channel_product <= most for width, most in rules)


def _band_bytes(algo, c_in, c_out, forced):
    if algo not in ("im2col", "row_shift", "winograd4", "winograd2"):
        return 0
    if forced is not None and forced[1] is not None:
        return forced[1]
    if algo in ("im2col", "row_shift"):
        return COLUMN_BUDGET
    few = min(c_in, c_out) < WINOGRAD_FEW_CHANNELS
    return WINOGRAD_FEW_CHANNELS_BUDGET if few else WINOGRAD_BUDGET
