"""The numba backend against the numpy reference, kernel by kernel and on a training run.

Shapes, strides, paddings, dilations and channel counts are drawn by hypothesis. Each
conv case runs with the backend's own choice of path (on these small shapes: im2col on
whole images) and with each algorithm of the conv policy forced where it can run
(policy.force_conv_algo), on bands of a few rows or tile rows where it works in bands,
so every path of the backend is checked.
"""

import contextlib

import numpy as np
import pytest
from gradcheck import check_gradients
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from strategies import (  # noqa: E402
    Limit,
    conv_geometries,
    direct_conv_geometries,
    filter_banks,
    gram_stacks,
    pool_cases,
    winograd_conv_geometries,
)
from tinyunet.kernels.cpu import direct3x3, gemm, im2col, optim, runtime, winograd  # noqa: E402

import tinyunet.functional as F  # noqa: E402
from tinyunet.backends import ConvGeometry, PoolGeometry, get_backend  # noqa: E402
from tinyunet.backends.interface import Backend  # noqa: E402
from tinyunet.backends.numba import NumbaBackend, policy  # noqa: E402
from tinyunet.backends.numba import elementwise as numba_elementwise  # noqa: E402
from tinyunet.backends.numba import optim as numba_optim  # noqa: E402
from tinyunet.backends.numba import winograd as numba_winograd  # noqa: E402

NUMPY = get_backend("numpy")
NUMBA = get_backend("numba")


@pytest.fixture(autouse=True, params=["serial twins", "parallel kernels"])
def kernel_mode(request, monkeypatch):
    """Every test twice: the small shapes here go to the kernels' serial twins by
    default, so the parallel compiles (and GEMMs on the pool) are forced for the
    second run."""
    if request.param == "parallel kernels":
        monkeypatch.setattr(runtime, "PARALLEL_MIN_ELEMENTS", 0)
        # The GEMMs run on the pool too (blas), however small.
        monkeypatch.setattr(runtime, "MIN_PARALLEL_FLOPS", 0)
    return request.param

DTYPES = st.sampled_from([np.float32, np.float64])


def assert_close(actual, expected, dtype):
    """Equal up to rounding: the two backends sum the same products in other orders."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


# Kernels up to 4x4 and paddings up to 3 on maps up to 10x10, so the banded paths see
# several bands and every edge case of the fused padding.
NUMBA_CONV = Limit(batch=3, channels=4, side=10)


# The backend picks its path by size; each entry forces one onto the small maps here:
# (algorithm, band bytes). Bands of 64 bytes hold one row (or tile row) each, so the
# band loops run. Passes the algorithm cannot run take their general path.
PATHS = {
    "default": None,
    "im2col on bands of rows": ("im2col", 64),
    "row shift": ("row_shift", None),
    "row shift on bands of rows": ("row_shift", 64),
    "direct 3x3 kernels": ("direct", None),
    "Winograd F(2x2, 3x3)": ("winograd2", 64),
    "Winograd F(4x4, 3x3)": ("winograd4", 64),
    "col2im input gradients": ("col2im", None),
}


def forced(path):
    """The override that forces PATHS[path] within its block."""
    choice = PATHS[path]
    return contextlib.nullcontext() if choice is None else policy.force_conv_algo(*choice)


@pytest.mark.parametrize("path", list(PATHS))
@given(case=conv_geometries(NUMBA_CONV, max_kernel=4, max_pad=3), dtype=DTYPES)
def test_conv2d_and_its_gradients_match_numpy(path, case, dtype):
    x_shape, w_shape, geometry, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    with forced(path):
        check_conv(x, weight, geometry, dtype)


@given(case=direct_conv_geometries(NUMBA_CONV), dtype=DTYPES)
def test_direct_3x3_kernels_match_numpy(case, dtype):
    """The few-channel 3x3 path (padded copy + direct kernels), and that it is taken."""
    x_shape, w_shape, geometry, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    calls = []
    with forced("direct 3x3 kernels"), pytest.MonkeyPatch.context() as patch:
        for name in ("conv3x3_forward", "conv3x3_grad_weight"):
            kernel = getattr(direct3x3, name)
            patch.setattr(direct3x3, name,
                          lambda *args, kernel=kernel, name=name: (calls.append(name),
                                                                   kernel(*args)))
        check_conv(x, weight, geometry, dtype)
    # conv2d and conv2d_bias_relu, and the input gradient when C_in (its conv's output
    # channels) is a multiple of the kernel's block.
    block = direct3x3.DIRECT_OUTPUT_BLOCK
    assert calls.count("conv3x3_forward") == (3 if x_shape[1] % block == 0 else 2)
    assert calls.count("conv3x3_grad_weight") == 1


@given(case=direct_conv_geometries(NUMBA_CONV), dtype=DTYPES,
       need=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_direct_backward_of_a_same_conv_pads_dy_once(case, dtype, need):
    """conv2d_grads: where both gradients of a 'same' conv take the direct kernels, they
    read one padded copy of dy; elsewhere each makes its own, as the two methods do."""
    x_shape, w_shape, geometry, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    dy = rng.standard_normal((x_shape[0], w_shape[0], *geometry.output_hw(x_shape[2:], (3, 3))))
    dy = dy.astype(dtype)
    pads = []
    with forced("direct 3x3 kernels"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "pad_images",
                      _Spy(im2col.pad_images, pads))
        dx, dw = NUMBA.conv2d_grads(dy, x, weight, geometry, *need)
    assert (dx is None, dw is None) == (not need[0], not need[1])
    if need[0]:
        assert_close(dx, NUMPY.conv2d_grad_input(dy, weight, geometry, x_shape[2:]), dtype)
    if need[1]:
        assert_close(dw, NUMPY.conv2d_grad_weight(dy, x, geometry, (3, 3)), dtype)
    # The input gradient is direct (and pads dy) when C_in is a multiple of the block.
    input_pads = need[0] and x_shape[1] % direct3x3.DIRECT_OUTPUT_BLOCK == 0
    shared = input_pads and need[1] and geometry.padding == (1, 1, 1, 1)
    assert sum(call[0] is dy for call in pads) == (1 if shared else input_pads + need[1])


@given(stacks=gram_stacks(gemm.GRAM_BLOCK), accumulate=st.booleans())
def test_stacked_gram_matches_numpy(stacks, accumulate):
    """The weight gradients' a @ b^T kernel, writing or adding to what out holds; a
    spare row of NaN under a and b (as the Winograd bands have) is not read."""
    a, b, out = stacks
    expected = np.matmul(a, b.transpose(0, 2, 1)) + (out if accumulate else 0)
    spare = np.full((len(a), 1, a.shape[2]), np.nan, dtype=a.dtype)
    a, b = np.concatenate([a, spare], axis=1), np.concatenate([b, spare], axis=1)
    kernel = gemm.stacked_gram
    runtime.run(kernel, a.size + b.size, a, b, accumulate, out)
    assert_close(out, expected, a.dtype)


@given(bank=filter_banks(), flip=st.booleans())
def test_winograd_filter_transforms_match_numpy(bank, flip):
    """u = G f G^T per filter f (rotated by 180 degrees with ``flip``), and its adjoint
    dW = G^T dU G, against numpy's products in float64."""
    tile, w, du = bank
    o, c = w.shape[:2]
    g = numba_winograd._WINOGRAD_G[tile][w.dtype]
    taps = w[:, :, ::-1, ::-1] if flip else w
    expected = np.einsum("ai,ocij,bj->aboc", g, taps.astype(np.float64), g)
    u = np.empty_like(du)
    runtime.run(winograd.winograd_filters, u.size, w.reshape(o, c, 9),
                       g, flip, u)
    assert_close(u, expected.reshape(du.shape).astype(w.dtype), w.dtype)

    alpha = tile + 2
    expected = np.einsum("ai,aboc,bj->ocij", g, du.reshape(alpha, alpha, o, c).astype(
        np.float64), g)
    dw = np.empty_like(w)
    runtime.run(winograd.winograd_filter_gradient, du.size, du, g, dw.reshape(o, c, 9))
    assert_close(dw, expected.astype(w.dtype), w.dtype)


