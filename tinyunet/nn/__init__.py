"""Neural-network building blocks: Module, Parameter, layers and the U-Net."""

from .init import manual_seed
from .layers import Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sequential, Upsample
from .module import Module, Parameter
from .unet import DoubleConv, UNet

__all__ = [
    "Conv2d",
    "ConvTranspose2d",
    "DoubleConv",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "UNet",
    "Upsample",
    "manual_seed",
]
