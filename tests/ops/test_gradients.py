"""Hypothesis gradient checks of every op and loss, on every backend, in float64.

Shapes, channel counts, kernel sizes, strides, paddings, dilations and output paddings
are drawn by the strategies in strategies.py; the check itself (and its tolerance) is
in gradcheck.py. Inputs stay away from kinks: ReLU inputs are at least 0.1 from zero,
max-pool inputs are distinct values 0.05 apart, so the finite differences (step 1e-6)
never cross one.
"""

import numpy as np
import pytest
from gradcheck import check_gradients
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import (
    ConvTransposeCase,
    away_from_zero,
    budget,
    conv_cases,
    conv_transpose_cases,
    distinct_values,
    image_shapes,
    pool_cases,
    seeds,
    size_limit,
)

import tinyunet as tu
import tinyunet.functional as F


def conv_inputs(case):
    """Input, weight and (if the case has one) bias of a conv case, float64."""
    rng = np.random.default_rng(case.seed)
    inputs = [rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)]
    if case.bias:
        inputs.append(rng.standard_normal(case.w_shape[0]))
    return inputs


def test_conv2d(backend):
    @budget(backend)
    @given(case=conv_cases(size_limit(backend)))
    def check(case):
        inputs = conv_inputs(case)
        check_gradients(lambda *t: F.conv2d(*t, stride=case.stride, padding=case.padding,
                                            dilation=case.dilation), inputs, backend, case.seed)

    check()


def test_conv2d_relu(backend):
    """The fused conv + bias + ReLU op; cases whose conv outputs come within 1e-4 of the
    kink are skipped, so the finite differences (which move them by ~1e-6) never cross it."""
    @budget(backend)
    @given(case=conv_cases(size_limit(backend)))
    def check(case):
        inputs = conv_inputs(case)

        def conv(*t, fn=F.conv2d):
            return fn(*t, stride=case.stride, padding=case.padding, dilation=case.dilation)

        with tu.no_grad():
            tensors = [tu.tensor(a, backend=backend) for a in inputs]
            pre_activation = conv(*tensors).numpy()
            fused = conv(*tensors, fn=F.conv2d_relu).numpy()
        assume(np.abs(pre_activation).min() > 1e-4)
        np.testing.assert_allclose(fused, np.maximum(pre_activation, 0), rtol=1e-12,
                                   atol=1e-12)
        check_gradients(lambda *t: conv(*t, fn=F.conv2d_relu), inputs, backend, case.seed)

    check()


def test_conv_transpose2d(backend):
    @budget(backend)
    @given(case=conv_transpose_cases(size_limit(backend)))
    def check(case):
        rng = np.random.default_rng(case.seed)
        inputs = [rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)]
        if case.bias:
            inputs.append(rng.standard_normal(case.w_shape[1]))
        check_gradients(
            lambda *t: F.conv_transpose2d(*t, stride=case.stride, padding=case.padding,
                                          output_padding=case.output_padding,
                                          dilation=case.dilation),
            inputs, backend, case.seed)

    check()


# The U-Net's up-conv (2x2, stride 2, no padding), which the numba backend writes
# straight into the concatenation; random draws seldom hit it.
UP_CONV = ConvTransposeCase(x_shape=(2, 3, 2, 3), w_shape=(3, 2, 2, 2), stride=(2, 2),
                            padding=(0, 0), output_padding=(0, 0), dilation=(1, 1), bias=True,
                            seed=7)


def test_conv_transpose2d_concat(backend):
    """The fused up-conv + concat: its forward is the two ops', and its gradients check."""
    @budget(backend)
    @given(case=conv_transpose_cases(size_limit(backend)), skip_channels=st.integers(1, 3))
    @example(case=UP_CONV, skip_channels=2)
    def check(case, skip_channels):
        rng = np.random.default_rng(case.seed)
        inputs = [rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)]
        if case.bias:
            inputs.append(rng.standard_normal(case.w_shape[1]))
        kwargs = dict(stride=case.stride, padding=case.padding,
                      output_padding=case.output_padding, dilation=case.dilation)
        with tu.no_grad():
            tensors = [tu.tensor(a, dtype=np.float64, backend=backend) for a in inputs]
            up = F.conv_transpose2d(*tensors, **kwargs)
        skip = rng.standard_normal((up.shape[0], skip_channels, *up.shape[2:]))
        with tu.no_grad():
            fused = F.conv_transpose2d_concat(tu.tensor(skip, dtype=np.float64, backend=backend),
                                              *tensors, **kwargs).numpy()
        np.testing.assert_allclose(fused, np.concatenate([skip, up.numpy()], axis=1),
                                   rtol=1e-12, atol=1e-12)
        check_gradients(lambda *t: F.conv_transpose2d_concat(*t, **kwargs), [skip, *inputs],
                        backend, case.seed)

    check()


