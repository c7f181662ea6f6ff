"""F.interpolate / nn.Upsample: values, gradients, PyTorch's semantics and errors.

The gradient check (float64, finite differences, every backend) uses the shared helper
in gradcheck.py and the per-backend budgets in strategies.py. Values are checked three
ways: small cases worked out by hand, a per-pixel loop written from PyTorch's documented
source-index rule, and torch.nn.functional.interpolate itself when torch is installed.
"""

import math

import numpy as np
import pytest
from gradcheck import check_gradients
from hypothesis import given
from hypothesis import strategies as st
from strategies import budget, image_shapes, seeds, size_limit

import tinyunet as tu
import tinyunet.functional as F
from tinyunet import nn

# (mode, align_corners) as F.interpolate accepts them.
MODES = st.sampled_from([("nearest", None), ("bilinear", None), ("bilinear", False),
                         ("bilinear", True)])
SCALES = st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3)))


def scale_pair(scale):
    return scale if isinstance(scale, tuple) else (scale, scale)


def test_gradients_match_finite_differences(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), mode=MODES, scale=SCALES, seed=seeds)
    def check(shape, mode, scale, seed):
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: F.interpolate(x, scale, *mode), [rng.standard_normal(shape)],
                        backend, seed)

    check()


def loop_reference(x, scale, mode, align_corners):
    """Per output pixel, from PyTorch's rule for the source index of output index o."""
    n, c, h, w = x.shape
    sh, sw = scale_pair(scale)
    out = np.zeros((n, c, h * sh, w * sw))

    def source(o, size, s):
        """(low, high, weight of high) along one axis."""
        if mode == "nearest":
            return o // s, o // s, 0.0
        if align_corners:
            src = o * (size - 1) / (size * s - 1) if size * s > 1 else 0.0
        else:
            src = max((o + 0.5) / s - 0.5, 0.0)
        low = min(math.floor(src), size - 1)
        return low, min(low + 1, size - 1), src - low

    for i in range(h * sh):
        top, bottom, fy = source(i, h, sh)
        for j in range(w * sw):
            left, right, fx = source(j, w, sw)
            out[:, :, i, j] = ((1 - fy) * (1 - fx) * x[:, :, top, left]
                               + (1 - fy) * fx * x[:, :, top, right]
                               + fy * (1 - fx) * x[:, :, bottom, left]
                               + fy * fx * x[:, :, bottom, right])
    return out


@given(shape=image_shapes(size_limit("numpy")), mode=MODES, scale=SCALES, seed=seeds)
def test_forward_matches_per_pixel_loop(shape, mode, scale, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    ours = F.interpolate(tu.tensor(x, dtype=np.float64, backend="numpy"), scale, *mode)
    np.testing.assert_allclose(ours.numpy(), loop_reference(x, scale, *mode), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("align_corners, expected", [
    # src = (o + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (past the end).
    (False, [0.0, 0.25, 0.75, 1.0]),
    # src = o * (2 - 1) / (4 - 1): the corners line up.
    (True, [0.0, 1 / 3, 2 / 3, 1.0]),
])
def test_bilinear_by_hand(align_corners, expected):
    x = tu.tensor(np.array([0.0, 1.0]).reshape(1, 1, 1, 2), dtype=np.float64)
    y = F.interpolate(x, 2, "bilinear", align_corners).numpy()
    np.testing.assert_allclose(y[0, 0, 0], expected, rtol=1e-15)


def test_nearest_by_hand_and_its_backward_sums_blocks():
    x = tu.tensor(np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2), requires_grad=True)
    y = F.interpolate(x, (2, 3))
    np.testing.assert_array_equal(y.numpy()[0, 0], [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2],
                                                    [3, 3, 3, 4, 4, 4], [3, 3, 3, 4, 4, 4]])
    y.backward(tu.tensor(np.arange(24.0).reshape(1, 1, 4, 6)))
    block_sums = np.arange(24.0).reshape(2, 2, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(x.grad.numpy()[0, 0], block_sums)


def test_float32_stays_float32(backend):
    x = tu.tensor(np.ones((1, 2, 3, 3)), backend=backend)
    for mode, corners in [("nearest", None), ("bilinear", True)]:
        assert F.interpolate(x, 2, mode, corners).dtype == np.float32


@given(shape=image_shapes(size_limit("numpy")), mode=MODES,
       scale=st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))),
       seed=seeds)
def test_matches_torch_forward_and_backward(shape, mode, scale, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), None
    ours = tu.tensor(x, requires_grad=True, dtype=np.float64, backend="numpy")
    theirs = torch.tensor(x, requires_grad=True)
    y = F.interpolate(ours, scale, *mode)
    ty = torch.nn.functional.interpolate(theirs, scale_factor=scale, mode=mode[0],
                                         align_corners=mode[1])
    assert y.shape == tuple(ty.shape)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    y.backward(tu.tensor(dy, dtype=np.float64, backend="numpy"))
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_module_is_the_functional():
    x = tu.tensor(np.random.default_rng(0).standard_normal((2, 3, 4, 5)))
    layer = nn.Upsample(scale_factor=3, mode="bilinear", align_corners=True)
    np.testing.assert_array_equal(layer(x).numpy(),
                                  F.interpolate(x, 3, "bilinear", True).numpy())
    assert layer(x).shape == (2, 3, 12, 15)
    assert "scale_factor=3" in repr(layer)
    assert list(layer.parameters()) == []


@pytest.mark.parametrize("call, words", [
    (lambda x: F.interpolate(x, 1.5), "integer of 1 or more"),
    (lambda x: F.interpolate(x, 0), "integer of 1 or more"),
    (lambda x: F.interpolate(x, (2, 2, 2)), "pair"),
    (lambda x: F.interpolate(x, 2, "bicubic"), "'nearest' or 'bilinear'"),
    (lambda x: F.interpolate(x, 2, "nearest", False), "align_corners only with mode"),
    (lambda x: F.interpolate(x.reshape(3, 4, 5), 2), "rank 4"),
    (lambda x: F.interpolate(tu.tensor(np.ones((1, 1, 2, 2), np.int64)), 2, "bilinear"),
     "floating"),
    (lambda x: nn.Upsample(2, "nearest", align_corners=True), "Upsample: Expect"),
])
def test_errors_name_the_op_and_the_value(call, words):
    x = tu.tensor(np.ones((1, 3, 4, 5)))
    with pytest.raises(tu.ShapeError, match="Expect") as error:
        call(x)
    assert words in str(error.value)
    assert str(error.value).startswith(("interpolate:", "Upsample:"))


def test_integer_input_nearest_keeps_its_dtype():
    labels = tu.tensor(np.array([[0, 2], [1, 3]]).reshape(1, 1, 2, 2))
    y = F.interpolate(labels, 2)
    assert y.dtype == labels.dtype
    np.testing.assert_array_equal(y.numpy()[0, 0], np.kron([[0, 2], [1, 3]], np.ones((2, 2))))
