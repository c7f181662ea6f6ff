"""tinyunet: a small, readable deep-learning engine that trains U-Nets.

    import tinyunet as tu
    import tinyunet.functional as F
"""

from . import functional
from .autograd import Function, Tensor, is_grad_enabled, no_grad, tensor
from .backends import available_backends, get_backend, set_backend
from .errors import ShapeError
from .nn.init import manual_seed

__version__ = "0.1.0"

__all__ = [
    "Function",
    "ShapeError",
    "Tensor",
    "available_backends",
    "functional",
    "get_backend",
    "is_grad_enabled",
    "manual_seed",
    "no_grad",
    "set_backend",
    "tensor",
]
