"""Elementwise kernels on flat arrays, and the Dice/IoU sums as block reductions.

* ``bias_relu``: in place, y += bias[c], then ReLU if asked.
* ``relu_forward``, ``relu_backward``.
* ``overlap_sums``: per row of (R, L) inputs, (sum p*t, sum p, sum t); one block a row.
"""

from __future__ import annotations

from numba import cuda, float64

from .launch import REDUCE_THREADS


@cuda.jit
def bias_relu(y, bias, channels, plane, apply_relu):
    """In place on flat (N*C*H*W,) y: y += bias[c], then max(y, 0) when ``apply_relu``."""
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, y.size, step):
        value = y[index] + bias[(index // plane) % channels]
        if apply_relu and value < 0:
            value = 0.0
        y[index] = value


@cuda.jit
def relu_forward(x, y):
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, x.size, step):
        value = x[index]
        y[index] = value if value > 0 else 0.0


@cuda.jit
def relu_backward(dy, y, dx):
    """dx = dy where the ReLU's output is positive (zero at the kink)."""
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, dy.size, step):
        dx[index] = dy[index] if y[index] > 0 else 0.0



# ---- reductions for soft Dice / IoU -----------------------------------------------------

@cuda.jit
def overlap_sums(p, t, sums):
    """Per row r of (R, L) inputs: sums[r] = (sum p*t, sum p, sum t).

    Launch one block of REDUCE_THREADS threads per row. Each thread accumulates a
    strided share, then a tree reduction in shared memory combines the partial sums.
    The order of additions differs from numpy's pairwise sum, so results agree to
    float rounding, not bitwise.
    """
    # float64 partial sums: the reduction's rounding stays far below float32's.
    shared = cuda.shared.array((3, REDUCE_THREADS), dtype=float64)
    row, tid = cuda.blockIdx.x, cuda.threadIdx.x
    intersection, p_total, t_total = 0.0, 0.0, 0.0
    for col in range(tid, p.shape[1], cuda.blockDim.x):
        pv, tv = p[row, col], t[row, col]
        intersection += pv * tv
        p_total += pv
        t_total += tv
    shared[0, tid], shared[1, tid], shared[2, tid] = intersection, p_total, t_total
    cuda.syncthreads()
    width = cuda.blockDim.x // 2
    while width > 0:
        if tid < width:
            for k in range(3):
                shared[k, tid] += shared[k, tid + width]
        cuda.syncthreads()
        width //= 2
    if tid == 0:
        for k in range(3):
            sums[row, k] = shared[k, 0]
