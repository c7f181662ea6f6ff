"""2-D max-pooling.

Shapes: x (N, C, H, W) -> y (N, C, Ho, Wo), with PyTorch's rule (ceil_mode=False, so
odd sizes round down): Ho = floor((H + 2*padding - dilation*(k-1) - 1) / stride) + 1.

The forward keeps, per output, the flat index h*W + w of the input that won. The
backward sends each output's gradient to exactly that one input. Ties go to the first
maximum in row-major order within the window (as PyTorch's CPU kernel does). Padding
counts as -inf, so it never wins. A window that sees only padding (possible only when
the dilation is larger than the input) is rejected, where PyTorch would return -inf.
"""

from __future__ import annotations

from ..autograd import Function, Tensor
from ..backends import PoolGeometry
from ..errors import check, fail
from .conv import pair


class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, geometry):
        ctx.save_for_backward(None, x.shape, geometry)
        if x.size == 0:  # a batch of no images never reaches a backend's kernels
            return ctx.backend.xp.zeros((*x.shape[:2], *geometry.output_hw(x.shape[2:])),
                                        dtype=x.dtype)
        y, argmax = ctx.backend.max_pool2d(x, geometry)
        ctx.save_for_backward(argmax, x.shape, geometry)
        return y

    @staticmethod
    def backward(ctx, grad):
        argmax, input_shape, geometry = ctx.saved
        if argmax is None:
            return (ctx.backend.xp.zeros(input_shape, dtype=grad.dtype),)
        return (ctx.backend.max_pool2d_backward(grad, argmax, input_shape, geometry),)


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode=False, return_indices=False) -> Tensor:
    """Max-pool, as ``torch.nn.functional.max_pool2d`` (``stride`` defaults to the kernel)."""
    op = "max_pool2d"
    if input.ndim != 4:
        fail(op, "input of rank 4 (N, C, H, W)", f"shape {input.shape}")
    check(not ceil_mode, op, "ceil_mode=False (ceil_mode is not implemented)", "ceil_mode=True")
    check(not return_indices, op, "return_indices=False", "return_indices=True")
    kernel = pair(kernel_size, "kernel_size", op)
    stride = kernel if stride is None else pair(stride, "stride", op)
    padding, dilation = pair(padding, "padding", op), pair(dilation, "dilation", op)
    for name, values in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if not all(v >= 1 for v in values):
            fail(op, f"{name} of 1 or more", f"{name} {values}")
    if not all(0 <= p <= k // 2 for p, k in zip(padding, kernel, strict=True)):
        fail(op, f"0 <= padding <= kernel_size // 2 for kernel {kernel}", f"padding {padding}")
    geometry = PoolGeometry(kernel, stride, padding, dilation)
    h, w = input.shape[2:]  # rank 4, checked above
    ho, wo = geometry.output_hw((h, w))
    if ho < 1 or wo < 1:
        fail(op, f"an input of at least the (dilated) window, kernel {kernel}",
             f"input {input.shape} with padding {padding}")
    for axis, axis_name in ((0, "row"), (1, "column")):
        blind = _blind_window(input.shape[2 + axis], (ho, wo)[axis], kernel[axis],
                              stride[axis], padding[axis], dilation[axis])
        if blind is not None:
            fail(op, "every window to hold at least one input pixel",
                 f"the window of output {axis_name} {blind} sees only padding (input "
                 f"{input.shape}, kernel {kernel}, padding {padding}, dilation {dilation})")
    return MaxPool2d.apply(input, geometry=geometry)


def _blind_window(size, out_size, kernel, stride, padding, dilation):
    """The first output position along one axis whose dilated taps all miss the input.

    Only a dilation larger than the input can do this. PyTorch then returns -inf and an
    index outside the input; tinyunet raises instead, so that every output has a winner.
    """
    if dilation == 1:
        # A window is then ``kernel`` consecutive taps: padding <= kernel // 2 < kernel
        # puts its last tap at or after the first pixel, and the output size its first
        # tap at or before the last pixel.
        return None
    for o in range(out_size):
        taps = (o * stride - padding + i * dilation for i in range(kernel))
        if not any(0 <= t < size for t in taps):
            return o
    return None
