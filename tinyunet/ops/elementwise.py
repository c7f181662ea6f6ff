"""Elementwise arithmetic, reductions and reshapes, with numpy broadcasting.

Shapes: any. Binary ops broadcast as numpy does; their backward sums the gradient
back down to each input's own shape (``unbroadcast``).
"""

from __future__ import annotations

import math

import numpy as np

from ..autograd import Function, Tensor, _as_tensor
from ..errors import fail


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched to reach its shape."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1
    )
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def _check_same_dtype(op, a, b):
    if a.dtype != b.dtype:
        fail(op, f"operands of one dtype ({a.dtype})", f"{a.dtype} and {b.dtype}")


def _check_broadcastable(op, a, b):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        fail(op, "shapes that broadcast together", f"{a.shape} and {b.shape}")


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.saved
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return unbroadcast(grad * b, a.shape), unbroadcast(grad * a, b.shape)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        grad_a = grad / b
        return unbroadcast(grad_a, a.shape), unbroadcast(-grad_a * a / b, b.shape)


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return (-grad,)


class Power(Function):
    @staticmethod
    def forward(ctx, a, exponent):
        ctx.save_for_backward(a, exponent)
        return a**exponent

    @staticmethod
    def backward(ctx, grad):
        a, exponent = ctx.saved
        return (grad * exponent * a ** (exponent - 1),)


class Sum(Function):
    @staticmethod
    def forward(ctx, a, dim, keepdim):
        ctx.save_for_backward(a.shape, dim, keepdim)
        return a.sum(axis=dim, keepdims=keepdim)

    @staticmethod
    def backward(ctx, grad):
        shape, dim, keepdim = ctx.saved
        if dim is not None and not keepdim:
            grad = ctx.backend.xp.expand_dims(grad, dim)
        return (ctx.backend.xp.broadcast_to(grad, shape).copy(),)


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.save_for_backward(a.shape)
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        (shape,) = ctx.saved
        return (grad.reshape(shape),)


class Cast(Function):
    @staticmethod
    def forward(ctx, a, dtype):
        ctx.save_for_backward(a.dtype)
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        (dtype,) = ctx.saved
        return (grad.astype(dtype),)


def _binary(function, name, a, b):
    if not isinstance(a, Tensor):
        a = _as_tensor(a, b)
    b = _as_tensor(b, a)
    _check_same_dtype(name, a, b)
    _check_broadcastable(name, a, b)
    return function.apply(a, b)


def add(a, b) -> Tensor:
    return _binary(Add, "add", a, b)


def mul(a, b) -> Tensor:
    return _binary(Mul, "mul", a, b)


def div(a, b) -> Tensor:
    return _binary(Div, "div", a, b)


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


def power(a: Tensor, exponent: float) -> Tensor:
    return Power.apply(a, exponent=exponent)


def _normalise_dim(dim, ndim):
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -ndim <= d < ndim:
            fail("sum", f"dims in [-{ndim}, {ndim})", f"dim {d}")
    return tuple(sorted(d % ndim for d in dims))


def sum(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:  # noqa: A001 - torch's name
    return Sum.apply(a, dim=_normalise_dim(dim, a.ndim), keepdim=keepdim)


def mean(a: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    dims = _normalise_dim(dim, a.ndim)
    count = a.numel() if dims is None else math.prod(a.shape[d] for d in dims)
    return sum(a, dim=dims, keepdim=keepdim) * (1.0 / count)


def reshape(a: Tensor, shape) -> Tensor:
    shape = tuple(int(s) for s in shape)
    known = math.prod(s for s in shape if s != -1)
    fits = (
        shape.count(-1) == 0 and known == a.numel()
        or shape.count(-1) == 1 and known > 0 and a.numel() % known == 0
    )
    if not fits:
        fail("reshape", f"a shape with {a.numel()} elements", f"shape {shape}")
    return Reshape.apply(a, shape=shape)