@pytest.mark.parametrize("batch, c_in, c_out, gram_calls", [
    (2, 4, 68, 1),   # im2col: 68 x 36 rows over 2 images of 256 pixels
    (2, 6, 68, 0),   # 54 rows: not a multiple of the kernel's block
    (2, 4, 66, 0),   # nor 66
    (2, 68, 68, 0),  # neither side within GRAM_MAX_ROWS
    (1, 4, 68, 0),   # 256 pixels: shorter than GRAM_MIN_LENGTH
])
def test_weight_gradient_gram_rules(batch, c_in, c_out, gram_calls):
    """The weight gradient's GEMMs go to stacked_gram when both operands' rows are
    multiples of its block, one has at most GRAM_MAX_ROWS rows and they are at least
    GRAM_MIN_LENGTH long, else to BLAS."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c_in, 16, 16)).astype(np.float32)
    dy = rng.standard_normal((batch, c_out, 16, 16)).astype(np.float32)
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        kernel = gemm.stacked_gram
        patch.setattr(gemm, "stacked_gram", _Spy(kernel, calls))
        dw = NUMBA.conv2d_grad_weight(dy, x, geometry, (3, 3))
    assert len(calls) == gram_calls
    assert_close(dw, NUMPY.conv2d_grad_weight(dy, x, geometry, (3, 3)), np.float32)


# Weight-gradient paths whose GEMMs stacked_gram can take, on small maps (so with
# GRAM_MIN_LENGTH off): (kernel size, forced (algorithm, band bytes), kernel calls
# expected for 2 images of 8x8). Winograd takes a band per tile row (8 of F(2x2)'s, 4 of
# F(4x4)'s), which the kernel adds into the first band's sums; im2col one band of both
# whole images, or bands of rows, which stay in BLAS (views with gaps); the 1x1 conv
# one call an image.
GRAM_PATHS = {
    "Winograd F(2x2) bands": (3, ("winograd2", 64), 8),
    "Winograd F(4x4) bands": (3, ("winograd4", 64), 4),
    "im2col": (3, ("im2col", None), 1),
    "im2col bands of rows": (3, ("im2col", 64), 0),
    "1x1": (1, ("pointwise", None), 2),
}


@pytest.mark.parametrize("path", list(GRAM_PATHS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_gradient_through_stacked_gram_matches_numpy(path, dtype):
    kernel_size, choice, gram_calls = GRAM_PATHS[path]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(dtype)
    dy = rng.standard_normal((2, 8, 8, 8)).astype(dtype)
    pad = kernel_size // 2
    geometry = ConvGeometry((1, 1), (pad, pad, pad, pad))
    calls = []
    with policy.force_conv_algo(*choice), pytest.MonkeyPatch.context() as patch:
        patch.setattr(policy, "GRAM_MIN_LENGTH", 0)
        kernel = gemm.stacked_gram
        patch.setattr(gemm, "stacked_gram", _Spy(kernel, calls))
        dw = NUMBA.conv2d_grad_weight(dy, x, geometry, (kernel_size, kernel_size))
    assert len(calls) == gram_calls
    expected = NUMPY.conv2d_grad_weight(dy, x, geometry, (kernel_size, kernel_size))
    assert_close(dw, expected, dtype)


WINOGRAD_KERNELS = [f"winograd{tile}_{part}_tiles" for tile in (2, 4)
                    for part in ("input", "output", "gradient")]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("budget", ["one band", "one tile row a band"])
@given(data=st.data(), dtype=DTYPES)
def test_winograd_path_matches_numpy(tile, budget, data, dtype):
    """The Winograd F(2x2, 3x3) and F(4x4, 3x3) paths (transforms + GEMMs) against
    numpy, forced, and that each pass whose sides allow it takes them, band by band."""
    x_shape, w_shape, geometry, seed = data.draw(winograd_conv_geometries(NUMBA_CONV, tile))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    band_bytes = 1 << 30 if budget == "one band" else 64
    calls = {name: [] for name in WINOGRAD_KERNELS}
    with (policy.force_conv_algo(f"winograd{tile}", band_bytes),
          pytest.MonkeyPatch.context() as patch):
        for name in WINOGRAD_KERNELS:
            kernel = getattr(winograd, name)
            patch.setattr(winograd, name, _Spy(kernel, calls[name]))
        check_conv(x, weight, geometry, dtype)
    n, _, h, w = x_shape
    output_rows = (h + geometry.padding[0] + geometry.padding[1] - 2) // tile
    # The input gradient's output is the input: Winograd if its sides allow, else the
    # general path.
    input_tile = tile if h % tile == 0 and w % tile == 0 else 0
    expected = {name: 0 for name in WINOGRAD_KERNELS}
    forward_bands = 1 if budget == "one band" else n * output_rows
    # conv2d and conv2d_bias_relu; the weight gradient.
    expected[f"winograd{tile}_input_tiles"] += 3 * forward_bands
    expected[f"winograd{tile}_output_tiles"] += 2 * forward_bands
    expected[f"winograd{tile}_gradient_tiles"] += forward_bands
    if input_tile:
        input_bands = 1 if budget == "one band" else n * h // input_tile
        expected[f"winograd{input_tile}_input_tiles"] += input_bands
        expected[f"winograd{input_tile}_output_tiles"] += input_bands
    assert {name: len(found) for name, found in calls.items()} == expected


@pytest.mark.parametrize("width, channels, winograd_calls",
                         [(64, 8, 0), (64, 16, 1), (32, 4, 0), (32, 8, 1)])
def test_weight_gradient_4x4_channel_rules(width, channels, winograd_calls):
    """The weight gradient takes F(4x4) from WINOGRAD_4X4_MIN_CHANNELS on, even on
    layers that the direct kernel's rules admit too (64-wide maps: 8 channels go
    direct); on maps narrower than WINOGRAD_4X4_NARROW_BELOW_WIDTH from
    WINOGRAD_4X4_NARROW_MIN_CHANNELS on."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, channels, width, width)).astype(np.float32)
    dy = rng.standard_normal((1, channels, width, width)).astype(np.float32)
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    calls, direct_calls = [], []
    with pytest.MonkeyPatch.context() as patch:
        kernel = winograd.winograd4_gradient_tiles
        patch.setattr(winograd, "winograd4_gradient_tiles", _Spy(kernel, calls))
        direct = direct3x3.conv3x3_grad_weight
        patch.setattr(direct3x3, "conv3x3_grad_weight",
                      _Spy(direct, direct_calls))
        dw = NUMBA.conv2d_grad_weight(dy, x, geometry, (3, 3))
    assert len(calls) == winograd_calls
    assert len(direct_calls) == (width == 64 and not winograd_calls)
    assert_close(dw, NUMPY.conv2d_grad_weight(dy, x, geometry, (3, 3)), np.float32)


