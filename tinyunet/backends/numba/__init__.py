"""The fast CPU backend: numba kernels for data movement, BLAS GEMMs for the arithmetic.

    policy.py       which path each conv takes: every threshold
    backend.py      NumbaBackend: the conv methods, with the families below mixed in
    scratch.py      reused scratch buffers and padded copies
    im2col.py       im2col, row-shift and transposed-conv paths
    winograd.py     Winograd F(2x2, 3x3) and F(4x4, 3x3) paths
    blas.py         GEMMs on numba's thread pool; the weight gradients' skinny GEMMs
    pool.py, elementwise.py, optim.py   max-pool, elementwise passes, optimizer updates

The kernels themselves are in tinyunet.kernels.cpu (the repository's kernels/cpu/).
"""

from .backend import NumbaBackend

__all__ = ["NumbaBackend"]
