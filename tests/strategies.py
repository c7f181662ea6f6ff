"""Hypothesis strategies and per-backend budgets, kept in one place.

Every backend runs the same checks, but not at the same cost: the cuda backend runs
under Numba's CUDA simulator on machines without a GPU (about 1 ms per simulated
thread), so there it draws fewer examples of smaller shapes. Shapes still cross
padding, strides and dilation. On a real GPU (NUMBA_ENABLE_CUDASIM=0) it gets numba's
budget.

Budget per check (``EXAMPLES``, ``LIMITS``):
    numpy  20 examples, batch <= 2, channels <= 3, H and W <= 9
    numba  10 examples, the same sizes
    cuda    3 examples, batch <= 2, channels <= 2, H and W <= 5 (simulated)
Examples are derandomized (the "ci" profile in conftest.py), so every run sees the same.

    def test_something(backend):
        @budget(backend)
        @given(case=conv_cases(size_limit(backend)))
        def check(case): ...
        check()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from tinyunet.backends import cuda_backend

# conftest.py turns the simulator on unless a real GPU was asked for.
SIMULATED_GPU = cuda_backend.SIMULATED
EXAMPLES = {"numpy": 20, "numba": 10, "cuda": 3 if SIMULATED_GPU else 10}


@dataclass(frozen=True)
class Limit:
    batch: int
    channels: int
    side: int


LIMITS = {"numpy": Limit(2, 3, 9), "numba": Limit(2, 3, 9),
          "cuda": Limit(2, 2, 5) if SIMULATED_GPU else Limit(2, 3, 9)}


def budget(backend: str):
    """Hypothesis settings for a check run on ``backend``."""
    return settings(max_examples=EXAMPLES.get(backend, 5))


def size_limit(backend: str) -> Limit:
    return LIMITS.get(backend, LIMITS["cuda"])


seeds = st.integers(0, 2**32 - 1)


@dataclass(frozen=True)
class ConvCase:
    x_shape: tuple
    w_shape: tuple  # (C_out, C_in, kH, kW)
    stride: tuple
    padding: object  # (ph, pw), 'same' or 'valid'
    dilation: tuple
    bias: bool
    seed: int


@st.composite
def conv_cases(draw, limit: Limit):
    """conv2d arguments whose (dilated) kernel fits the padded input."""
    n = draw(st.integers(1, limit.batch))
    c_in, c_out = draw(st.integers(1, limit.channels)), draw(st.integers(1, limit.channels))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["pair", "pair", "same", "valid"]))
    stride = (1, 1) if mode == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2))) if mode == "pair" else mode
    pads = padding if mode == "pair" else (0, 0)
    reach = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    h = draw(st.integers(max(1, reach[0] - 2 * pads[0]), max(reach[0], limit.side)))
    w = draw(st.integers(max(1, reach[1] - 2 * pads[1]), max(reach[1], limit.side)))
    return ConvCase((n, c_in, h, w), (c_out, c_in, kh, kw), stride, padding, dilation,
                    draw(st.booleans()), draw(seeds))


@st.composite
def conv_geometries(draw, limit: Limit, max_kernel: int = 3, max_pad: int = 2):
    """Backend-level conv problems: (x_shape, w_shape, ConvGeometry, seed).

    Unlike conv_cases, each of the four sides gets its own padding, as a backend
    kernel must handle (the ops produce uneven padding for 'same' with even kernels).
    """
    from tinyunet.backends import ConvGeometry

    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, max_pad)) for _ in range(4))
    reach = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    h = draw(st.integers(max(1, reach[0] - padding[0] - padding[1]), max(reach[0], limit.side)))
    w = draw(st.integers(max(1, reach[1] - padding[2] - padding[3]), max(reach[1], limit.side)))
    n = draw(st.integers(1, limit.batch))
    c, o = draw(st.integers(1, limit.channels)), draw(st.integers(1, limit.channels))
    return (n, c, h, w), (o, c, kh, kw), ConvGeometry(stride, padding, dilation), draw(seeds)


@st.composite
def direct_conv_geometries(draw, limit: Limit):
    """3x3 stride-1 conv problems as the numba backend's direct kernels take them.

    Output channels come in multiples of the forward kernel's block, input channels
    too half the time (so the input gradient, a conv back to C_in channels, is direct
    as well); paddings are drawn per side, maps from 1 pixel up to several vectors
    wide, odd and even output heights (the kernel takes rows in pairs). Half the
    problems are 'same' convs (padding 1 on every side), whose backward shares a padded
    dy between the two direct kernels.
    """
    from tinyunet.kernels.cpu.direct3x3 import DIRECT_OUTPUT_BLOCK

    from tinyunet.backends import ConvGeometry

    padding = (1, 1, 1, 1)
    if draw(st.booleans()):
        padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h = draw(st.integers(max(1, 3 - padding[0] - padding[1]), limit.side))
    w = draw(st.integers(max(1, 3 - padding[2] - padding[3]), 4 * limit.side))
    n = draw(st.integers(1, limit.batch))
    blocks = st.integers(1, 4).map(lambda count: DIRECT_OUTPUT_BLOCK * count)
    c = draw(st.one_of(st.integers(1, limit.channels), blocks))
    o = draw(blocks)
    return (n, c, h, w), (o, c, 3, 3), ConvGeometry((1, 1), padding, (1, 1)), draw(seeds)


@st.composite
def winograd_conv_geometries(draw, limit: Limit, tile: int):
    """3x3 stride-1 conv problems as the numba backend's Winograd F(tile x tile, 3x3)
    takes them: output sides that are multiples of ``tile``, paddings drawn per side, so
    the input's sides (the input gradient's output) may or may not be."""
    from tinyunet.backends import ConvGeometry

    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    tile_rows = draw(st.integers(1, max(1, limit.side // tile)))
    tile_cols = draw(st.integers(1, max(1, 2 * limit.side // tile)))
    h = 2 + tile * tile_rows - padding[0] - padding[1]
    w = 2 + tile * tile_cols - padding[2] - padding[3]
    # Too much padding for one tile row: one more tile row instead.
    h, w = h + tile * (h < 1), w + tile * (w < 1)
    n = draw(st.integers(1, limit.batch))
    c, o = draw(st.integers(1, limit.channels)), draw(st.integers(1, limit.channels))
    return (n, c, h, w), (o, c, 3, 3), ConvGeometry((1, 1), padding, (1, 1)), draw(seeds)


@st.composite
def gemm_operands(draw, max_stack: int = 7, max_side: int = 9):
    """(a, b, out) for out = a @ b: a (S, M, K) or (M, K), b (S, K, N) or (K, N), out
    (S, M, N), or all three 2-D; a shared operand sometimes (1, ., .). a and b each
    contiguous, some columns of a wider array, or the transpose of either (as the
    backend passes them); out contiguous or such columns, filled with random values;
    float32 or float64."""
    stack = draw(st.integers(0, max_stack))  # 0: every operand 2-D
    m, k, n = (draw(st.integers(1, max_side)) for _ in range(3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(seeds))
    shared_a = stack == 0 or draw(st.booleans())
    shared_b = stack == 0 or (not shared_a and draw(st.booleans()))

    def operand(rows, cols, shared, kinds=("contiguous", "transposed", "columns",
                                           "transposed columns")):
        # A shared operand is sometimes a stack of one, which numpy broadcasts.
        lead = (1,) if shared and stack and draw(st.booleans()) else () if shared else (stack,)
        kind = draw(st.sampled_from(kinds))
        extra = draw(st.integers(1, 3)) if "columns" in kind else 0
        if kind.startswith("transposed"):
            stored = rng.standard_normal((*lead, cols, rows + extra)).astype(dtype)
            return stored[..., :rows].swapaxes(-1, -2)
        return rng.standard_normal((*lead, rows, cols + extra)).astype(dtype)[..., :cols]

    return (operand(m, k, shared_a), operand(k, n, shared_b),
            operand(m, n, stack == 0, ("contiguous", "columns")))


@dataclass(frozen=True)
class ConvTransposeCase:
    x_shape: tuple
    w_shape: tuple  # (C_in, C_out, kH, kW)
    stride: tuple
    padding: tuple
    output_padding: tuple
    dilation: tuple
    bias: bool
    seed: int


@st.composite
def gram_stacks(draw, block: int, max_stack: int = 3, max_blocks: int = 3, max_length: int = 40):
    """(a, b, out) for stacks of a @ b^T: a (S, I, T), b (S, J, T) with I and J
    multiples of ``block``, T from 0 (an empty sum) past a few vector widths, and a
    random out (S, I, J) to accumulate into; float32 or float64."""
    stack = draw(st.integers(1, max_stack))
    i_rows, j_rows = (block * draw(st.integers(1, max_blocks)) for _ in range(2))
    length = draw(st.integers(0, max_length))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(seeds))
    return (rng.standard_normal((stack, i_rows, length)).astype(dtype),
            rng.standard_normal((stack, j_rows, length)).astype(dtype),
            rng.standard_normal((stack, i_rows, j_rows)).astype(dtype))


@st.composite
def filter_banks(draw, max_channels: int = 40):
    """(tile, w, du): a Winograd tile (2 or 4), a 3x3 weight (O, C, 3, 3) and a
    transformed weight gradient (alpha^2, O, C), alpha = tile + 2, for F(tile x tile,
    3x3)'s filter transforms; C crosses a few vector widths, float32 or float64."""
    tile = draw(st.sampled_from([2, 4]))
    o, c = draw(st.integers(1, 5)), draw(st.integers(1, max_channels))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(seeds))
    return (tile, rng.standard_normal((o, c, 3, 3)).astype(dtype),
            rng.standard_normal(((tile + 2) ** 2, o, c)).astype(dtype))


