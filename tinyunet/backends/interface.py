"""The backend interface: the small set of kernels that ops call.

Shape convention: images are (N, C, H, W); conv weights are (C_out, C_in, kH, kW).

A backend supplies an array module ``xp`` (numpy or a numpy-compatible library such
as CuPy) used for simple elementwise work, and the heavy kernels below. Ops and the
autograd only ever call these methods, so a backend may pick any layout or algorithm
(im2col, Winograd, NHWC) as long as the results are the same.

Must supply: conv2d, conv2d_grad_input, conv2d_grad_weight, max_pool2d,
max_pool2d_backward. Everything else has a plain default written with ``xp`` that a
fast backend may override with a fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# An array of the backend's array module ``xp``: numpy.ndarray, or cupy.ndarray on the GPU.
Array = Any


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding (top, bottom, left, right) and dilation of a 2-D convolution."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int] = (1, 1)

    def output_hw(self, input_hw: tuple[int, int], kernel_hw: tuple[int, int]
                  ) -> tuple[int, int]:
        """PyTorch's size rule: floor((H + pads - dilation*(k-1) - 1) / stride) + 1."""
        (h, w), (kh, kw) = input_hw, kernel_hw
        top, bottom, left, right = self.padding
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return (
            (h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (w + left + right - dw * (kw - 1) - 1) // sw + 1,
        )


@dataclass(frozen=True)
class PoolGeometry:
    """Window, stride, symmetric padding and dilation of a 2-D max-pool."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def output_hw(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """PyTorch's size rule with ceil_mode=False (odd sizes round down)."""
        conv = ConvGeometry(self.stride, (self.padding[0],) * 2 + (self.padding[1],) * 2,
                            self.dilation)
        return conv.output_hw(input_hw, self.kernel)


class Backend:
    """Base class of backends. Subclasses set ``name`` and ``xp`` and fill in the kernels."""

    name: str = "abstract"
    xp: Any = None

    # ---- moving data ------------------------------------------------------------
    def asarray(self, host_array: np.ndarray) -> Array:
        """A backend array holding a copy (or view) of a host numpy array."""
        return self.xp.asarray(host_array)

    def to_numpy(self, array: Array) -> np.ndarray:
        return self.xp.asarray(array)

    # ---- convolution --------------------------------------------------------------
    def conv2d(self, x: Array, w: Array, geometry: ConvGeometry) -> Array:
        """y[n, o] = sum over c, i, j of x_padded[n, c, s*oh + d*i, s*ow + d*j] * w[o, c, i, j]."""
        raise NotImplementedError

    def conv2d_grad_input(self, dy: Array, w: Array, geometry: ConvGeometry,
                          input_hw: tuple[int, int]) -> Array:
        """dL/dx of conv2d given dL/dy; this is also the forward of conv_transpose2d."""
        raise NotImplementedError

    def conv_transpose2d_concat(self, skip: Array, x: Array, w: Array, b: Array | None,
                                geometry: ConvGeometry, output_hw: tuple[int, int]) -> Array:
        """concat([skip, conv_transpose2d(x, w) + b], axis=1), b possibly None: a U-Net's
        up-conv joined to its skip. skip: (N, C_skip, Ho, Wo); w: (C_in, C_up, kH, kW).

        This default makes the up-conv and then copies it; a fast backend may write it
        (and its bias) straight into its channels of the joined array instead."""
        up = self.conv2d_grad_input(x, w, geometry, output_hw)
        if b is not None:
            up = self.add_bias(up, b)
        return self.xp.concatenate([skip, up], axis=1)

    def conv2d_grad_weight(self, dy: Array, x: Array, geometry: ConvGeometry,
                           kernel_hw: tuple[int, int]) -> Array:
        """dL/dw of conv2d given dL/dy and the conv's input x."""
        raise NotImplementedError

    def conv2d_grads(self, dy: Array, x: Array, w: Array, geometry: ConvGeometry,
                     need_input: bool = True, need_weight: bool = True
                     ) -> tuple[Array | None, Array | None]:
        """(dL/dx, dL/dw) of conv2d, each None unless needed: the two methods above, whose
        work a backend may share (numba pads dy once for both of its direct kernels)."""
        dx = self.conv2d_grad_input(dy, w, geometry, x.shape[2:]) if need_input else None
        dw = self.conv2d_grad_weight(dy, x, geometry, w.shape[2:]) if need_weight else None
        return dx, dw

    def conv_transpose2d_grads(self, dy: Array, x: Array, w: Array, geometry: ConvGeometry,
                               need_input: bool = True, need_weight: bool = True,
                               need_bias: bool = True
                               ) -> tuple[Array | None, Array | None, Array | None]:
        """(dL/dx, dL/dw, dL/db) of conv_transpose2d(x, w, b) given dL/dy, each None
        unless needed. <conv_t(x, w), g> = <x, conv(g, w)>: dx is conv2d(dy, w), dw a
        conv weight gradient with the roles of input and output gradient swapped, db
        dy's channel sums. A backend may share dy's columns among the three."""
        # In a U-Net dy is a channel slice of a concat's gradient (not contiguous): one
        # copy here rather than in each of the three.
        dy = self.xp.ascontiguousarray(dy)
        dx = self.conv2d(dy, w, geometry) if need_input else None
        dw = self.conv2d_grad_weight(x, dy, geometry, w.shape[2:]) if need_weight else None
        db = self.bias_grad(dy) if need_bias else None
        return dx, dw, db

    # ---- pooling ------------------------------------------------------------------
    def max_pool2d(self, x: Array, geometry: PoolGeometry) -> tuple[Array, Array]:
        """(y, argmax): argmax holds, per output, the flat index h*W + w of its winner."""
        raise NotImplementedError

    def max_pool2d_backward(self, dy: Array, argmax: Array, input_shape: tuple[int, ...],
                            geometry: PoolGeometry) -> Array:
        """Route each output gradient to its winner; overlapping windows add up.

        ``geometry`` lets a gather kernel find the windows that cover an input pixel.
        """
        raise NotImplementedError

    # ---- elementwise defaults -------------------------------------------------------
    def relu(self, x: Array) -> Array:
        return self.xp.maximum(x, 0)

    def relu_backward(self, dy: Array, y: Array) -> Array:
        """Gradient through ReLU given its output: passes where y > 0 (zero at the kink)."""
        return dy * (y > 0)

    def sigmoid(self, x: Array) -> Array:
        # Two branches keep exp's argument non-positive, so no overflow for large |x|.
        xp = self.xp
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def log_softmax(self, x: Array, axis: int) -> Array:
        xp = self.xp
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def softmax(self, x: Array, axis: int) -> Array:
        return self.xp.exp(self.log_softmax(x, axis))

    def add_bias(self, y: Array, bias: Array) -> Array:
        """y + bias[c] on (N, C, H, W); may work in place, since y is a fresh conv output."""
        y += bias.reshape(1, -1, 1, 1)
        return y

    def conv2d_bias_relu(self, x: Array, w: Array, b: Array | None,
                         geometry: ConvGeometry) -> Array:
        """relu(conv2d(x, w) + b[o]), b possibly None: a conv layer and its ReLU.

        A fast backend applies bias and ReLU in one in-place pass, instead of two more
        passes and a new array."""
        y = self.conv2d(x, w, geometry)
        return self.relu(y if b is None else self.add_bias(y, b))

    def relu_backward_bias_grad(self, dy: Array, y: Array) -> tuple[Array, Array]:
        """(dz, db): dy through the ReLU whose output is y, and dz's channel sums."""
        dz = self.relu_backward(dy, y)
        return dz, self.bias_grad(dz)

    def sigmoid_overlap_sums(self, z: Array, t: Array) -> tuple[Array, Array, Array, Array]:
        """(p, sum p*t, sum p, sum t): p = sigmoid(z) and its sums over every axis but the
        first (one value per sample, dims kept): the forward of a one-channel Dice or IoU.
        The sums are in p's dtype here; a backend may accumulate in float64, which can
        change their last bits."""
        p = self.sigmoid(z)
        return (p, *self.overlap_sums(p, t, 1))

    def sigmoid_overlap_backward(self, p: Array, t: Array, slope: Array, offset: Array
                                 ) -> Array:
        """dz = (slope * t + offset) * p * (1 - p), slope and offset one value per sample
        (N, 1, ..., 1): a one-channel Dice or IoU's gradient back through the sigmoid."""
        return (slope * t + offset) * p * (1 - p)

    def overlap_sums(self, p: Array, t: Array, first_axis: int
                     ) -> tuple[Array, Array, Array]:
        """(sum p*t, sum p, sum t) over the axes from ``first_axis`` on, dims kept (Dice, IoU)."""
        axes = tuple(range(first_axis, p.ndim))
        return ((p * t).sum(axis=axes, keepdims=True), p.sum(axis=axes, keepdims=True),
                t.sum(axis=axes, keepdims=True))

    def bias_grad(self, dy: Array) -> Array:
        """Sum of an (N, C, H, W) gradient over everything but C."""
        return dy.sum(axis=(0, 2, 3))

    # ---- optimizer updates (in place, over lists of raw arrays) ------------------------
    def sgd_update(self, params: Sequence[Array], grads: Sequence[Array],
                   buffers: Sequence[Array], lr: float, momentum: float, dampening: float,
                   nesterov: bool, weight_decay: float, first_step: bool) -> None:
        """PyTorch's SGD step, in place on every ``params[i]`` (and ``buffers[i]``).

        params, grads, buffers: equal-length lists of arrays, ``buffers[i]`` shaped like
        ``params[i]``. Per parameter: g = grad + weight_decay * param; with momentum,
        buffer = g when ``first_step`` (the buffer's first use), else
        buffer = momentum * buffer + (1 - dampening) * g, and g becomes
        g + momentum * buffer (``nesterov``) or buffer; then param -= lr * g.
        With momentum 0 the buffers are neither read nor written. grads are not modified.
        """
        for param, grad, buffer in zip(params, grads, buffers, strict=True):
            step = grad + weight_decay * param if weight_decay else grad
            if momentum:
                if first_step:
                    buffer[...] = step
                else:
                    buffer *= momentum
                    buffer += (1 - dampening) * step
                step = step + momentum * buffer if nesterov else buffer
            param -= lr * step

    def adam_update(self, params: Sequence[Array], grads: Sequence[Array],
                    exp_avgs: Sequence[Array], exp_avg_sqs: Sequence[Array], step: int,
                    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decoupled: bool) -> None:
        """PyTorch's Adam (L2 decay) or AdamW (``decoupled``) step, in place.

        params, grads, exp_avgs (m), exp_avg_sqs (v): equal-length lists of arrays of
        matching shapes; ``step`` (t) counts this update from 1, for every parameter in
        the call. Per parameter: AdamW scales param by 1 - lr * weight_decay, Adam adds
        weight_decay * param to g; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
        param -= lr / (1 - b1**t) * m / (sqrt(v / (1 - b2**t)) + eps). grads are not
        modified.
        """
        xp = self.xp
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        for param, grad, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
            if decoupled:
                param *= 1 - lr * weight_decay
            elif weight_decay:
                grad = grad + weight_decay * param
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            param -= (lr / bias1) * m / (xp.sqrt(v / bias2) + eps)
