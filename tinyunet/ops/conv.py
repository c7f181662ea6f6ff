"""2-D convolution and transposed convolution.

Shapes (PyTorch's):
    conv2d:            x (N, C_in, H, W), w (C_out, C_in, kH, kW), b (C_out,) -> (N, C_out, Ho, Wo)
                       Ho = floor((H + pad_top + pad_bottom - dilation*(kH-1) - 1) / stride) + 1
    conv2d_relu:       relu(conv2d(...)), the same shapes, fused
    conv_transpose2d:  x (N, C_in, H, W), w (C_in, C_out, kH, kW), b (C_out,) -> (N, C_out, Ho, Wo)
                       Ho = (H-1)*stride - 2*padding + dilation*(kH-1) + output_padding + 1
    conv_transpose2d_concat: skip (N, C_skip, Ho, Wo) and the above -> (N, C_skip + C_out,
                       Ho, Wo), concat([skip, conv_transpose2d(...)], dim=1), fused

conv2d and conv_transpose2d are adjoint: the input gradient of a conv is a transposed
conv with the same weight, and the input gradient of a transposed conv is a conv. So the backend
needs only three kernels (conv2d, conv2d_grad_input, conv2d_grad_weight) for both.
"""

from __future__ import annotations

import numbers

from ..autograd import Function, Tensor
from ..backends import ConvGeometry
from ..errors import fail


def _is_int(value) -> bool:
    """A Python or numpy integer (np.int64(2) too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def pair(value, name, op):
    """An int or a pair of ints (Python or numpy integers) -> a pair of Python ints."""
    if _is_int(value):
        return (int(value), int(value))
    is_pair = isinstance(value, (tuple, list)) and len(value) == 2
    if not (is_pair and all(_is_int(v) for v in value)):
        fail(op, f"{name} as an int or a pair of ints", f"{value!r}")
    return (int(value[0]), int(value[1]))


def _check_conv_inputs(op, x, w, b, weight_in_channels_axis):
    if x.ndim != 4:
        fail(op, "input of rank 4 (N, C, H, W)", f"shape {x.shape}")
    if w.ndim != 4:
        fail(op, "weight of rank 4", f"shape {w.shape}")
    if x.shape[1] != w.shape[weight_in_channels_axis]:
        fail(op, f"input channels equal to weight.shape[{weight_in_channels_axis}] = "
             f"{w.shape[weight_in_channels_axis]} (weight {w.shape})",
             f"input {x.shape} with {x.shape[1]} channels")
    if x.dtype != w.dtype:
        fail(op, f"input and weight of one dtype ({x.dtype})", f"input {x.dtype}, weight {w.dtype}")
    if x.dtype not in CONV_DTYPES:
        fail(op, "input and weight of dtype float32 or float64", f"dtype {x.dtype}")
    out_channels = w.shape[1 - weight_in_channels_axis]
    if x.shape[1] == 0 or out_channels == 0:
        fail(op, "at least one input and one output channel",
             f"input {x.shape}, weight {w.shape}")
    if b is not None and b.shape != (out_channels,):
        fail(op, f"bias of shape ({out_channels},)", f"shape {b.shape}")
    if b is not None and b.dtype != x.dtype:
        fail(op, f"bias of dtype {x.dtype}", f"{b.dtype}")


# The dtypes every backend's conv kernels compute in (the numba kernels have no others).
CONV_DTYPES = ("float32", "float64")


def _check_positive(op, name, values):
    if not all(v >= 1 for v in values):
        fail(op, f"{name} of 1 or more", f"{name} {values}")


def conv_geometry(op, input_hw, kernel_hw, stride, padding, dilation) -> ConvGeometry:
    """Validate conv2d's arguments and resolve ``padding`` to (top, bottom, left, right)."""
    stride, dilation = pair(stride, "stride", op), pair(dilation, "dilation", op)
    _check_positive(op, "stride", stride)
    _check_positive(op, "dilation", dilation)
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":
        if stride != (1, 1):
            fail(op, "stride 1 with padding='same' (as in PyTorch)", f"stride {stride}")
        # PyTorch puts the odd pixel of an even kernel's padding at the bottom/right.
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel_hw, strict=True))
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = pair(padding, "padding", op)
        if ph < 0 or pw < 0:
            fail(op, "padding of 0 or more", f"padding {(ph, pw)}")
        pads = (ph, ph, pw, pw)
    geometry = ConvGeometry(stride, pads, dilation)
    padded = (input_hw[0] + pads[0] + pads[1], input_hw[1] + pads[2] + pads[3])
    reach = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_hw, strict=True))
    if padded[0] < reach[0] or padded[1] < reach[1]:
        fail(op, f"a (dilated) kernel of {reach} that fits in the padded input",
             f"padded input {padded} from input {tuple(input_hw)}")
    return geometry


def _conv_input_and_weight_grads(ctx, grad, x, w, geometry):
    need_x, need_w = ctx.needs_input_grad[:2]
    return ctx.backend.conv2d_grads(grad, x, w, geometry, need_x, need_w)


