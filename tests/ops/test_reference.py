"""Forward results against direct loop definitions, the adjoint identity, and dtypes.

The loop definitions below are written from the textbook formulas, independently of
the im2col code: conv as a sum over (c, i, j) per output pixel, the transposed conv
as a scatter of every input pixel through the kernel, max-pool as a scan of each
window keeping the first maximum. Relative error at most 1e-5 in float32.
"""

import numpy as np
from hypothesis import assume, given
from strategies import (
    budget,
    conv_cases,
    conv_transpose_cases,
    distinct_values,
    pool_cases,
    size_limit,
)

import tinyunet as tu
import tinyunet.functional as F


def resolve_padding(case):
    kh, kw = case.w_shape[2:]
    if case.padding == "valid":
        return 0, 0, 0, 0
    if case.padding == "same":
        th, tw = case.dilation[0] * (kh - 1), case.dilation[1] * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = case.padding
    return ph, ph, pw, pw


def conv2d_loops(x, w, b, stride, pads, dilation):
    n_, c_, h_, w_ = x.shape
    o_, _, kh, kw = w.shape
    top, bottom, left, right = pads
    ho = (h_ + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w_ + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n_, o_, ho, wo))
    for n in range(n_):
        for o in range(o_):
            for oh in range(ho):
                for ow in range(wo):
                    total = 0.0 if b is None else b[o]
                    for c in range(c_):
                        for i in range(kh):
                            for j in range(kw):
                                h = oh * stride[0] - top + i * dilation[0]
                                ww = ow * stride[1] - left + j * dilation[1]
                                if 0 <= h < h_ and 0 <= ww < w_:
                                    total += x[n, c, h, ww] * w[o, c, i, j]
                    y[n, o, oh, ow] = total
    return y


def conv_transpose2d_loops(x, w, b, stride, padding, output_padding, dilation):
    n_, c_, h_, w_ = x.shape
    _, o_, kh, kw = w.shape
    full_h = (h_ - 1) * stride[0] + dilation[0] * (kh - 1) + 1 + output_padding[0]
    full_w = (w_ - 1) * stride[1] + dilation[1] * (kw - 1) + 1 + output_padding[1]
    y = np.zeros((n_, o_, full_h, full_w))
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for ww in range(w_):
                    for i in range(kh):
                        for j in range(kw):
                            y[n, :, h * stride[0] + i * dilation[0],
                              ww * stride[1] + j * dilation[1]] += x[n, c, h, ww] * w[c, :, i, j]
    y = y[:, :, padding[0]: full_h - padding[0], padding[1]: full_w - padding[1]]
    return y if b is None else y + b[None, :, None, None]


def max_pool2d_loops(x, kernel, stride, padding, dilation):
    n_, c_, h_, w_ = x.shape
    ho = (h_ + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w_ + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    y = np.zeros((n_, c_, ho, wo))
    winner = np.zeros((n_, c_, ho, wo), dtype=np.int64)
    for n in range(n_):
        for c in range(c_):
            for oh in range(ho):
                for ow in range(wo):
                    best, where = -np.inf, -1
                    for i in range(kernel[0]):
                        for j in range(kernel[1]):
                            h = oh * stride[0] - padding[0] + i * dilation[0]
                            ww = ow * stride[1] - padding[1] + j * dilation[1]
                            if 0 <= h < h_ and 0 <= ww < w_ and x[n, c, h, ww] > best:
                                best, where = x[n, c, h, ww], h * w_ + ww
                    y[n, c, oh, ow], winner[n, c, oh, ow] = best, where
    return y, winner


def assert_close32(actual, expected):
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    assert np.abs(actual - expected).max(initial=0) <= 1e-5 * scale


def test_conv2d_matches_loops(backend):
    @budget(backend)
    @given(case=conv_cases(size_limit(backend)))
    def check(case):
        rng = np.random.default_rng(case.seed)
        x, w = rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)
        b = rng.standard_normal(case.w_shape[0]) if case.bias else None
        expected = conv2d_loops(x, w, b, case.stride, resolve_padding(case), case.dilation)
        tensors = [tu.tensor(a, backend=backend) for a in (x, w) + ((b,) if case.bias else ())]
        y = F.conv2d(*tensors, stride=case.stride, padding=case.padding, dilation=case.dilation)
        assert y.shape == expected.shape
        assert_close32(y.numpy(), expected)

    check()