@pytest.mark.parametrize("batch, side, channels, algo", [
    (4, 16, 128, "winograd4"),  # 64 tiles of 4x4 (A's level 3)
    (2, 16, 512, "winograd2"),  # 32 tiles (B's bottom)
    (4, 8, 256, "winograd2"),   # 8 wide (A's bottom)
    (2, 32, 256, "winograd4"),  # 128 tiles (B's level 3)
    (8, 16, 16, "winograd4"),   # 128 tiles of few channels, on a map under 64 wide (C's level 2)
    (8, 8, 64, "winograd2"),    # 128 tiles of 2x2 (C's bottom)
    (8, 8, 16, "im2col"),       # too few channels for F(2x2)
    (2, 8, 32, "im2col"),       # too little work (32 tiles)
])
def test_winograd_variant_rules(batch, side, channels, algo):
    """Which Winograd variant a 3x3 'same' conv's weight gradient takes (Winograd comes
    first there), by map width, tiles and channels."""
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    plan = policy.plan_conv("grad_weight", batch, channels, channels, (side, side), (3, 3),
                            geometry)
    assert plan.algo == algo


@pytest.mark.parametrize("batch, side, c_in, c_out, route", [
    (4, 128, 16, 16, "direct"),     # A's level 0
    (4, 128, 32, 16, "winograd4"),  # A's level-0 up layer
    (4, 64, 16, 32, "winograd4"),   # A's level 1
    (4, 128, 1, 16, "direct"),      # A's first layer
    (8, 64, 16, 8, "direct"),       # C's level-0 up layer
    (8, 64, 1, 8, "direct"),        # C's first layer
    (2, 256, 32, 32, "winograd4"),  # B's level 0
    (4, 64, 16, 16, "winograd4"),
    (4, 64, 8, 32, "direct"),       # F(4x4) needs 16 channels a side: the direct rules
    (1, 64, 3, 64, "direct"),
    (1, 64, 3, 256, "im2col"),
    (8, 8, 32, 64, "winograd2"),    # C's bottom: 32 channels, 2^18 of work
    (8, 8, 32, 32, "im2col"),       # 2^17 of work
])
def test_forward_routes(batch, side, c_in, c_out, route):
    """Which path a 3x3 'same' conv's forward takes on the benchmark U-Nets' outer
    levels and a few others (DIRECT_OVER_WINOGRAD_RULES where Winograd applies, else
    DIRECT_RULES)."""
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    plan = policy.plan_conv("forward", batch, c_in, c_out, (side, side), (3, 3), geometry)
    assert plan.algo == route



@pytest.mark.parametrize("pass_, batch, c_in, c_out, side, kernel, stride, pad, route", [
    ("forward", 2, 8, 4, 16, 1, 1, 0, "pointwise"),          # the head
    ("grad_input", 2, 8, 4, 16, 1, 1, 0, "pointwise"),       # its adjoint: a 1x1 conv too
    ("grad_weight", 2, 8, 4, 16, 1, 1, 0, "pointwise"),
    ("forward", 2, 8, 8, 36, 5, 1, 2, "row_shift"),          # 1296 output pixels
    ("forward", 2, 8, 16, 36, 5, 1, 2, "im2col"),            # C_out > C_in
    ("grad_weight", 2, 8, 16, 36, 5, 1, 2, "row_shift"),
    ("forward", 2, 8, 8, 20, 5, 1, 2, "im2col"),             # 400 output pixels
    ("grad_input", 2, 4, 8, 16, 2, 2, 0, "pixel_shuffle"),   # the up-conv's forward
    ("grad_input", 2, 4, 8, 16, 3, 2, 1, "col2im"),          # stride 2: no stride-1 adjoint
    ("grad_input", 2, 4, 8, 16, 3, 1, 3, "col2im"),          # padding beyond the reach
    ("grad_input", 4, 16, 16, 128, 3, 1, 1, "direct"),       # A's level 0, adjoint conv
    ("grad_input", 4, 32, 16, 128, 3, 1, 1, "winograd4"),
])
def test_routes_of_other_layers(pass_, batch, c_in, c_out, side, kernel, stride, pad, route):
    """plan_conv on 1x1, 5x5, strided and transposed layers, and on input gradients."""
    geometry = ConvGeometry((stride, stride), (pad,) * 4)
    plan = policy.plan_conv(pass_, batch, c_in, c_out, (side, side), (kernel, kernel),
                            geometry)
    assert plan.algo == route


