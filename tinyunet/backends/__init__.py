"""Backend registry: the array libraries and kernels that ops run on.

``numpy`` is the plain reference. Other backends register themselves lazily by name
so that importing tinyunet needs numpy alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from .interface import Backend, ConvGeometry, PoolGeometry

__all__ = [
    "Backend",
    "ConvGeometry",
    "PoolGeometry",
    "available_backends",
    "get_backend",
    "set_backend",
]

# name -> "module:attribute" of a zero-argument factory that returns the Backend.
_FACTORIES = {
    "numpy": "tinyunet.backends.numpy_backend:NumpyBackend",
    "numba": "tinyunet.backends.numba:NumbaBackend",
    "cuda": "tinyunet.backends.cuda_backend:CudaBackend",
}
_instances: dict[str, Backend] = {}


def _cpu_default() -> str:
    """'numba' when numba is installed, else 'numpy' with a one-line notice on stderr."""
    if importlib.util.find_spec("numba") is not None:
        return "numba"
    print("tinyunet: numba is not installed, so the default backend is the slower 'numpy' "
          "(pip install 'tinyunet[fast]' for 'numba').", file=sys.stderr)
    return "numpy"


_default = _cpu_default()


def _create(name: str) -> Backend:
    if name not in _FACTORIES:
        raise ValueError(
            f"backend: Expect: one of {sorted(_FACTORIES)}. Actual: '{name}'."
        )
    module_name, attribute = _FACTORIES[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)()


def get_backend(name: Backend | str | None = None) -> Backend:
    """The backend called ``name`` (the default one when None)."""
    if isinstance(name, Backend):
        return name
    name = name or _default
    if name not in _instances:
        _instances[name] = _create(name)
    return _instances[name]


def set_backend(name: str) -> Backend:
    """Make ``name`` the backend of tensors built without an explicit one."""
    global _default
    backend = get_backend(name)
    _default = name
    return backend


def available_backends() -> list[str]:
    """Names of the backends that can be created on this machine."""
    names = []
    for name in _FACTORIES:
        try:
            get_backend(name)
        except (ImportError, RuntimeError):
            continue
        names.append(name)
    return names
