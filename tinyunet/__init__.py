"""tinyunet: a small, readable deep-learning engine that trains U-Nets.

    import tinyunet as tu
    F = tu.functional                    # also tu.nn, tu.optim, as torch gives them
    trainer = tu.fit(images, masks)      # train on numpy arrays (tinyunet.api)
    probabilities, labels = tu.predict(trainer, image)
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _mount_source_kernels():
    """Run from a source checkout, find the hand-written kernels in ../kernels.

    Installed, they are tinyunet/kernels. Without this, running from the repository's
    root beside a non-editable install would import this folder without its kernels.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    source = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.exists(source):
        return
    spec = _importlib_util.spec_from_file_location(
        "tinyunet.kernels", source, submodule_search_locations=[_os.path.dirname(source)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["tinyunet.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


if "tinyunet.kernels" not in _sys.modules:
    _mount_source_kernels()

# Before numpy loads OpenBLAS: its idle threads must sleep at once (see the runtime).
from .kernels.cpu import runtime as _runtime  # noqa: E402

_runtime.set_openblas_thread_timeout()

from . import functional, nn, optim  # noqa: E402
from .api import fit, predict  # noqa: E402
from .autograd import (  # noqa: E402
    Function,
    Tensor,
    from_numpy,
    is_grad_enabled,
    no_grad,
    tensor,
)
from .backends import available_backends, get_backend, set_backend  # noqa: E402
from .errors import ShapeError  # noqa: E402
from .nn.init import manual_seed  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Function",
    "ShapeError",
    "Tensor",
    "available_backends",
    "fit",
    "from_numpy",
    "functional",
    "get_backend",
    "is_grad_enabled",
    "manual_seed",
    "nn",
    "no_grad",
    "optim",
    "predict",
    "set_backend",
    "tensor",
]