# For each algorithm: a layer it can run on every pass it applies to (x shape, weight
# shape, stride, padding), the passes that must take it (the others take their general
# path), and a kernel that it calls (and, for pointwise, one that it must not call).
FORCEABLE = {
    "direct": ((2, 4, 9, 12), (6, 4, 3, 3), 1, (1, 2, 0, 1),
               policy.PASSES, (direct3x3, "conv3x3_forward", True)),
    "winograd4": ((2, 3, 8, 12), (5, 3, 3, 3), 1, (1, 1, 1, 1),
                  policy.PASSES, (winograd, "winograd4_input_tiles", True)),
    "winograd2": ((2, 3, 6, 10), (5, 3, 3, 3), 1, (1, 1, 1, 1),
                  policy.PASSES, (winograd, "winograd2_input_tiles", True)),
    "pointwise": ((2, 3, 5, 7), (4, 3, 1, 1), 1, (0, 0, 0, 0),
                  policy.PASSES, (im2col, "im2col_rows", False)),
    "row_shift": ((2, 3, 7, 9), (5, 3, 3, 3), 1, (1, 0, 2, 1),
                  policy.PASSES, (im2col, "row_shift_sum", True)),
    "im2col": ((2, 3, 7, 9), (5, 3, 3, 2), 1, (1, 1, 0, 1),
               policy.PASSES, (im2col, "im2col_rows", True)),
    "col2im": ((2, 3, 7, 9), (5, 3, 3, 3), 1, (1, 1, 1, 1), ("grad_input",),
               (im2col, "col2im_gather", True)),
    "pixel_shuffle": ((2, 3, 8, 10), (5, 3, 2, 2), 2, (0, 0, 0, 0), ("grad_input",),
                      (im2col, "depth_to_space_2x2", True)),
}


@pytest.mark.parametrize("override", ["force_conv_algo", "TINYUNET_CONV_ALGO"])
@pytest.mark.parametrize("algo", list(FORCEABLE))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_override_forces_every_algorithm_and_it_matches_numpy(algo, override, dtype,
                                                                   monkeypatch):
    """Forced by the context manager or the environment variable, each algorithm takes
    every pass of a layer it can run (its plan says so and its kernel runs), and the
    results agree with numpy's to rounding."""
    x_shape, w_shape, stride, padding, passes, (module, kernel, called) = FORCEABLE[algo]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal(w_shape).astype(dtype)
    geometry = ConvGeometry((stride, stride), padding)
    layer = (x_shape[0], x_shape[1], w_shape[0], x_shape[2:], w_shape[2:], geometry)
    calls = []
    monkeypatch.setattr(module, kernel, _Spy(getattr(module, kernel), calls))
    if override == "TINYUNET_CONV_ALGO":
        monkeypatch.setenv("TINYUNET_CONV_ALGO", algo)
        override_block = contextlib.nullcontext()
    else:
        override_block = policy.force_conv_algo(algo)
    with override_block:
        plans = {pass_: policy.plan_conv(pass_, *layer).algo
                 for pass_ in ("forward", "grad_input", "grad_weight")}
        check_conv(x, weight, geometry, dtype)
        dy = rng.standard_normal((x_shape[0], w_shape[0],
                                  *geometry.output_hw(x_shape[2:], w_shape[2:]))).astype(dtype)
        dx, dw = NUMBA.conv2d_grads(dy, x, weight, geometry)
    general = {"forward": "im2col", "grad_weight": "im2col",
               "grad_input": "im2col" if stride == 1 else "col2im"}
    assert plans == {pass_: algo if pass_ in passes else general[pass_] for pass_ in plans}
    assert bool(calls) == called
    assert_close(dx, NUMPY.conv2d_grad_input(dy, weight, geometry, x_shape[2:]), dtype)
    assert_close(dw, NUMPY.conv2d_grad_weight(dy, x, geometry, w_shape[2:]), dtype)


def test_an_algorithm_that_cannot_run_a_layer_falls_back_to_the_general_path(monkeypatch):
    """Winograd on a 5x5 kernel: im2col for the forward and the weight gradient, the
    adjoint conv by im2col for the input gradient; the context manager wins over the
    environment, and the environment is read at each plan."""
    geometry = ConvGeometry((1, 1), (2, 2, 2, 2))
    layer = (2, 3, 4, (8, 8), (5, 5), geometry)
    with policy.force_conv_algo("winograd4"):
        plans = [policy.plan_conv(pass_, *layer) for pass_ in policy.PASSES]
    assert [plan.algo for plan in plans] == ["im2col"] * 3
    monkeypatch.setenv("TINYUNET_CONV_ALGO", "row_shift")
    assert policy.plan_conv("forward", *layer).algo == "row_shift"
    with policy.force_conv_algo("im2col", band_bytes=128):
        assert policy.plan_conv("forward", *layer) == policy.ConvPlan("im2col", 128)
    monkeypatch.delenv("TINYUNET_CONV_ALGO")
    assert policy.plan_conv("forward", *layer).algo == "im2col"  # 64 pixels: the default


def test_an_unknown_algorithm_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="force_conv_algo: Expect: one of direct, .* "
                                         "Actual: 'fft'"):
        with policy.force_conv_algo("fft"):
            pass
    monkeypatch.setenv("TINYUNET_CONV_ALGO", "fft")
    with pytest.raises(ValueError, match="TINYUNET_CONV_ALGO: Expect: one of .* Actual: 'fft'"):
        NUMBA.conv2d(np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 3, 3), np.float32),
                     ConvGeometry((1, 1), (1, 1, 1, 1)))

@pytest.mark.parametrize("tile", [2, 4])
@settings(max_examples=6)
@given(n=st.integers(1, 2), channels=st.sampled_from([(1, 1), (2, 3), (4, 2)]),
       tiles=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_winograd_gradients_by_finite_differences(tile, n, channels, tiles, padding, bias,
                                                  seed):
    """F.conv2d through the Winograd F(tile x tile, 3x3) path, against central
    differences in float64. The input gradient is a Winograd conv too where the input's
    sides are multiples of the tile, else the general path."""
    (c_in, c_out), (ph, pw) = channels, padding
    h, w = tile * tiles[0] + 2 - 2 * ph, tile * tiles[1] + 2 - 2 * pw
    h, w = h + tile * (h <= 0), w + tile * (w <= 0)
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((n, c_in, h, w)), rng.standard_normal((c_out, c_in, 3, 3))]
    if bias:
        inputs.append(rng.standard_normal(c_out))
    with forced(f"Winograd F({tile}x{tile}, 3x3)"):
        check_gradients(lambda *t: F.conv2d(*t, padding=padding), inputs, "numba", seed)