@st.composite
def conv_transpose_cases(draw, limit: Limit):
    """conv_transpose2d arguments with a positive output size (output_padding < stride)."""
    n = draw(st.integers(1, limit.batch))
    c_in, c_out = draw(st.integers(1, limit.channels)), draw(st.integers(1, limit.channels))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    output_padding = (draw(st.integers(0, stride[0] - 1)), draw(st.integers(0, stride[1] - 1)))
    side = max(2, limit.side // 2)
    h, w = draw(st.integers(1, side)), draw(st.integers(1, side))
    full = ((h - 1) * stride[0] + dilation[0] * (kh - 1) + output_padding[0] + 1,
            (w - 1) * stride[1] + dilation[1] * (kw - 1) + output_padding[1] + 1)
    padding = (draw(st.integers(0, (full[0] - 1) // 2)), draw(st.integers(0, (full[1] - 1) // 2)))
    return ConvTransposeCase((n, c_in, h, w), (c_in, c_out, kh, kw), stride, padding,
                             output_padding, dilation, draw(st.booleans()), draw(seeds))


@dataclass(frozen=True)
class PoolCase:
    x_shape: tuple
    kernel: tuple
    stride: tuple | None
    padding: tuple
    dilation: tuple
    seed: int

    @property
    def geometry(self):
        """The backend-level PoolGeometry (stride None means the kernel, as in PyTorch)."""
        from tinyunet.backends import PoolGeometry

        return PoolGeometry(self.kernel, self.stride or self.kernel, self.padding,
                            self.dilation)


@st.composite
def pool_cases(draw, limit: Limit):
    """max_pool2d arguments (padding at most half the kernel, as PyTorch requires).

    H and W are at least the dilation, so no window sees only padding.
    """
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    reach = [d * (k - 1) + 1 - 2 * p for d, k, p in zip(dilation, kernel, padding, strict=True)]
    low = [max(1, r, d) for r, d in zip(reach, dilation, strict=True)]
    shape = (draw(st.integers(1, limit.batch)), draw(st.integers(1, limit.channels)),
             draw(st.integers(low[0], max(low[0], limit.side))),
             draw(st.integers(low[1], max(low[1], limit.side))))
    return PoolCase(shape, kernel, stride, padding, dilation, draw(seeds))


@st.composite
def image_shapes(draw, limit: Limit, min_channels: int = 1):
    return (draw(st.integers(1, limit.batch)),
            draw(st.integers(min_channels, max(min_channels, limit.channels))),
            draw(st.integers(1, limit.side)), draw(st.integers(1, limit.side)))


def distinct_values(rng, shape, spacing=0.05):
    """Values at least ``spacing`` apart in random order: max-pool has no ties."""
    count = int(np.prod(shape))
    return (rng.permutation(count) * spacing - count * spacing / 2).reshape(shape)


def away_from_zero(rng, shape, gap=0.1):
    """Normal values pushed at least ``gap`` away from 0: ReLU's kink is never crossed."""
    x = rng.standard_normal(shape)
    return np.sign(x) * (np.abs(x) + gap) + (x == 0) * gap