# A batch of no images (N == 0) never reaches a backend, whose kernels need at least
# one: the output has no images, the input gradient none either, and the weight and
# bias gradients are sums over no images, zeros. This is what PyTorch returns.
def _no_images(ctx, x, channels, output_hw):
    return ctx.backend.xp.zeros((0, channels, *output_hw), dtype=x.dtype)


def _no_images_grads(ctx, x, w, out_channels):
    """(dx, dw, db) of a conv over a batch of no images."""
    xp = ctx.backend.xp
    return (xp.zeros(x.shape, dtype=x.dtype), xp.zeros(w.shape, dtype=w.dtype),
            xp.zeros(out_channels, dtype=x.dtype))


class Conv2d(Function):
    @staticmethod
    def forward(ctx, x, w, b=None, geometry=None):
        ctx.save_for_backward(x, w, geometry, b is not None)
        if x.shape[0] == 0:
            return _no_images(ctx, x, w.shape[0], geometry.output_hw(x.shape[2:], w.shape[2:]))
        y = ctx.backend.conv2d(x, w, geometry)
        return y if b is None else ctx.backend.add_bias(y, b)

    @staticmethod
    def backward(ctx, grad):
        x, w, geometry, has_bias = ctx.saved
        if x.shape[0] == 0:
            dx, dw, db = _no_images_grads(ctx, x, w, w.shape[0])
            return (dx, dw, db) if has_bias else (dx, dw)
        dx, dw = _conv_input_and_weight_grads(ctx, grad, x, w, geometry)
        return (dx, dw, ctx.backend.bias_grad(grad)) if has_bias else (dx, dw)


class Conv2dReLU(Function):
    """relu(conv2d(x, w, b)) as one op, so a backend can apply the bias and the ReLU in
    one pass over the conv's output, and their backward in one pass over the gradient. The
    conv's own output is never stored: the ReLU's output y tells where gradient passes."""

    @staticmethod
    def forward(ctx, x, w, b=None, geometry=None):
        if x.shape[0] == 0:
            y = _no_images(ctx, x, w.shape[0], geometry.output_hw(x.shape[2:], w.shape[2:]))
        else:
            y = ctx.backend.conv2d_bias_relu(x, w, b, geometry)
        ctx.save_for_backward(x, w, geometry, b is not None, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, geometry, has_bias, y = ctx.saved
        if x.shape[0] == 0:
            dx, dw, db = _no_images_grads(ctx, x, w, w.shape[0])
            return (dx, dw, db) if has_bias else (dx, dw)
        if has_bias:
            grad, db = ctx.backend.relu_backward_bias_grad(grad, y)
        else:
            grad = ctx.backend.relu_backward(grad, y)
        dx, dw = _conv_input_and_weight_grads(ctx, grad, x, w, geometry)
        return (dx, dw, db) if has_bias else (dx, dw)


def _conv_transpose_grads(ctx, grad, x, w, geometry, need_x, need_w, need_b):
    """(dx, dw, db) of a transposed conv, None where not needed."""
    if not (need_x or need_w or need_b):
        return None, None, None
    return ctx.backend.conv_transpose2d_grads(grad, x, w, geometry, need_x, need_w, need_b)


class ConvTranspose2d(Function):
    @staticmethod
    def forward(ctx, x, w, b=None, geometry=None, output_hw=None):
        ctx.save_for_backward(x, w, geometry, b is not None)
        if x.shape[0] == 0:
            return _no_images(ctx, x, w.shape[1], output_hw)
        y = ctx.backend.conv2d_grad_input(x, w, geometry, output_hw)
        return y if b is None else ctx.backend.add_bias(y, b)

    @staticmethod
    def backward(ctx, grad):
        x, w, geometry, has_bias = ctx.saved
        if x.shape[0] == 0:
            dx, dw, db = _no_images_grads(ctx, x, w, w.shape[1])
            return (dx, dw, db) if has_bias else (dx, dw)
        need_b = has_bias and ctx.needs_input_grad[2]
        dx, dw, db = _conv_transpose_grads(ctx, grad, x, w, geometry,
                                           *ctx.needs_input_grad[:2], need_b)
        return (dx, dw, db) if has_bias else (dx, dw)


class ConvTranspose2dConcat(Function):
    """concat([skip, conv_transpose2d(x, w, b)], dim=1) as one op, so a backend can write
    the transposed conv straight into its channels of the joined array (the U-Net's up
    step) instead of making it and copying it; the numba backend does for 2x2 stride 2."""

    @staticmethod
    def forward(ctx, skip, x, w, b=None, geometry=None, output_hw=None):
        ctx.save_for_backward(skip.shape[1], x, w, geometry, b is not None)
        if x.shape[0] == 0:
            return _no_images(ctx, x, skip.shape[1] + w.shape[1], output_hw)
        return ctx.backend.conv_transpose2d_concat(skip, x, w, b, geometry, output_hw)

    @staticmethod
    def backward(ctx, grad):
        c_skip, x, w, geometry, has_bias = ctx.saved
        if x.shape[0] == 0:
            dx, dw, db = _no_images_grads(ctx, x, w, w.shape[1])
        else:
            need_b = has_bias and ctx.needs_input_grad[3]
            dx, dw, db = _conv_transpose_grads(ctx, grad[:, c_skip:], x, w, geometry,
                                               *ctx.needs_input_grad[1:3], need_b)
        d_skip = grad[:, :c_skip]
        return (d_skip, dx, dw, db) if has_bias else (d_skip, dx, dw)


def _check_groups(op, groups):
    if groups != 1:
        fail(op, "groups=1 (grouped convs are not implemented)", f"groups={groups}")


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
           dilation=1, groups=1) -> Tensor:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (padding may be 'same'/'valid')."""
    op = "conv2d"
    _check_groups(op, groups)
    _check_conv_inputs(op, input, weight, bias, weight_in_channels_axis=1)
    geometry = conv_geometry(op, input.shape[2:], weight.shape[2:], stride, padding, dilation)
    args = (input, weight) if bias is None else (input, weight, bias)
    return Conv2d.apply(*args, geometry=geometry)


def conv2d_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                padding=0, dilation=1) -> Tensor:
    """``relu(conv2d(input, weight, bias, ...))`` as one fused op (the U-Net's conv layers)."""
    op = "conv2d_relu"
    _check_conv_inputs(op, input, weight, bias, weight_in_channels_axis=1)
    geometry = conv_geometry(op, input.shape[2:], weight.shape[2:], stride, padding, dilation)
    args = (input, weight) if bias is None else (input, weight, bias)
    return Conv2dReLU.apply(*args, geometry=geometry)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1,
                     padding=0, output_padding=0, groups=1, dilation=1) -> Tensor:
    """Transposed conv, as ``torch.nn.functional.conv_transpose2d``.

    ``output_padding`` must be smaller than ``stride`` (PyTorch also allows values
    below ``dilation``; that rare case is not supported and raises).
    """
    geometry, output_hw = _transposed_geometry("conv_transpose2d", input, weight, bias, stride,
                                               padding, output_padding, groups, dilation)
    args = (input, weight) if bias is None else (input, weight, bias)
    return ConvTranspose2d.apply(*args, geometry=geometry, output_hw=output_hw)