@settings(max_examples=6)
@given(n=st.integers(1, 2), c_in=st.sampled_from([1, 2, 4]), c_out=st.sampled_from([4, 8]),
       h=st.integers(1, 6), w=st.integers(1, 12), padding=st.tuples(st.integers(0, 2),
                                                                     st.integers(0, 2)),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_direct_3x3_gradients_by_finite_differences(n, c_in, c_out, h, w, padding, bias,
                                                     seed):
    """F.conv2d through the direct kernels, against central differences in float64."""
    h, w = max(h, 3 - 2 * padding[0]), max(w, 3 - 2 * padding[1])
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((n, c_in, h, w)), rng.standard_normal((c_out, c_in, 3, 3))]
    if bias:
        inputs.append(rng.standard_normal(c_out))
    with forced("direct 3x3 kernels"):
        check_gradients(lambda *t: F.conv2d(*t, padding=padding), inputs, "numba", seed)


@pytest.mark.parametrize("compiled", ["parallel", "serial"])
def test_im2col_of_an_input_narrower_than_the_kernel(compiled):
    """A 1-pixel map under a 3x3 kernel with padding 2: some column rows lie wholly in
    the padding. The parallel im2col once stopped at the first of those and left the
    rest of its rows unwritten, so the columns start out as NaN here."""
    x = np.arange(1.0, 5.0, dtype=np.float32).reshape(1, 4, 1, 1)
    kernel = im2col.im2col_rows
    cols = np.full((4 * 9, 3), np.nan, dtype=np.float32)
    # 3 output rows, 1 column; padding top 2 and left 2.
    (kernel if compiled == "parallel" else kernel.serial)(x, 0, 1, 0, 3, 3, 3, 1, 1, 2, 2,
                                                          1, 1, 1, cols)
    padded = np.pad(x[0], ((0, 0), (2, 2), (2, 0)))
    expected = np.array([[padded[c, r + i, j] for r in range(3)]
                         for c in range(4) for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(cols, expected)


def check_conv(x, weight, geometry, dtype):
    y = NUMBA.conv2d(x, weight, geometry)
    assert_close(y, NUMPY.conv2d(x, weight, geometry), dtype)
    bias = np.random.default_rng(2).standard_normal(weight.shape[0]).astype(dtype)
    assert_close(NUMBA.conv2d_bias_relu(x, weight, bias, geometry),
                 NUMPY.conv2d_bias_relu(x, weight, bias, geometry), dtype)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    assert_close(NUMBA.conv2d_grad_input(dy, weight, geometry, x.shape[2:]),
                 NUMPY.conv2d_grad_input(dy, weight, geometry, x.shape[2:]), dtype)
    assert_close(NUMBA.conv2d_grad_weight(dy, x, geometry, weight.shape[2:]),
                 NUMPY.conv2d_grad_weight(dy, x, geometry, weight.shape[2:]), dtype)


class _Spy:
    """A kernel that records its calls (parallel or serial) and then runs."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __call__(self, *args):
        self.calls.append(args)
        return self.kernel(*args)

    def serial(self, *args):
        self.calls.append(args)
        return self.kernel.serial(*args)


@given(dtype=DTYPES, n=st.integers(1, 3), c_in=st.integers(1, 5), c_out=st.integers(1, 5),
       h=st.integers(1, 6), w=st.integers(1, 6), extra=st.sampled_from([(0, 0), (1, 0), (0, 1)]),
       seed=st.integers(0, 2**16))
def test_transposed_conv_2x2_stride_2_matches_numpy(dtype, n, c_in, c_out, h, w, extra, seed):
    """The U-Net's up-conv: conv2d_grad_input with stride 2 (GEMM + pixel shuffle); with
    an output padding (an extra row or column that no window covers) the general gather."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_in, c_out, 2, 2)).astype(dtype)
    geometry = ConvGeometry((2, 2), (0, 0, 0, 0))
    out_hw = (2 * h + extra[0], 2 * w + extra[1])
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "depth_to_space_2x2",
                      _Spy(im2col.depth_to_space_2x2, calls))
        assert_close(NUMBA.conv2d_grad_input(x, weight, geometry, out_hw),
                     NUMPY.conv2d_grad_input(x, weight, geometry, out_hw), dtype)
    assert len(calls) == (1 if extra == (0, 0) else 0)


@given(dtype=DTYPES, n=st.integers(1, 3), c_skip=st.integers(0, 3), c_in=st.integers(1, 5),
       c_out=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6),
       need=st.sampled_from([(True, True, True), (True, True, False), (False, True, True),
                             (True, False, True)]),
       seed=st.integers(0, 2**16))
def test_up_conv_gradients_share_the_columns_of_dy(dtype, n, c_skip, c_in, c_out, h, w, need,
                                                   seed):
    """conv_transpose2d_grads of a 2x2 stride-2 transposed conv: dy's columns once for
    dx, dW and db (when dx and dW are both wanted), read from a channel slice of a
    concat's gradient as the U-Net hands it over, not a contiguous copy."""
    rng = np.random.default_rng(seed)
    joined = rng.standard_normal((n, c_skip + c_out, 2 * h, 2 * w)).astype(dtype)
    dy = joined[:, c_skip:]
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_in, c_out, 2, 2)).astype(dtype)
    geometry = ConvGeometry((2, 2), (0, 0, 0, 0))
    calls, default_calls = [], []
    kernel = im2col.im2col_2x2_stride2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "im2col_2x2_stride2", _Spy(kernel, calls))
        got = NUMBA.conv_transpose2d_grads(dy, x, weight, geometry, *need)
        patch.setattr(im2col, "im2col_2x2_stride2", _Spy(kernel, default_calls))
        Backend.conv_transpose2d_grads(NUMBA, dy, x, weight, geometry, *need)
    expected = NUMPY.conv_transpose2d_grads(dy, x, weight, geometry, *need)
    for wanted, a, b in zip(need, got, expected, strict=True):
        assert (a is None) == (b is None) == (not wanted)
        if wanted:
            assert_close(a, b, dtype)
    # These columns fit one band: made once, where the interface's way makes them for
    # each of dx and dW.
    assert len(calls) == 1
    assert len(default_calls) == need[0] + need[1]


