"""The U-Net of Ronneberger et al. (2015).

Shapes: input (N, in_channels, H, W) -> logits (N, num_classes, h, w).

Level i (0 = top) works on base_channels * 2**i channels. Going down, each level runs
two 3x3 conv+ReLU and a 2x2 max-pool (stride 2), and the next level doubles the
channels; the bottom level (i = depth) runs the convs only. Going up, each level
halves the channels and doubles the size with
    up='transpose': a 2x2 stride-2 transposed conv (the paper's up-conv), or
    up='upsample':  a bilinear x2 upsample (align_corners=False) then a 1x1 conv;
    a 1x1 conv keeps the size, so both variants give the same sizes in both modes.
The encoder's output at that level is joined on by concatenation (skip first), and two
3x3 conv+ReLU follow. A 1x1 conv gives the logits. No normalisation layers.

Weights are He-normal, std sqrt(2 / fan_in) (the paper's sqrt(2/N)); biases are zero.

padding='same': 3x3 convs pad by 1, so h, w == H, W. Sides that are not multiples of
    2**depth are zero-padded at the bottom/right up to the next multiple (so every pool
    sees an even size), and the logits are cropped back to H x W, so any size works.
    ``valid_input_hw`` gives the sizes that need no padding.
padding='valid': the paper's unpadded convs. Each conv loses 2 pixels, each skip is
    center-cropped to the decoder's size, and the size before every pool must be even.
    At depth 4 an input of 572 x 572 gives 388 x 388 logits (output = input - 184 there).
    ``output_hw`` maps an input size to the output size (and raises a ShapeError naming
    a usable size for one that can't be used); ``valid_input_hw`` finds usable sizes.
"""

from __future__ import annotations

import numbers
from typing import cast

from .. import functional as F
from ..errors import ShapeError, check
from .layers import Conv2d, ConvTranspose2d, Sequential, Upsample
from .module import Module


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of ``UNet(**config)`` by its state_dict name, computed
    without building the model: a checkpoint's weights are checked against these before
    anything is allocated (tinyunet/checkpoint.py). Must follow UNet.__init__ below."""
    depth, base = config["depth"], config["base_channels"]
    channels = [base * 2**level for level in range(depth + 1)]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_out, c_in, kernel):
        shapes[f"{name}.weight"] = (c_out, c_in, kernel, kernel)
        shapes[f"{name}.bias"] = (c_out,)

    for level in range(depth + 1):
        below = config["in_channels"] if level == 0 else channels[level - 1]
        conv(f"encoders.{level}.conv1", channels[level], below, 3)
        conv(f"encoders.{level}.conv2", channels[level], channels[level], 3)
    for level in range(depth):
        if config["up"] == "transpose":  # ConvTranspose2d weights are (C_in, C_out, kH, kW)
            shapes[f"ups.{level}.weight"] = (channels[level + 1], channels[level], 2, 2)
            shapes[f"ups.{level}.bias"] = (channels[level],)
        else:
            conv(f"ups.{level}.1", channels[level], channels[level + 1], 1)
    for level in range(depth):
        conv(f"decoders.{level}.conv1", channels[level], 2 * channels[level], 3)
        conv(f"decoders.{level}.conv2", channels[level], channels[level], 3)
    conv("head", config["num_classes"], channels[0], 1)
    return shapes


class UNetGeometry:
    """The size arithmetic of a U-Net with ``depth`` levels and ``padding`` 'same' or
    'valid': what an input of a given size gives, and which sizes can be used.

    It needs no weights, so a U-Net run by another program (``tinyunet.onnx_runtime``)
    shares it with ``UNet``.
    """

    depth: int
    padding: str

    def _output_side(self, side: int) -> int | None:
        """Output side for one input side, or None when the side can't be used."""
        if self.padding == "same":
            return side
        for _ in range(self.depth):
            side -= 4
            if side < 2 or side % 2:
                return None
            side //= 2
        side -= 4
        if side < 1:
            return None
        for _ in range(self.depth):
            side = 2 * side - 4
            if side < 1:
                return None
        return side

    def output_hw(self, input_hw) -> tuple[int, int]:
        """(h, w) of the logits for an input of ``input_hw``; ShapeError if it can't be used."""
        sides = [self._output_side(int(s)) for s in input_hw]
        if None in sides:
            suggestion = self.valid_input_hw(input_hw)
            raise ShapeError(
                f"UNet: Expect: an input size that the unpadded ('valid') U-Net of depth "
                f"{self.depth} can use: each side minus 4 per conv pair must be even before "
                f"every pool, e.g. {suggestion}. Actual: {tuple(input_hw)}."
            )
        return cast("tuple[int, int]", tuple(sides))  # no None, checked above

    def valid_input_hw(self, min_hw) -> tuple[int, int]:
        """The smallest usable input size at least ``min_hw`` (a multiple of 2**depth in 'same')."""
        def smallest(side):
            side = max(int(side), 1)
            if self.padding == "same":
                step = 2**self.depth
                return -(-side // step) * step
            while self._output_side(side) is None:
                side += 1
            return side

        return tuple(smallest(s) for s in min_hw)


class DoubleConv(Module):
    """Two 3x3 conv + ReLU: the work of one U-Net level."""

    def __init__(self, in_channels, out_channels, padding):
        super().__init__()
        conv_padding = 1 if padding == "same" else 0
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=conv_padding)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=conv_padding)

    def forward(self, x):
        return self.conv2.forward_relu(self.conv1.forward_relu(x))