def test_conv_transpose2d_matches_scatter_loops(backend):
    @budget(backend)
    @given(case=conv_transpose_cases(size_limit(backend)))
    def check(case):
        rng = np.random.default_rng(case.seed)
        x, w = rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)
        b = rng.standard_normal(case.w_shape[1]) if case.bias else None
        expected = conv_transpose2d_loops(x, w, b, case.stride, case.padding,
                                          case.output_padding, case.dilation)
        tensors = [tu.tensor(a, backend=backend) for a in (x, w) + ((b,) if case.bias else ())]
        y = F.conv_transpose2d(*tensors, stride=case.stride, padding=case.padding,
                               output_padding=case.output_padding, dilation=case.dilation)
        assert y.shape == expected.shape
        assert_close32(y.numpy(), expected)

    check()


def test_max_pool2d_matches_loops_and_keeps_first_maximum(backend):
    @budget(backend)
    @given(case=pool_cases(size_limit(backend)))
    def check(case):
        rng = np.random.default_rng(case.seed)
        # Half of the examples are small integers, so most windows hold ties.
        x = (rng.integers(0, 3, case.x_shape).astype(np.float64) if case.seed % 2
             else distinct_values(rng, case.x_shape))
        stride = case.stride or case.kernel
        expected, winner = max_pool2d_loops(x, case.kernel, stride, case.padding, case.dilation)
        xt = tu.tensor(x, requires_grad=True, dtype=np.float64, backend=backend)
        y = F.max_pool2d(xt, case.kernel, case.stride, case.padding, case.dilation)
        np.testing.assert_array_equal(y.numpy(), expected)
        # The backward sends each output's gradient to exactly the first winner.
        y.backward(tu.tensor(np.ones(y.shape), dtype=np.float64, backend=backend))
        counts = np.zeros((x.shape[0] * x.shape[1], x.shape[2] * x.shape[3]))
        np.add.at(counts, (np.arange(counts.shape[0])[:, None],
                           winner.reshape(counts.shape[0], -1)), 1)
        np.testing.assert_array_equal(xt.grad.numpy(), counts.reshape(x.shape))

    check()


def test_conv_and_transposed_conv_are_adjoint(backend):
    @budget(backend)
    @given(case=conv_cases(size_limit(backend)))
    def check(case):
        top, bottom, left, right = resolve_padding(case)
        # conv_transpose2d takes symmetric padding only ('same' with an even kernel is not).
        assume(top == bottom and left == right)
        padding = (top, left)
        rng = np.random.default_rng(case.seed)
        x, w = rng.standard_normal(case.x_shape), rng.standard_normal(case.w_shape)
        xt, wt = (tu.tensor(a, dtype=np.float64, backend=backend) for a in (x, w))
        y = F.conv2d(xt, wt, stride=case.stride, padding=case.padding, dilation=case.dilation)
        probe = rng.standard_normal(y.shape)
        # conv_transpose2d must land back on x's size: the rows a strided conv skipped
        # are the output_padding.
        spare = [(size + 2 * p - d * (k - 1) - 1) % s for size, p, d, k, s in zip(
            case.x_shape[2:], padding, case.dilation, case.w_shape[2:], case.stride,
            strict=True)]
        back = F.conv_transpose2d(tu.tensor(probe, dtype=np.float64, backend=backend), wt,
                                  stride=case.stride, padding=padding,
                                  output_padding=tuple(spare), dilation=case.dilation)
        assert back.shape == x.shape
        left = float((y.numpy() * probe).sum())
        right = float((x * back.numpy()).sum())
        assert abs(left - right) <= 1e-10 * (1 + abs(left))

    check()


def test_float32_and_float64_agree(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 8, 8))
    w1, w2 = rng.standard_normal((3, 2, 3, 3)) * 0.3, rng.standard_normal((3, 2, 2, 2)) * 0.3
    target = (rng.random((2, 1, 8, 8)) > 0.5).astype(float)
    w3 = rng.standard_normal((1, 2, 1, 1))

    def run(dtype):
        params = [tu.tensor(a, requires_grad=True, dtype=dtype, backend=backend)
                  for a in (w1, w2, w3)]
        h = F.max_pool2d(F.relu(F.conv2d(tu.tensor(x, dtype=dtype, backend=backend), params[0],
                                         padding=1)), 2)
        h = F.conv_transpose2d(h, params[1], stride=2)
        loss = F.bce_dice_loss(F.conv2d(h, params[2]),
                               tu.tensor(target, dtype=dtype, backend=backend))
        loss.backward()
        return [loss.numpy()] + [p.grad.numpy() for p in params]

    for single, double in zip(run(np.float32), run(np.float64), strict=True):
        assert single.dtype == np.float32
        np.testing.assert_allclose(single, double, rtol=1e-4, atol=1e-5)
