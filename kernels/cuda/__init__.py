"""Numba CUDA kernels of the ``cuda`` backend, one file per family.

Shapes: images (N, C, H, W); conv columns (N, C, kH, kW, Ho, Wo); pool argmax
(N, C, Ho, Wo) holding the flat index h*W + w of each window's winner.

Every kernel is written as a gather: each thread owns the elements it writes and
reads whatever it needs, so no two threads write one address, no atomics are needed
and results are deterministic. Threads walk their share with a grid-stride loop, so
any launch size covers any array; ``launch_config`` picks the size from the work.

Each kernel spells out its own index arithmetic rather than calling shared device
functions: with numba 0.68, compiling a kernel that calls a device function to PTX
initialises the CUDA driver, so the PTX check could no longer run without a GPU.

On a real GPU the arrays are CuPy arrays, passed through ``__cuda_array_interface__``;
under Numba's simulator (NUMBA_ENABLE_CUDASIM=1) they are numpy arrays and the same
source runs on the host.
"""

from .conv import col2im, im2col
from .elementwise import bias_relu, overlap_sums, relu_backward, relu_forward
from .launch import REDUCE_THREADS, SIMULATED, launch_config
from .optim import adam_step, sgd_step
from .pool import max_pool_backward, max_pool_forward

__all__ = [
    "REDUCE_THREADS",
    "SIMULATED",
    "adam_step",
    "bias_relu",
    "col2im",
    "im2col",
    "launch_config",
    "max_pool_backward",
    "max_pool_forward",
    "overlap_sums",
    "relu_backward",
    "relu_forward",
    "sgd_step",
]
