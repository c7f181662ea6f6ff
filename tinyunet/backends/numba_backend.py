"""The numba backend's former module path, kept so that its imports keep working: the
backend is the package tinyunet.backends.numba."""

from .numba import NumbaBackend

__all__ = ["NumbaBackend"]
