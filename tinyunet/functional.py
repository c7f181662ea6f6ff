"""The functional API, with ``torch.nn.functional``'s names, arguments and defaults.

    import tinyunet.functional as F
    y = F.relu(F.conv2d(x, w, b, padding="same"))
"""

from .ops.activations import log_softmax, relu, sigmoid, softmax
from .ops.conv import conv2d, conv2d_relu, conv_transpose2d, conv_transpose2d_concat
from .ops.losses import (
    bce_dice_loss,
    binary_cross_entropy_with_logits,
    cross_entropy,
    dice_loss,
    iou_loss,
)
from .ops.pool import max_pool2d
from .ops.structural import cat, center_crop, concat, pad
from .ops.upsample import interpolate

__all__ = [
    "bce_dice_loss",
    "binary_cross_entropy_with_logits",
    "cat",
    "center_crop",
    "concat",
    "conv2d",
    "conv2d_relu",
    "conv_transpose2d",
    "conv_transpose2d_concat",
    "cross_entropy",
    "dice_loss",
    "interpolate",
    "iou_loss",
    "log_softmax",
    "max_pool2d",
    "pad",
    "relu",
    "sigmoid",
    "softmax",
]
