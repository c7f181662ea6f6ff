"""Numba CUDA kernels of the ``cuda`` backend.

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

from __future__ import annotations

import math
import os

from numba import cuda, float64

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
THREADS_PER_BLOCK = 256
# The simulator runs each thread as a Python thread (about 1 ms each), so it gets one
# small block; the grid-stride loops keep results identical.
SIMULATOR_THREADS = 32
# Threads of one reduction block: a power of two, fixed at compile time.
REDUCE_THREADS = 32 if SIMULATED else 128


def launch_config(work: int) -> tuple[int, int]:
    """(blocks, threads) for ``work`` independent items."""
    if SIMULATED:
        return 1, SIMULATOR_THREADS
    blocks = max(1, min(math.ceil(work / THREADS_PER_BLOCK), 65535))
    return blocks, THREADS_PER_BLOCK


# ---- convolution: im2col and its adjoint ---------------------------------------------

@cuda.jit
def im2col(x, cols, pad_top, pad_left, stride_h, stride_w, dil_h, dil_w):
    """cols[n, c, i, j, oh, ow] = x[n, c, oh*s + i*d - pad, ow*s + j*d - pad] (0 outside)."""
    n_, c_, kh, kw, ho, wo = cols.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, cols.size, step):
        ow = index % wo
        rest = index // wo
        oh = rest % ho
        rest //= ho
        j = rest % kw
        rest //= kw
        i = rest % kh
        rest //= kh
        c = rest % c_
        n = rest // c_
        h = oh * stride_h + i * dil_h - pad_top
        w = ow * stride_w + j * dil_w - pad_left
        value = 0.0
        if 0 <= h < height and 0 <= w < width:
            value = x[n, c, h, w]
        cols[n, c, i, j, oh, ow] = value


@cuda.jit
def col2im(cols, x, pad_top, pad_left, stride_h, stride_w, dil_h, dil_w):
    """x[n, c, h, w] = sum of every column entry read from (h, w): one thread per pixel."""
    n_, c_, kh, kw, ho, wo = cols.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, x.size, step):
        w = index % width
        rest = index // width
        h = rest % height
        rest //= height
        c = rest % c_
        n = rest // c_
        total = 0.0
        for i in range(kh):
            oh_scaled = h + pad_top - i * dil_h
            if oh_scaled < 0 or oh_scaled % stride_h != 0:
                continue
            oh = oh_scaled // stride_h
            if oh >= ho:
                continue
            for j in range(kw):
                ow_scaled = w + pad_left - j * dil_w
                if ow_scaled < 0 or ow_scaled % stride_w != 0:
                    continue
                ow = ow_scaled // stride_w
                if ow < wo:
                    total += cols[n, c, i, j, oh, ow]
        x[n, c, h, w] = total


# ---- max-pool ----------------------------------------------------------------------------

@cuda.jit
def max_pool_forward(x, y, argmax, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                     dil_h, dil_w):
    """One thread per output: the window's maximum and the flat index of its first winner."""
    n_, c_, ho, wo = y.shape
    height, width = x.shape[2], x.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, y.size, step):
        ow = index % wo
        rest = index // wo
        oh = rest % ho
        rest //= ho
        c = rest % c_
        n = rest // c_
        best = -math.inf
        best_index = -1
        for i in range(kernel_h):
            h = oh * stride_h - pad_h + i * dil_h
            if h < 0 or h >= height:
                continue
            for j in range(kernel_w):
                w = ow * stride_w - pad_w + j * dil_w
                if w < 0 or w >= width:
                    continue
                value = x[n, c, h, w]
                # Strictly greater keeps the first maximum (PyTorch's tie rule); the
                # first NaN wins and stays, so that it propagates as in numpy.
                if best_index < 0 or value > best or (math.isnan(value)
                                                      and not math.isnan(best)):
                    best = value
                    best_index = h * width + w
        y[n, c, oh, ow] = best
        argmax[n, c, oh, ow] = best_index


@cuda.jit
def max_pool_backward(dy, argmax, dx, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                      dil_h, dil_w):
    """One thread per input pixel: add the gradient of every window that it won."""
    n_, c_, ho, wo = dy.shape
    height, width = dx.shape[2], dx.shape[3]
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, dx.size, step):
        w = index % width
        rest = index // width
        h = rest % height
        rest //= height
        c = rest % c_
        n = rest // c_
        flat = h * width + w
        total = 0.0
        for i in range(kernel_h):
            oh_scaled = h + pad_h - i * dil_h
            if oh_scaled < 0 or oh_scaled % stride_h != 0:
                continue
            oh = oh_scaled // stride_h
            if oh >= ho:
                continue
            for j in range(kernel_w):
                ow_scaled = w + pad_w - j * dil_w
                if ow_scaled < 0 or ow_scaled % stride_w != 0:
                    continue
                ow = ow_scaled // stride_w
                if ow < wo and argmax[n, c, oh, ow] == flat:
                    total += dy[n, c, oh, ow]
        dx[n, c, h, w] = total


# ---- elementwise -----------------------------------------------------------------------

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


# ---- optimizer updates ------------------------------------------------------------------

@cuda.jit
def sgd_step(param, grad, buffer, lr, momentum, dampening, nesterov, weight_decay, first_step):
    """PyTorch's SGD for one flat parameter, all in one pass over memory."""
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, param.size, step):
        d = grad[index] + weight_decay * param[index]
        if momentum != 0:
            if first_step:
                b = d
            else:
                b = momentum * buffer[index] + (1 - dampening) * d
            buffer[index] = b
            d = d + momentum * b if nesterov else b
        param[index] -= lr * d


@cuda.jit
def adam_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
              decoupled, bias1, bias2):
    """PyTorch's Adam (or AdamW when ``decoupled``) for one flat parameter, in one pass."""
    start, step = cuda.grid(1), cuda.gridsize(1)
    for index in range(start, param.size, step):
        p = param[index]
        g = grad[index]
        if decoupled:
            p *= 1 - lr * weight_decay
        else:
            g += weight_decay * p
        m = beta1 * exp_avg[index] + (1 - beta1) * g
        v = beta2 * exp_avg_sq[index] + (1 - beta2) * g * g
        exp_avg[index] = m
        exp_avg_sq[index] = v
        param[index] = p - (lr / bias1) * m / (math.sqrt(v / bias2) + eps)
