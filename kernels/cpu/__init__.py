"""Numba CPU kernels of the ``numba`` backend, one file per family.

    runtime.py      threads, BLAS and malloc settings of the process (standard library only)
    jit.py          ``kernel``: compile each kernel parallel and serial; starts the pool
    im2col.py       columns, padded copies, pixel shuffles and their adjoints
    direct3x3.py    direct 3x3 stride-1 convolution for few channels
    winograd.py     Winograd F(2x2, 3x3) and F(4x4, 3x3) transforms
    gemm.py         BLAS GEMMs on numba's pool; skinny weight-gradient GEMMs
    pool.py         max-pool
    elementwise.py  ReLU, sigmoid, bias, channel sums, Dice/IoU passes
    optim.py        SGD and Adam updates

Shape convention: images are C-contiguous (N, C, H, W) arrays; conv weights are
(C_out, C_in, kH, kW). Nothing is imported here, so that ``runtime`` loads without numba.
"""