@given(dtype=DTYPES, n=st.integers(1, 3), c_skip=st.integers(1, 4), c_in=st.integers(1, 5),
       c_out=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_up_conv_writes_into_the_concatenation(dtype, n, c_skip, c_in, c_out, h, w, bias,
                                               seed):
    """conv_transpose2d_concat: the pixel shuffle writes the up-conv (bias added) straight
    into its channels of the joined array, after the skip's."""
    rng = np.random.default_rng(seed)
    skip = rng.standard_normal((n, c_skip, 2 * h, 2 * w)).astype(dtype)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_in, c_out, 2, 2)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype) if bias else None
    geometry = ConvGeometry((2, 2), (0, 0, 0, 0))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "depth_to_space_2x2",
                      _Spy(im2col.depth_to_space_2x2, calls))
        joined = NUMBA.conv_transpose2d_concat(skip, x, weight, b, geometry, (2 * h, 2 * w))
    assert_close(joined, NUMPY.conv_transpose2d_concat(skip, x, weight, b, geometry,
                                                       (2 * h, 2 * w)), dtype)
    assert [call[-1] for call in calls] == [c_skip]  # one shuffle, from channel c_skip on


@pytest.mark.parametrize("path", ["default", "im2col on bands of rows"])
@given(dtype=DTYPES, n=st.integers(1, 3), c_in=st.integers(1, 5), c_out=st.integers(1, 5),
       h=st.integers(2, 9), w=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_2x2_stride_2_conv_matches_numpy(path, dtype, n, c_in, c_out, h, w, seed):
    """The up-conv's gradients: a 2x2 stride-2 conv (odd sizes drop their last row or
    column) through the space-to-depth columns, whole images or bands of rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = rng.standard_normal((c_out, c_in, 2, 2)).astype(dtype)
    kernel, calls = im2col.im2col_2x2_stride2, []
    with forced(path), pytest.MonkeyPatch.context() as patch:
        patch.setattr(im2col, "im2col_2x2_stride2", _Spy(kernel, calls))
        check_conv(x, weight, ConvGeometry((2, 2), (0, 0, 0, 0)), dtype)
    assert calls


def test_conv2d_accepts_non_contiguous_input():
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 6))
    weight = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    view = x.transpose(1, 0, 2, 3)  # (2, 3, 5, 6) with strides of another layout
    assert_close(NUMBA.conv2d(view, weight, geometry), NUMPY.conv2d(view, weight, geometry),
                 np.float64)


@given(case=pool_cases(Limit(batch=3, channels=3, side=9)), dtype=DTYPES)
def test_max_pool_forward_argmax_and_backward_match_numpy(case, dtype):
    geometry = case.geometry
    # Few distinct values, so windows often hold ties (the first maximum must win).
    x = np.random.default_rng(case.seed).integers(-2, 3, size=case.x_shape).astype(dtype)
    y, argmax = NUMBA.max_pool2d(x, geometry)
    y_ref, argmax_ref = NUMPY.max_pool2d(x, geometry)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)
    dy = np.random.default_rng(2).standard_normal(y.shape).astype(x.dtype)
    assert_close(NUMBA.max_pool2d_backward(dy, argmax, x.shape),
                 NUMPY.max_pool2d_backward(dy, argmax_ref, x.shape), x.dtype)


@given(dtype=DTYPES, n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(2, 9),
       w=st.integers(2, 9), nans=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_max_pool_2x2_stride_2_matches_numpy(dtype, n, c, h, w, nans, seed):
    """The U-Net's pooling has a kernel of its own: ties, NaNs and odd sizes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, c, h, w)).astype(dtype)
    x.flat[rng.integers(0, x.size, size=nans)] = np.nan
    geometry = PoolGeometry((2, 2), (2, 2))
    y, argmax = NUMBA.max_pool2d(x, geometry)
    y_ref, argmax_ref = NUMPY.max_pool2d(x, geometry)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)


def test_max_pool_treats_nan_as_the_maximum_like_numpy():
    x = np.array([[[[1.0, np.nan], [np.nan, 3.0]]]])
    y, argmax = NUMBA.max_pool2d(x, PoolGeometry((2, 2), (2, 2)))
    y_ref, argmax_ref = NUMPY.max_pool2d(x, PoolGeometry((2, 2), (2, 2)))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(argmax, argmax_ref)


@given(dtype=DTYPES, shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_elementwise_kernels_match_numpy(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 20).astype(dtype)
    x.flat[0] = 0  # the kink of ReLU
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(NUMBA.relu(x), NUMPY.relu(x))
    y = NUMPY.relu(x)
    np.testing.assert_array_equal(NUMBA.relu_backward(dy, y), NUMPY.relu_backward(dy, y))
    assert_close(NUMBA.sigmoid(x), NUMPY.sigmoid(x), dtype)


@given(dtype=DTYPES, shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       seed=st.integers(0, 2**16), piece=st.integers(1, 40))
def test_one_channel_overlap_loss_kernels_match_numpy(dtype, shape, seed, piece):
    """The Dice/IoU passes: sigmoid with the three sums per sample, and the gradient
    (its rows cut in pieces of a few elements, so a row spans several steps)."""
    shape[1] = 1
    n = shape[0]
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * 10).astype(dtype)
    t = rng.uniform(0, 1, shape).astype(dtype)
    ours, reference = NUMBA.sigmoid_overlap_sums(z, t), NUMPY.sigmoid_overlap_sums(z, t)
    for a, b in zip(ours, reference, strict=True):
        assert_close(a, b, dtype)
    kept = (n,) + (1,) * (len(shape) - 1)
    slope, offset = (rng.standard_normal(kept).astype(dtype) for _ in range(2))
    p = reference[0]
    # Same expression, same order per element: bit-for-bit the same.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_elementwise, "OVERLAP_BACKWARD_PIECE", piece)
        ours = NUMBA.sigmoid_overlap_backward(p, t, slope, offset)
    np.testing.assert_array_equal(ours, NUMPY.sigmoid_overlap_backward(p, t, slope, offset))


