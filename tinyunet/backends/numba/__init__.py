"""The fast CPU backend: numba kernels for data movement, BLAS GEMMs for the arithmetic.

    policy.py       which algorithm each conv pass takes, every threshold; the override
    backend.py      NumbaBackend: each conv method plans its pass and runs the plan
    scratch.py      reused scratch buffers and padded copies
    im2col.py       im2col, row-shift, 1x1 and transposed-conv paths
    winograd.py     Winograd F(2x2, 3x3) and F(4x4, 3x3) paths
    direct.py       direct 3x3 paths
    blas.py         GEMMs on numba's thread pool; the weight gradients' skinny GEMMs
    pool.py, elementwise.py, optim.py   max-pool, elementwise passes, optimizer updates

The kernels themselves are in tinyunet.kernels.cpu (the repository's kernels/cpu/), the
design in docs/backend-numba.md. ``force_conv_algo`` (or TINYUNET_CONV_ALGO) forces one
conv algorithm wherever it can run, to compare paths or test them.
"""

from .backend import NumbaBackend
from .policy import ConvPlan, force_conv_algo, plan_conv

__all__ = ["ConvPlan", "NumbaBackend", "force_conv_algo", "plan_conv"]
