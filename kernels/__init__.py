"""Hand-written kernels, installed as ``tinyunet.kernels``, by device and family.

``cpu/``: numba CPU kernels of the ``numba`` backend, and the runtime settings (threads,
BLAS, malloc) they run under. ``cuda/``: numba.cuda GPU kernels of the ``cuda`` backend.
The numpy reference needs none.
"""