class UNet(Module, UNetGeometry):
    """U-Net mapping (N, in_channels, H, W) images to (N, num_classes, h, w) logits.

        model = UNet(in_channels=1, num_classes=1, depth=4, base_channels=64)
        logits = model(x)            # 'same': h, w == H, W for any H, W
        UNet(**model.config)         # the same architecture, freshly initialised
    """

    def __init__(self, in_channels=1, num_classes=1, depth=4, base_channels=64, padding="same",
                 up="transpose"):
        super().__init__()
        sizes = (in_channels, num_classes, depth, base_channels)
        check(all(isinstance(v, numbers.Integral) and v >= 1 for v in sizes), "UNet",
              "in_channels, num_classes, depth and base_channels integers of 1 or more",
              f"{in_channels!r}, {num_classes!r}, {depth!r}, {base_channels!r}")
        in_channels, num_classes, depth, base_channels = (int(v) for v in sizes)
        check(padding in ("same", "valid"), "UNet", "padding 'same' or 'valid'", f"'{padding}'")
        check(up in ("transpose", "upsample"), "UNet", "up 'transpose' or 'upsample'", f"'{up}'")
        self.config = dict(in_channels=in_channels, num_classes=num_classes, depth=depth,
                           base_channels=base_channels, padding=padding, up=up)
        self.depth, self.padding = depth, padding
        channels = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = Sequential(*[
            DoubleConv(in_channels if level == 0 else channels[level - 1], channels[level], padding)
            for level in range(depth + 1)
        ])
        self.ups = Sequential(*[
            ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
            if up == "transpose"
            else Sequential(Upsample(2, "bilinear"),
                            Conv2d(channels[level + 1], channels[level], 1))
            for level in range(depth)
        ])
        self.decoders = Sequential(*[
            DoubleConv(2 * channels[level], channels[level], padding) for level in range(depth)
        ])
        self.head = Conv2d(channels[0], num_classes, 1)

    def forward(self, x):
        check(x.ndim == 4 and x.shape[1] == self.config["in_channels"], "UNet",
              f"input (N, {self.config['in_channels']}, H, W)", f"shape {x.shape}")
        height, width = x.shape[2:]
        if self.padding == "same":
            padded_h, padded_w = self.valid_input_hw((height, width))
            if (padded_h, padded_w) != (height, width):
                x = F.pad(x, (0, padded_w - width, 0, padded_h - height))
        else:
            self.output_hw((height, width))  # raises a clear error for unusable sizes
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for level in reversed(range(self.depth)):
            up = self.ups[level]
            if isinstance(up, ConvTranspose2d):
                # The up-conv writes straight into its channels of the concatenation. It is
                # 2x2 at stride 2 (built in __init__), so it doubles H and W.
                up_hw = (2 * x.shape[2], 2 * x.shape[3])
                joined = up.forward_concat(self._skip(skips[level], up_hw), x)
            else:
                x = up(x)
                joined = F.concat([self._skip(skips[level], x.shape[2:]), x], dim=1)
            x = self.decoders[level](joined)
        logits = self.head(x)
        if self.padding == "same" and logits.shape[2:] != (height, width):
            # Negative pad amounts crop: back to the caller's H x W.
            logits = F.pad(logits, (0, width - logits.shape[3], 0, height - logits.shape[2]))
        return logits

    def _skip(self, skip, size):
        """The skip as the decoder joins it: cropped to ``size`` in the unpadded U-Net."""
        return skip if self.padding == "same" else F.center_crop(skip, size)

    def extra_repr(self):
        return ", ".join(f"{key}={value!r}" for key, value in self.config.items())