def test_conv_transpose2d_concat_grads_only_where_needed(backend):
    """With only some inputs requiring gradients, the fused op gives the unfused ops'
    gradients to those and None to the rest (on the U-Net's up-conv geometry)."""
    @settings(max_examples=8)
    @given(needs=st.lists(st.booleans(), min_size=4, max_size=4), bias=st.booleans(),
           seed=seeds)
    def check(needs, bias, seed):
        rng = np.random.default_rng(seed)
        n, _, h, w = UP_CONV.x_shape
        arrays = [rng.standard_normal((n, 2, 2 * h, 2 * w)),
                  rng.standard_normal(UP_CONV.x_shape), rng.standard_normal(UP_CONV.w_shape),
                  rng.standard_normal(UP_CONV.w_shape[1])]
        if not bias:
            arrays, needs = arrays[:3], needs[:3]
        probe = rng.standard_normal((n, 4, 2 * h, 2 * w))

        def grads(fused):
            tensors = [tu.tensor(a, dtype=np.float64, requires_grad=need, backend=backend)
                       for a, need in zip(arrays, needs, strict=True)]
            skip, *up_args = tensors
            if fused:
                out = F.conv_transpose2d_concat(skip, *up_args, stride=2)
            else:
                out = F.concat([skip, F.conv_transpose2d(*up_args, stride=2)], dim=1)
            if out.requires_grad:
                (out * tu.tensor(probe, dtype=np.float64, backend=backend)).sum().backward()
            return [None if t.grad is None else t.grad.numpy() for t in tensors]

        for ours, reference, need in zip(grads(True), grads(False), needs, strict=True):
            assert (ours is None) == (not need)
            if need:
                np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)

    check()


def test_max_pool2d(backend):
    @budget(backend)
    @given(case=pool_cases(size_limit(backend)))
    def check(case):
        rng = np.random.default_rng(case.seed)
        check_gradients(lambda x: F.max_pool2d(x, case.kernel, case.stride, case.padding,
                                               case.dilation),
                        [distinct_values(rng, case.x_shape)], backend, case.seed)

    check()


@pytest.mark.parametrize("name", ["relu", "sigmoid", "neg"])
def test_unary(backend, name):
    ops = {"relu": F.relu, "sigmoid": F.sigmoid, "neg": lambda x: -x}

    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), seed=seeds)
    def check(shape, seed):
        rng = np.random.default_rng(seed)
        check_gradients(ops[name], [away_from_zero(rng, shape)], backend, seed)

    check()


def test_power(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)),
           exponent=st.sampled_from([2, 3, -1, 0.5, 1.5, -2.5]), seed=seeds)
    def check(shape, exponent, seed):
        rng = np.random.default_rng(seed)
        x = away_from_zero(rng, shape, gap=0.5)
        if not float(exponent).is_integer():
            x = np.abs(x)  # a fractional power is real only for positive bases
        check_gradients(lambda t: t**exponent, [x], backend, seed)

    check()


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family(backend, name):
    fn = getattr(F, name)

    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), dim=st.integers(-4, 3), seed=seeds)
    def check(shape, dim, seed):
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: fn(x, dim=dim), [2 * rng.standard_normal(shape)], backend,
                        seed)

    check()


@st.composite
def broadcast_pairs(draw, limit):
    """Two shapes that broadcast: the second drops leading axes and sets some sizes to 1."""
    shape = draw(image_shapes(limit))
    keep = draw(st.integers(0, 4))
    other = tuple(1 if draw(st.booleans()) else s for s in shape[4 - keep:])
    return (shape, other) if draw(st.booleans()) else (other, shape)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
def test_binary_broadcasting(backend, name):
    ops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a / b}

    @budget(backend)
    @given(shapes=broadcast_pairs(size_limit(backend)), seed=seeds)
    def check(shapes, seed):
        rng = np.random.default_rng(seed)
        a, b = rng.standard_normal(shapes[0]), away_from_zero(rng, shapes[1], gap=0.5)
        check_gradients(ops[name], [a, b], backend, seed)

    check()


@pytest.mark.parametrize("name", ["sum", "mean"])
def test_reductions(backend, name):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)),
           dims=st.one_of(st.none(), st.integers(-4, 3),
                          st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
           keepdim=st.booleans(), seed=seeds)
    def check(shape, dims, keepdim, seed):
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: getattr(x, name)(dim=dims, keepdim=keepdim),
                        [rng.standard_normal(shape)], backend, seed)

    check()


def test_reshape(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), seed=seeds)
    def check(shape, seed):
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: x.reshape(shape[0], -1) * 2, [rng.standard_normal(shape)],
                        backend, seed)

    check()


def test_concat(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), dim=st.integers(0, 3),
           sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=seeds)
    def check(shape, dim, sizes, seed):
        rng = np.random.default_rng(seed)
        parts = [rng.standard_normal(shape[:dim] + (size,) + shape[dim + 1:]) for size in sizes]
        check_gradients(lambda *t: F.concat(t, dim=dim), parts, backend, seed)

    check()


