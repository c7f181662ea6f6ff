"""Layers: thin Modules that own their weights and call tinyunet.functional.

Shapes follow PyTorch: activations (N, C, H, W); Conv2d weight (C_out, C_in, kH, kW);
ConvTranspose2d weight (C_in, C_out, kH, kW); biases (C_out,).

Weights are He-normal (std sqrt(2 / fan_in)), the U-Net paper's choice for ReLU
networks, drawn from the generator that ``tinyunet.manual_seed`` seeds; biases are
zero. Parameters are float32 on the default backend.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..errors import check
from ..ops.conv import pair
from .init import he_normal
from .module import Module, Parameter


class Conv2d(Module):
    """(N, C_in, H, W) -> (N, C_out, Ho, Wo), as ``torch.nn.Conv2d`` (padding may be 'same')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size", "Conv2d")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (kh, kw), stride
        self.padding, self.dilation = padding, dilation
        # fan_in: every output pixel sums C_in * kH * kW weighted inputs.
        self.weight = Parameter(he_normal((out_channels, in_channels, kh, kw),
                                          fan_in=in_channels * kh * kw))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def forward_relu(self, x):
        """relu(self(x)), as one fused op (``F.conv2d_relu``)."""
        return F.conv2d_relu(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}")


class ConvTranspose2d(Module):
    """(N, C_in, H, W) -> (N, C_out, Ho, Wo), as ``torch.nn.ConvTranspose2d``.

    Ho = (H - 1) * stride - 2 * padding + dilation * (kH - 1) + output_padding + 1.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, bias=True, dilation=1):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size", "ConvTranspose2d")
        sh, sw = pair(stride, "stride", "ConvTranspose2d")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.output_padding, self.dilation = output_padding, dilation
        # Each output pixel hears from about C_in * kH*kW / (sH*sW) inputs (exactly C_in
        # for the U-Net's 2x2 stride-2 up-conv), which is the fan-in He's rule wants.
        # (PyTorch's own init would use C_out * kH * kW here.)
        fan_in = max(1.0, in_channels * kh * kw / (sh * sw))
        self.weight = Parameter(he_normal((in_channels, out_channels, kh, kw), fan_in=fan_in))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding, dilation=self.dilation)

    def forward_concat(self, skip, x):
        """``concat([skip, self(x)], dim=1)`` as one fused op (the U-Net's up step)."""
        return F.conv_transpose2d_concat(skip, x, self.weight, self.bias, self.stride,
                                         self.padding, self.output_padding,
                                         dilation=self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")


class MaxPool2d(Module):
    """(N, C, H, W) -> (N, C, Ho, Wo); ``stride`` defaults to ``kernel_size``; odd sizes
    round down (PyTorch's ceil_mode=False)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}"


class ReLU(Module):
    """max(x, 0), elementwise."""

    def forward(self, x):
        return F.relu(x)


class Upsample(Module):
    """(N, C, H, W) -> (N, C, s*H, s*W) for an integer ``scale_factor`` s, as ``torch.nn.Upsample``.

    ``align_corners`` is for mode 'bilinear' only (None means False), as in PyTorch.
    """

    def __init__(self, scale_factor=2, mode="nearest", align_corners=None):
        super().__init__()
        check(mode in ("nearest", "bilinear"), "Upsample", "mode 'nearest' or 'bilinear'",
              f"{mode!r}")
        check(mode == "bilinear" or align_corners is None, "Upsample",
              "align_corners only with mode 'bilinear' (as PyTorch)",
              f"align_corners={align_corners} with mode 'nearest'")
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x):
        return F.interpolate(x, self.scale_factor, self.mode, self.align_corners)

    def extra_repr(self):
        corners = "" if self.align_corners is None else f", align_corners={self.align_corners}"
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}{corners}"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (state_dict keys too)."""

    def __init__(self, *modules):
        super().__init__()
        for index, module in enumerate(modules):
            check(isinstance(module, Module), "Sequential", "Modules",
                  f"a {type(module).__name__} at position {index}")
            setattr(self, str(index), module)

    def __getitem__(self, index):
        return list(self.children())[index]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return self.children()

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x