@given(dtype=DTYPES, n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6),
       w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_bias_add_and_its_gradient_match_numpy(dtype, n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((n, c, h, w)).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype)
    np.testing.assert_array_equal(NUMBA.add_bias(dy.copy(), bias), NUMPY.add_bias(dy.copy(), bias))
    assert_close(NUMBA.bias_grad(dy), NUMPY.bias_grad(dy), dtype)


@given(dtype=DTYPES, n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6),
       w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_fused_relu_backward_and_bias_gradient_match_numpy(dtype, n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((n, c, h, w)).astype(dtype)
    y = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(dtype)
    dz, db = NUMBA.relu_backward_bias_grad(dy, y)
    dz_ref, db_ref = NUMPY.relu_backward_bias_grad(dy, y)
    np.testing.assert_array_equal(dz, dz_ref)
    assert_close(db, db_ref, dtype)


@pytest.mark.parametrize("path", ["direct 3x3 kernels", "row shift", "im2col on bands of rows",
                                  "Winograd F(2x2, 3x3)"])
def test_relu_keeps_nan_like_numpy(path):
    x = np.array([np.nan, -1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(NUMBA.relu(x), NUMPY.relu(x))
    # The fused conv + bias + ReLU too: a NaN input reaches its 3x3 neighbourhood.
    image = np.ones((1, 4, 4, 8), dtype=np.float32)
    image[0, 0, 1, 3] = np.nan
    weight = -np.ones((4, 4, 3, 3), dtype=np.float32)
    bias, geometry = np.zeros(4, dtype=np.float32), ConvGeometry((1, 1), (1, 1, 1, 1))
    with forced(path):
        fused = NUMBA.conv2d_bias_relu(image, weight, bias, geometry)
    np.testing.assert_array_equal(fused, NUMPY.conv2d_bias_relu(image, weight, bias, geometry))
    assert np.isnan(fused).sum() == 4 * 9 and (fused[~np.isnan(fused)] == 0).all()


def test_winograd_4x4_spreads_a_nan_over_its_tiles():
    """F(4x4, 3x3)'s transforms add values whose coefficients cancel only in exact
    arithmetic, so a NaN input reaches outputs of the 4x4 tiles whose 6x6 input tiles
    hold it beyond its 3x3 neighbourhood (documented in docs/backend-numba.md); every output
    outside those tiles is as numpy's."""
    image = np.ones((1, 4, 8, 8), dtype=np.float32)
    image[0, 0, 1, 3] = np.nan
    weight = -np.ones((4, 4, 3, 3), dtype=np.float32)
    bias, geometry = np.zeros(4, dtype=np.float32), ConvGeometry((1, 1), (1, 1, 1, 1))
    with forced("Winograd F(4x4, 3x3)"):
        fused = NUMBA.conv2d_bias_relu(image, weight, bias, geometry)
    expected = NUMPY.conv2d_bias_relu(image, weight, bias, geometry)
    # Padded input row 2, column 4 lies in the tiles starting at rows 0 and columns 0, 4.
    tiles = np.zeros((8, 8), dtype=bool)
    tiles[0:4, 0:8] = True
    assert (np.isnan(fused) >= np.isnan(expected)).all()
    assert np.isnan(fused).sum() > np.isnan(expected).sum() == 4 * 9
    assert not np.isnan(fused[:, :, ~tiles]).any()
    np.testing.assert_array_equal(fused[:, :, ~tiles], expected[:, :, ~tiles])


def train_tiny_unet(backend, make_optimizer, steps=4):
    """Losses and final weights of a few training steps of a tiny U-Net on ``backend``."""
    import tinyunet as tu
    import tinyunet.functional as F
    from tinyunet import nn

    tu.manual_seed(0)
    model = nn.UNet(in_channels=1, num_classes=1, depth=2, base_channels=4).to(backend)
    optimizer = make_optimizer(model.parameters())
    rng = np.random.default_rng(0)
    mask = (rng.random((2, 1, 16, 16)) > 0.6).astype(np.float32)
    image = (mask + 0.3 * rng.standard_normal(mask.shape)).astype(np.float32)
    x, target = tu.tensor(image, backend=backend), tu.tensor(mask, backend=backend)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.bce_dice_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def sgd_momentum(params):
    from tinyunet import optim

    return optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def adam(params):
    from tinyunet import optim

    return optim.Adam(params, lr=1e-2)


OPTIMIZERS = {"sgd-momentum": sgd_momentum, "adam": adam}


@pytest.mark.parametrize("path", ["default", "Winograd F(4x4, 3x3)"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_training_on_numba_matches_numpy_step_by_step(optimizer, path):
    """Same seed, same data: every step's loss and the final weights agree up to float32
    rounding (the backends sum GEMM products in different orders), also with every 3x3
    conv the tiny U-Net has (16x16, 8x8 and 4x4 maps) forced through Winograd.

    Winograd with Adam is held to the losses only: Adam divides each gradient by its
    own running magnitude, so a gradient element within rounding of zero moves its
    weight by about +-lr either way, and F(4x4)'s rounding (a few 1e-6 of the largest
    gradient) flips such signs (measured: 8-14 of a layer's weights 1e-3 to 9e-3 apart
    after 4 steps, losses within 2e-6)."""
    with forced(path):
        losses_numba, weights_numba = train_tiny_unet("numba", OPTIMIZERS[optimizer])
    losses_numpy, weights_numpy = train_tiny_unet("numpy", OPTIMIZERS[optimizer])
    assert losses_numba[-1] < losses_numba[0]  # it trains at all
    np.testing.assert_allclose(losses_numba, losses_numpy, rtol=1e-4)
    if path != "default" and optimizer == "adam":
        return
    assert weights_numba.keys() == weights_numpy.keys()
    for name, value in weights_numpy.items():
        np.testing.assert_allclose(weights_numba[name], value, rtol=1e-3, atol=1e-5,
                                   err_msg=name)


@st.composite
def optimizer_state(draw):
    """Parameters, gradients and two state arrays per parameter, of a few shapes and
    dtypes (float32 and float64 mixed: each dtype is one kernel call). Up to 18
    parameters: the gradients' tuple is padded to a multiple of GRADIENT_TUPLE_STEP."""
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=4),
                           min_size=1, max_size=numba_optim.GRADIENT_TUPLE_STEP + 2))
    kinds = [(shape, draw(DTYPES)) for shape in shapes]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = [[rng.standard_normal(shape).astype(dtype) for shape, dtype in kinds]
              for _ in range(4)]
    arrays[3] = [np.abs(a) for a in arrays[3]]  # Adam's second moment is non-negative
    return arrays


def copies(arrays):
    return [[a.copy() for a in group] for group in arrays]


# Pieces of a few elements, so the kernels' parallel steps split the arrays.
UPDATE_PIECES = st.integers(1, 9)


@given(state=optimizer_state(), momentum=st.sampled_from([0.0, 0.9]),
       dampening=st.sampled_from([0.0, 0.1]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 1e-2]), first_step=st.booleans(),
       piece=UPDATE_PIECES)
def test_sgd_update_matches_numpy(state, momentum, dampening, nesterov, weight_decay,
                                  first_step, piece):
    nesterov = nesterov and momentum > 0 and dampening == 0
    ours, reference = copies(state), copies(state)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_optim, "UPDATE_PIECE", piece)
        for backend, (params, grads, buffers, _) in ((NUMBA, ours), (NUMPY, reference)):
            # Without momentum the optimizer passes the gradients as the buffers.
            buffers = buffers if momentum else grads
            backend.sgd_update(params, grads, buffers, 0.1, momentum, dampening, nesterov,
                               weight_decay, first_step)
    # Same operations in the same order per element: bit-for-bit the same result.
    for group, group_ref in zip(ours, reference, strict=True):
        for a, b in zip(group, group_ref, strict=True):
            np.testing.assert_array_equal(a, b)