def test_center_crop(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), data=st.data(), seed=seeds)
    def check(shape, data, seed):
        size = (data.draw(st.integers(1, shape[2])), data.draw(st.integers(1, shape[3])))
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: F.center_crop(x, size), [rng.standard_normal(shape)],
                        backend, seed)

    check()


def test_pad(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), data=st.data(), seed=seeds)
    def check(shape, data, seed):
        left, right = (data.draw(st.integers(-((shape[3] - 1) // 2), 2)) for _ in range(2))
        top, bottom = (data.draw(st.integers(-((shape[2] - 1) // 2), 2)) for _ in range(2))
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: F.pad(x, (left, right, top, bottom)),
                        [rng.standard_normal(shape)], backend, seed)

    check()


@pytest.mark.parametrize("mode, align_corners", [("nearest", None), ("bilinear", False),
                                                 ("bilinear", True)])
def test_interpolate(backend, mode, align_corners):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), scale=st.integers(1, 3), seed=seeds)
    def check(shape, scale, seed):
        rng = np.random.default_rng(seed)
        check_gradients(lambda x: F.interpolate(x, scale, mode, align_corners),
                        [rng.standard_normal(shape)], backend, seed)

    check()


reductions = st.sampled_from(["mean", "sum", "none"])


def test_binary_cross_entropy_with_logits(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), reduction=reductions,
           weighting=st.sampled_from([None, "per pixel", "per channel"]),
           pos_weighted=st.booleans(), seed=seeds)
    def check(shape, reduction, weighting, pos_weighted, seed):
        rng = np.random.default_rng(seed)
        target = tu.tensor(rng.random(shape), dtype=np.float64, backend=backend)
        weight_shape = {"per pixel": shape, "per channel": (shape[1], 1, 1)}.get(weighting)
        weight = None if weighting is None else rng.random(weight_shape)
        pos_weight = rng.random((shape[1], 1, 1)) + 0.5 if pos_weighted else None
        check_gradients(
            lambda z: F.binary_cross_entropy_with_logits(z, target, weight=weight,
                                                         pos_weight=pos_weight,
                                                         reduction=reduction),
            [3 * rng.standard_normal(shape)], backend, seed)

    check()


def test_cross_entropy(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend), min_channels=2), reduction=reductions,
           weighted=st.booleans(), ignore_index=st.sampled_from([-100, 255, 1]), seed=seeds)
    def check(shape, reduction, weighted, ignore_index, seed):
        rng = np.random.default_rng(seed)
        n, c, h, w = shape
        labels = rng.integers(0, c, (n, h, w))
        # Some pixels carry the ignored label (which may also be a real class), and at
        # least one counts, so that 'mean' is defined.
        labels[0, 0, 0] = ignore_index
        labels.flat[-1] = 0
        weight = rng.random(c) + 0.1 if weighted else None
        target = tu.tensor(labels, backend=backend)
        check_gradients(lambda z: F.cross_entropy(z, target, weight=weight,
                                                  ignore_index=ignore_index,
                                                  reduction=reduction),
                        [2 * rng.standard_normal(shape)], backend, seed)

    check()


@pytest.mark.parametrize("loss", ["dice_loss", "iou_loss"])
def test_soft_overlap_losses(backend, loss):
    fn = getattr(F, loss)

    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), channels=st.integers(1, 4),
           labels=st.booleans(), ignore_background=st.booleans(), reduction=reductions,
           smooth=st.sampled_from([1.0, 1e-3]), seed=seeds)
    def check(shape, channels, labels, ignore_background, reduction, smooth, seed):
        rng = np.random.default_rng(seed)
        n, _, h, w = shape
        shape = (n, channels, h, w)
        if channels == 1:
            target = tu.tensor(rng.random(shape) > 0.5, dtype=np.float64, backend=backend)
        elif labels:
            target = tu.tensor(rng.integers(0, channels, (n, h, w)), backend=backend)
        else:
            one_hot = np.eye(channels)[rng.integers(0, channels, (n, h, w))].transpose(0, 3, 1, 2)
            target = tu.tensor(one_hot, dtype=np.float64, backend=backend)
        ignore = ignore_background and channels >= 2
        check_gradients(lambda z: fn(z, target, smooth=smooth, ignore_background=ignore,
                                     reduction=reduction),
                        [2 * rng.standard_normal(shape)], backend, seed)

    check()


def test_bce_dice_loss(backend):
    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), multiclass=st.booleans(),
           ratio=st.floats(0, 1), seed=seeds)
    def check(shape, multiclass, ratio, seed):
        rng = np.random.default_rng(seed)
        n, c, h, w = shape
        if multiclass:
            shape = (n, max(c, 2), h, w)
            target = tu.tensor(rng.integers(0, shape[1], (n, h, w)), backend=backend)
        else:
            shape = (n, 1, h, w)
            target = tu.tensor(rng.random((n, h, w)) > 0.5, dtype=np.float64, backend=backend)
        check_gradients(lambda z: F.bce_dice_loss(z, target, bce_weight=ratio),
                        [2 * rng.standard_normal(shape)], backend, seed)

    check()
