"""tinyunet: a small, readable deep-learning engine that trains U-Nets.

    import tinyunet as tu
    F = tu.functional                    # also tu.nn, tu.optim, as torch gives them
    trainer = tu.fit(images, masks)      # train on numpy arrays (tinyunet.api)
    probabilities, labels = tu.predict(trainer, image)
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

# After each GEMM, OpenBLAS's idle threads spin for up to 2**28 cycles. On the numba
# backend GEMMs alternate with numba's parallel kernels, which then share the cores
# with the spinning threads (measured: a U-Net training step 20-25% slower on 2
# cores). A timeout of 2**4 cycles puts them to sleep at once. OpenBLAS reads the
# variable when it loads, so this works only when tinyunet is imported before numpy;
# a value the user set is kept.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


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
