"""Bad input gets an error that names the op and reads "Expect: ... Actual: ..."."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyunet as tu
import tinyunet.functional as F
from tinyunet.autograd import Function
from tinyunet.backends import PoolGeometry


def t(*shape, dtype=np.float32, requires_grad=False):
    return tu.tensor(np.ones(shape), dtype=dtype, requires_grad=requires_grad)


CASES = {
    "conv2d wrong rank": (lambda: F.conv2d(t(3, 8, 8), t(4, 3, 3, 3)),
                          ["conv2d", "rank 4", "(3, 8, 8)"]),
    "conv2d channels": (lambda: F.conv2d(t(1, 3, 8, 8), t(4, 2, 3, 3)),
                        ["conv2d", "weight (4, 2, 3, 3)", "input (1, 3, 8, 8)"]),
    "conv2d_relu channels": (lambda: F.conv2d_relu(t(1, 3, 8, 8), t(4, 2, 3, 3)),
                             ["conv2d_relu", "weight (4, 2, 3, 3)", "input (1, 3, 8, 8)"]),
    "conv2d_relu bias": (lambda: F.conv2d_relu(t(1, 2, 8, 8), t(4, 2, 3, 3), t(3)),
                         ["conv2d_relu", "bias of shape (4,)", "(3,)"]),
    "conv2d kernel too large": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 7, 7), padding=1),
                                ["conv2d", "(7, 7)", "padded input (6, 6)"]),
    "conv2d zero stride": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3), stride=0),
                           ["conv2d", "stride of 1 or more", "(0, 0)"]),
    "conv2d negative stride": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3), stride=(1, -2)),
                               ["conv2d", "stride", "(1, -2)"]),
    "conv2d same with stride": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3), stride=2,
                                                 padding="same"), ["conv2d", "'same'"]),
    "conv2d negative padding": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3), padding=(1, -1)),
                                ["conv2d", "padding of 0 or more", "(1, -1)"]),
    "conv2d stride not an int": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3), stride=1.5),
                                 ["conv2d", "stride as an int or a pair of ints", "1.5"]),
    "conv_transpose2d negative padding": (
        lambda: F.conv_transpose2d(t(1, 2, 4, 4), t(2, 3, 2, 2), padding=-1),
        ["conv_transpose2d", "padding of 0 or more", "(-1, -1)"]),
    "conv2d dtype": (lambda: F.conv2d(t(1, 1, 4, 4), t(1, 1, 3, 3, dtype=np.float64)),
                     ["conv2d", "float32", "float64"]),
    "conv2d bias shape": (lambda: F.conv2d(t(1, 1, 4, 4), t(2, 1, 3, 3), t(3)),
                          ["conv2d", "bias of shape (2,)", "(3,)"]),
    "conv_transpose2d channels": (lambda: F.conv_transpose2d(t(1, 3, 4, 4), t(2, 3, 2, 2)),
                                  ["conv_transpose2d", "weight (2, 3, 2, 2)", "(1, 3, 4, 4)"]),
    "conv_transpose2d_concat skip": (
        lambda: F.conv_transpose2d_concat(t(1, 3, 6, 8), t(1, 2, 4, 4), t(2, 3, 2, 2), stride=2),
        ["conv_transpose2d_concat", "skip of shape (1, C_skip, 8, 8)", "skip (1, 3, 6, 8)"]),
    "conv_transpose2d_concat skip dtype": (
        lambda: F.conv_transpose2d_concat(t(1, 3, 8, 8, dtype=np.float64), t(1, 2, 4, 4),
                                          t(2, 3, 2, 2), stride=2),
        ["conv_transpose2d_concat", "skip of dtype float32", "float64"]),
    "conv_transpose2d stride": (lambda: F.conv_transpose2d(t(1, 2, 4, 4), t(2, 3, 2, 2),
                                                           stride=0),
                                ["conv_transpose2d", "stride"]),
    "conv_transpose2d output_padding": (
        lambda: F.conv_transpose2d(t(1, 2, 4, 4), t(2, 3, 2, 2), stride=2, output_padding=2),
        ["conv_transpose2d", "output_padding < stride", "(2, 2)"]),
    "max_pool2d rank": (lambda: F.max_pool2d(t(4, 4), 2), ["max_pool2d", "rank 4", "(4, 4)"]),
    "max_pool2d stride": (lambda: F.max_pool2d(t(1, 1, 4, 4), 2, stride=0),
                          ["max_pool2d", "stride of 1 or more"]),
    "max_pool2d too small": (lambda: F.max_pool2d(t(1, 1, 2, 2), 3),
                             ["max_pool2d", "(1, 1, 2, 2)"]),
    "max_pool2d padding": (lambda: F.max_pool2d(t(1, 1, 4, 4), 2, padding=2),
                           ["max_pool2d", "padding <= kernel_size // 2", "(2, 2)"]),
    "max_pool2d window in padding only": (
        lambda: F.max_pool2d(t(1, 1, 1, 2), 2, stride=1, padding=1, dilation=2),
        ["max_pool2d", "at least one input pixel", "output row 0", "(1, 1, 1, 2)"]),
    "concat shapes": (lambda: F.concat([t(1, 2, 4, 4), t(1, 3, 5, 4)]),
                      ["concat", "(1, 2, 4, 4)", "(1, 3, 5, 4)"]),
    "concat dtype": (lambda: F.concat([t(1, 2, 4, 4), t(1, 2, 4, 4, dtype=np.float64)]),
                     ["concat", "float32", "float64"]),
    "center_crop too big": (lambda: F.center_crop(t(1, 1, 4, 4), (5, 2)),
                            ["center_crop", "(4, 4)", "(5, 2)"]),
    "dice shapes": (lambda: F.dice_loss(t(2, 1, 4, 4), t(2, 1, 4, 5)),
                    ["dice_loss", "(2, 1, 4, 4)", "(2, 1, 4, 5)"]),
    "iou shapes": (lambda: F.iou_loss(t(2, 1, 4, 4), t(3, 1, 4, 4)), ["iou_loss", "(3, 1, 4, 4)"]),
    "bce shapes": (lambda: F.binary_cross_entropy_with_logits(t(2, 1, 4, 4), t(2, 2, 4, 4)),
                   ["binary_cross_entropy_with_logits", "(2, 2, 4, 4)"]),
    "bce dtype": (lambda: F.binary_cross_entropy_with_logits(t(2, 1, 4, 4),
                                                            t(2, 1, 4, 4, dtype=np.float64)),
                  ["binary_cross_entropy_with_logits", "float32", "float64"]),
    "cross_entropy labels": (lambda: F.cross_entropy(t(2, 3, 4, 4), t(2, 4, 4)),
                             ["cross_entropy", "integer label dtype", "float32"]),
    "cross_entropy shapes": (lambda: F.cross_entropy(t(2, 3, 4, 4),
                                                     tu.tensor(np.zeros((2, 4, 5), int))),
                             ["cross_entropy", "(2, 4, 4)", "(2, 4, 5)"]),
    "cross_entropy stray label": (lambda: F.cross_entropy(
        t(1, 3, 2, 2), tu.tensor(np.array([[[0, 3], [-1, -100]]]))),
        ["cross_entropy", "labels in [0, 3)", "[-1, 3]"]),
    "dice ignore_background on one channel": (
        lambda: F.dice_loss(t(2, 1, 4, 4), t(2, 1, 4, 4), ignore_background=True),
        ["dice_loss", "at least 2 channels", "1 channel"]),
    "add shapes": (lambda: t(2, 3) + t(4, 3), ["add", "(2, 3)", "(4, 3)"]),
    "mul dtype": (lambda: t(2, 3) * t(2, 3, dtype=np.float64), ["mul", "float32", "float64"]),
    "reshape size": (lambda: t(2, 3).reshape(4, 2), ["reshape", "6 elements", "(4, 2)"]),
    "backward of non-scalar": (lambda: (t(2, 3, requires_grad=True) * 2).backward(),
                               ["backward", "explicit gradient", "(2, 3)"]),
    "backward gradient shape": (lambda: (t(2, 3, requires_grad=True) * 2).backward(t(3, 2)),
                                ["backward", "(2, 3)", "(3, 2)"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_clear_error(case):
    call, words = CASES[case]
    with pytest.raises(tu.ShapeError) as error:
        call()
    message = str(error.value)
    assert "Expect:" in message and "Actual:" in message
    for word in words:
        assert word in message, (word, message)


def test_backward_through_a_released_graph():
    x = t(2, 3, requires_grad=True)
    hidden = x * 2
    loss = hidden.sum()
    loss.backward()
    for again in (lambda: loss.backward(), lambda: (hidden * 3).sum().backward()):
        with pytest.raises(tu.ShapeError, match="backward: Expect: a graph not yet "
                                                "backpropagated.*Actual: .*released"):
            again()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))  # nothing added


def test_a_backward_that_returns_a_wrong_shape_is_named():
    class Halve(Function):
        @staticmethod
        def forward(ctx, x):
            return x / 2

        @staticmethod
        def backward(ctx, grad):
            return grad[:1]

    with pytest.raises(tu.ShapeError, match=r"Halve.backward: Expect: an input gradient of "
                                            r"shape \(2, 3\)\. Actual: shape \(1, 3\)"):
        Halve.apply(t(2, 3, requires_grad=True)).sum().backward()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 12), kernel=st.integers(1, 5), stride=st.integers(1, 4),
       data=st.data())
def test_no_pooling_window_of_dilation_one_sees_only_padding(size, kernel, stride, data):
    """max_pool2d skips its window-by-window search (_blind_window) for dilation 1 on
    this ground: every window of its output size holds an input pixel."""
    padding = data.draw(st.integers(0, kernel // 2))
    geometry = PoolGeometry((kernel, 1), (stride, 1), (padding, 0), (1, 1))
    outputs = geometry.output_hw((size, 1))[0]
    for o in range(max(outputs, 0)):
        first = o * stride - padding
        assert any(0 <= first + i < size for i in range(kernel)), (o, first)
    if outputs >= 1:
        F.max_pool2d(t(1, 1, size, 1), (kernel, 1), (stride, 1), (padding, 0))


def test_mixed_backends_are_rejected():
    names = tu.available_backends()
    if len(names) < 2:
        pytest.skip("only one backend is available here")
    a = tu.tensor(np.ones(3), backend=names[0])
    b = tu.tensor(np.ones(3), backend=names[1])
    with pytest.raises(tu.ShapeError, match=f"backend '{names[0]}'.*backend '{names[1]}'"):
        a + b


def test_unknown_backend():
    with pytest.raises(ValueError, match="Expect: one of .* Actual: 'tpu'"):
        tu.tensor(np.ones(3), backend="tpu")
