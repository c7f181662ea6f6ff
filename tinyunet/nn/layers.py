"""Layers: thin Modules that own their weights and call tinyunet.functional.

Shapes follow PyTorch: Conv2d weight (C_out, C_in, kH, kW); ConvTranspose2d weight
(C_in, C_out, kH, kW); activations (N, C, H, W).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..ops.conv import pair
from .init import he_normal
from .module import Module, Parameter


class Conv2d(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size", "Conv2d")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = Parameter(he_normal((out_channels, in_channels, kh, kw),
                                          fan_in=in_channels * kh * kw))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class ConvTranspose2d(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, bias=True):
        super().__init__()
        kh, kw = pair(kernel_size, "kernel_size", "ConvTranspose2d")
        sh, sw = pair(stride, "stride", "ConvTranspose2d")
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        # Each output pixel hears from about C_in * kH*kW / (sH*sW) inputs (C_in for the
        # U-Net's 2x2 stride-2 up-conv), which is the fan-in He's rule wants.
        fan_in = max(1.0, in_channels * kh * kw / (sh * sw))
        self.weight = Parameter(he_normal((in_channels, out_channels, kh, kw), fan_in=fan_in))
        self.bias = Parameter(np.zeros(out_channels, np.float32)) if bias else None

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class Upsample(Module):
    def __init__(self, scale_factor=2, mode="nearest", align_corners=None):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x):
        return F.interpolate(x, self.scale_factor, self.mode, self.align_corners)


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ..."""

    def __init__(self, *modules):
        super().__init__()
        for index, module in enumerate(modules):
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