@given(state=optimizer_state(), step=st.integers(1, 5), weight_decay=st.sampled_from([0.0, 0.1]),
       decoupled=st.booleans(), piece=UPDATE_PIECES)
def test_adam_update_matches_numpy(state, step, weight_decay, decoupled, piece):
    ours, reference = copies(state), copies(state)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numba_optim, "UPDATE_PIECE", piece)
        for backend, (params, grads, m, v) in ((NUMBA, ours), (NUMPY, reference)):
            backend.adam_update(params, grads, m, v, step, 1e-2, 0.9, 0.999, 1e-8,
                                weight_decay, decoupled)
    # Same operations in the same order per element: bit-for-bit the same result.
    for group, group_ref in zip(ours, reference, strict=True):
        for a, b in zip(group, group_ref, strict=True):
            np.testing.assert_array_equal(a, b)


def test_default_backend_is_numba_and_falls_back_to_numpy_with_a_notice():
    import subprocess
    import sys

    show_default = "import tinyunet as tu; print(tu.get_backend().name)"
    with_numba = subprocess.run([sys.executable, "-c", show_default], capture_output=True,
                                text=True, check=True)
    assert with_numba.stdout.strip() == "numba"
    assert with_numba.stderr == ""
    # sys.modules[name] = None makes the import machinery treat numba as absent.
    without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['numba'] = None; "
                              + show_default], capture_output=True, text=True, check=True)
    assert without.stdout.strip() == "numpy"
    notice = without.stderr.strip().splitlines()
    assert len(notice) == 1 and "numba" in notice[0] and "numpy" in notice[0]


def test_an_optimizer_step_is_one_kernel_call_and_follows_new_arrays(monkeypatch):
    """Every parameter in one call; the backend keeps its lists of parameters across
    steps, so a parameter whose array is replaced (a loaded checkpoint) must be seen."""
    calls = []
    kernel = optim.sgd_update
    spy = lambda *args: (calls.append(len(args[0])), kernel(*args))  # noqa: E731
    spy.serial = lambda *args: (calls.append(len(args[0])), kernel.serial(*args))
    monkeypatch.setattr(optim, "sgd_update", spy)
    backend = NumbaBackend()
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in [(4, 3, 3, 3), (4,)]]
    buffers = [np.zeros_like(p) for p in params]
    for step in range(3):
        if step == 2:
            params[1] = params[1].copy()
        grads = [np.ones_like(p) for p in params]
        before = [p.copy() for p in params]
        backend.sgd_update(params, grads, buffers, 0.5, 0.0, 0.0, False, 0.0, False)
        for p, old in zip(params, before, strict=True):
            np.testing.assert_array_equal(p, old - np.float32(0.5))
    assert calls == [2, 2, 2]


@pytest.mark.parametrize("update", ["sgd", "adam"])
def test_a_read_only_gradient_is_taken(update):
    """A gradient the user set from read-only memory (np.load with mmap_mode='r', say):
    the gradients' tuple holds one array type, so such a gradient is copied first."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in [(3,), (2, 2), (4,)]]
    grads = [np.full(p.shape, 0.5, np.float32) for p in params]
    grads[1].flags.writeable = False
    results = []
    for backend in (NUMBA, NUMPY):
        ours = [p.copy() for p in params]
        state = [np.zeros_like(p) for p in params]
        if update == "sgd":
            backend.sgd_update(ours, grads, state, 0.1, 0.9, 0.0, False, 0.0, True)
        else:
            backend.adam_update(ours, grads, state, [np.zeros_like(p) for p in params], 1, 0.1,
                                0.9, 0.999, 1e-8, 0.0, False)
        results.append(ours)
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_gradient_of_another_dtype_is_cast_to_its_parameters():
    """One array type a call: a float64 gradient of a float32 parameter is cast first
    (numpy's in-place update casts its result the same way)."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(2)]
    grads = [rng.standard_normal((3, 4)), rng.standard_normal((3, 4)).astype(np.float32)]
    ours, reference = [p.copy() for p in params], [p.copy() for p in params]
    NUMBA.sgd_update(ours, grads, grads, 0.1, 0.0, 0.0, False, 0.0, False)
    NUMPY.sgd_update(reference, grads, grads, 0.1, 0.0, 0.0, False, 0.0, False)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("path", ["Winograd F(2x2, 3x3)", "Winograd F(4x4, 3x3)"])
def test_an_empty_batch_gives_zero_weight_gradients(path):
    """No images: no Winograd bands, and a gradient of zeros (not an unfilled array).
    (numpy's reference reshapes with -1, which an empty batch does not allow.)"""
    x, dy = np.zeros((0, 4, 8, 8), np.float32), np.zeros((0, 4, 8, 8), np.float32)
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    with forced(path):
        dw = NUMBA.conv2d_grad_weight(dy, x, geometry, (3, 3))
    np.testing.assert_array_equal(dw, np.zeros((4, 4, 3, 3), np.float32))
