"""Activations: relu, sigmoid, softmax and log_softmax.

Shapes: any; softmax and log_softmax normalise over ``dim`` (default 1, the channels
of an (N, C, H, W) map).
"""

from __future__ import annotations

from ..autograd import Function, Tensor
from ..errors import fail


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        y = ctx.backend.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return (ctx.backend.relu_backward(grad, y),)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        y = ctx.backend.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return (grad * y * (1 - y),)


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = ctx.backend.softmax(x, dim)
        ctx.save_for_backward(y, dim)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, dim = ctx.saved
        # Jacobian-vector product of softmax: y * (g - <g, y>).
        return (y * (grad - (grad * y).sum(axis=dim, keepdims=True)),)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = ctx.backend.log_softmax(x, dim)
        ctx.save_for_backward(y, dim)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, dim = ctx.saved
        return (grad - ctx.backend.xp.exp(y) * grad.sum(axis=dim, keepdims=True),)


def relu(input: Tensor) -> Tensor:
    return ReLU.apply(input)


def sigmoid(input: Tensor) -> Tensor:
    return Sigmoid.apply(input)


def _check_dim(op, input, dim):
    if not -input.ndim <= dim < input.ndim:
        fail(op, f"dim in [-{input.ndim}, {input.ndim})", f"dim {dim} for shape {input.shape}")
    return dim % input.ndim


def softmax(input: Tensor, dim: int = 1) -> Tensor:
    return Softmax.apply(input, dim=_check_dim("softmax", input, dim))


def log_softmax(input: Tensor, dim: int = 1) -> Tensor:
    return LogSoftmax.apply(input, dim=_check_dim("log_softmax", input, dim))