def conv_transpose2d_concat(skip: Tensor, input: Tensor, weight: Tensor,
                            bias: Tensor | None = None, stride=1, padding=0, output_padding=0,
                            groups=1, dilation=1) -> Tensor:
    """``concat([skip, conv_transpose2d(input, weight, bias, ...)], dim=1)``, fused.

    skip: (N, C_skip, Ho, Wo), the transposed conv's output size. The U-Net's up step:
    a backend may write the up-conv straight into its channels of the result (numba
    does for 2x2 stride 2).
    """
    op = "conv_transpose2d_concat"
    geometry, output_hw = _transposed_geometry(op, input, weight, bias, stride, padding,
                                               output_padding, groups, dilation)
    (n, (ho, wo)) = input.shape[0], output_hw
    if skip.ndim != 4 or (skip.shape[0], *skip.shape[2:]) != (n, ho, wo):
        fail(op, f"skip of shape ({n}, C_skip, {ho}, {wo}) (the transposed conv's output size)",
             f"skip {skip.shape} with input {input.shape}")
    if skip.dtype != input.dtype:
        fail(op, f"skip of dtype {input.dtype}", f"{skip.dtype}")
    args = (skip, input, weight) if bias is None else (skip, input, weight, bias)
    return ConvTranspose2dConcat.apply(*args, geometry=geometry, output_hw=output_hw)


def _transposed_geometry(op, input, weight, bias, stride, padding, output_padding, groups,
                         dilation):
    """Validate conv_transpose2d's arguments: (ConvGeometry, output (Ho, Wo))."""
    _check_groups(op, groups)
    _check_conv_inputs(op, input, weight, bias, weight_in_channels_axis=0)
    stride, dilation = pair(stride, "stride", op), pair(dilation, "dilation", op)
    _check_positive(op, "stride", stride)
    _check_positive(op, "dilation", dilation)
    ph, pw = pair(padding, "padding", op)
    oph, opw = pair(output_padding, "output_padding", op)
    if ph < 0 or pw < 0:
        fail(op, "padding of 0 or more", f"padding {(ph, pw)}")
    if not (0 <= oph < stride[0] and 0 <= opw < stride[1]):
        fail(op, f"0 <= output_padding < stride {stride}", f"output_padding {(oph, opw)}")
    (h, w), (kh, kw) = input.shape[2:], weight.shape[2:]
    output_hw = (
        (h - 1) * stride[0] - 2 * ph + dilation[0] * (kh - 1) + oph + 1,
        (w - 1) * stride[1] - 2 * pw + dilation[1] * (kw - 1) + opw + 1,
    )
    if output_hw[0] < 1 or output_hw[1] < 1:
        fail(op, "a positive output size",
             f"output size {output_hw} from input {(h, w)}, kernel {(kh, kw)}, padding {(ph, pw)}")
    return ConvGeometry(stride, (ph, ph, pw, pw), dilation), output_hw
