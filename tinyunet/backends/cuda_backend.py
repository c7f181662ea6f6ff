"""The GPU backend: CuPy arrays, cuBLAS GEMMs and the Numba CUDA kernels of kernels/cuda/.

Shapes: x (N, C, H, W); w (O, C, kH, kW); columns (N, C, kH, kW, Ho, Wo).

Conv is im2col + one batched GEMM (``xp.matmul``, which is cuBLAS on CuPy arrays); its
input gradient is a GEMM + col2im, the gather kernel that is also the transposed
conv's forward. Max-pool, ReLU, bias, the Dice/IoU sums and the optimizer updates are
custom kernels; the rest of the elementwise work is CuPy's.

Streams and synchronisation: CuPy and Numba both launch on the CUDA default stream,
so kernels and GEMMs run in the order they are issued. A training step copies nothing
to the host; the loss reaches it only when the caller asks for it
(``Tensor.item()``/``numpy()``). numba does wait, at each kernel launch, for the stream
that a CuPy argument's array interface names. Doing without that wait, through views
made with ``numba.cuda.as_cuda_array(a, sync=False)`` or numba's
``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=0``, saves no time: a step of these small U-Nets is
bound by the host's launch overhead, not by the GPU, and the views cost more host time
than the waits (docs/backend-cuda.md; the measurements in benchmarks/RESULTS.md, "GPU
notes").

Under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) numpy arrays stand in for device
arrays and numpy's matmul for cuBLAS; the kernel source is the same. That is how the
kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import numpy as np

from .interface import Backend, ConvGeometry, PoolGeometry

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def _require_gpu_stack():
    """The array module for this backend, or an error that says what is missing."""
    if importlib.util.find_spec("numba") is None:
        raise ImportError("cuda backend: numba is not installed (pip install 'tinyunet[cuda]').")
    if SIMULATED:
        return np
    if importlib.util.find_spec("cupy") is None:
        raise ImportError("cuda backend: CuPy is not installed (pip install 'tinyunet[cuda]').")
    from numba import cuda

    if not cuda.is_available():
        raise RuntimeError(
            "cuda backend: no usable CUDA GPU was found (numba.cuda.is_available() is False). "
            "Use --backend numba on this machine, or NUMBA_ENABLE_CUDASIM=1 to simulate."
        )
    import cupy

    return cupy


# numba warns at every launch of a grid under 128 blocks. A U-Net's small layers,
# biases and optimizer steps are such launches by nature, and the warning buried the
# training log, so it alone is silenced.
LOW_OCCUPANCY_WARNING = r".*Grid size \d+ will likely result in GPU under-utilization"


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self.xp = _require_gpu_stack()
        warnings.filterwarnings("ignore", message=LOW_OCCUPANCY_WARNING)
        from ..kernels import cuda as cuda_kernels

        self.kernels = cuda_kernels

    def _launch(self, kernel, work, *args):
        blocks, threads = self.kernels.launch_config(work)
        kernel[blocks, threads](*args)

    def asarray(self, host_array):
        return self.xp.asarray(host_array)

    def to_numpy(self, array):
        return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) \
            else np.asarray(array)

    def _contiguous(self, a):
        return self.xp.ascontiguousarray(a)

    # ---- convolution --------------------------------------------------------------------
    def _im2col(self, x, kernel_hw, geometry: ConvGeometry):
        n, c, h, w = x.shape
        ho, wo = geometry.output_hw((h, w), kernel_hw)
        cols = self.xp.empty((n, c, *kernel_hw, ho, wo), dtype=x.dtype)
        top, _, left, _ = geometry.padding
        self._launch(self.kernels.im2col, cols.size, self._contiguous(x), cols, top, left,
                     *geometry.stride, *geometry.dilation)
        return cols

    def conv2d(self, x, w, geometry):
        n = x.shape[0]
        o, c, kh, kw = w.shape
        cols = self._im2col(x, (kh, kw), geometry)
        ho, wo = cols.shape[-2:]
        y = self.xp.matmul(w.reshape(o, c * kh * kw), cols.reshape(n, c * kh * kw, ho * wo))
        return y.reshape(n, o, ho, wo)

    def conv2d_grad_input(self, dy, w, geometry, input_hw):
        n, o, ho, wo = dy.shape
        _, c, kh, kw = w.shape
        cols = self.xp.matmul(w.reshape(o, c * kh * kw).T, dy.reshape(n, o, ho * wo))
        cols = self._contiguous(cols).reshape(n, c, kh, kw, ho, wo)
        dx = self.xp.empty((n, c, *input_hw), dtype=dy.dtype)
        top, _, left, _ = geometry.padding
        self._launch(self.kernels.col2im, dx.size, cols, dx, top, left, *geometry.stride,
                     *geometry.dilation)
        return dx

    def conv2d_grad_weight(self, dy, x, geometry, kernel_hw):
        n, o, ho, wo = dy.shape
        c = x.shape[1]
        cols = self._im2col(x, kernel_hw, geometry).reshape(n, -1, ho * wo)
        dw = self.xp.tensordot(dy.reshape(n, o, ho * wo), cols, axes=([0, 2], [0, 2]))
        return dw.reshape(o, c, *kernel_hw)

    # ---- pooling --------------------------------------------------------------------------
    def max_pool2d(self, x, geometry: PoolGeometry):
        n, c, h, w = x.shape
        ho, wo = geometry.output_hw((h, w))
        y = self.xp.empty((n, c, ho, wo), dtype=x.dtype)
        argmax = self.xp.empty((n, c, ho, wo), dtype=np.int64)
        self._launch(self.kernels.max_pool_forward, y.size, self._contiguous(x), y, argmax,
                     *geometry.kernel, *geometry.stride, *geometry.padding, *geometry.dilation)
        return y, argmax

    def max_pool2d_backward(self, dy, argmax, input_shape, geometry):
        dx = self.xp.empty(input_shape, dtype=dy.dtype)
        self._launch(self.kernels.max_pool_backward, dx.size, self._contiguous(dy), argmax, dx,
                     *geometry.kernel, *geometry.stride, *geometry.padding, *geometry.dilation)
        return dx

    # ---- elementwise kernels -----------------------------------------------------------------
    def relu(self, x):
        y = self.xp.empty_like(x)
        self._launch(self.kernels.relu_forward, x.size, self._contiguous(x).ravel(), y.ravel())
        return y

    def relu_backward(self, dy, y):
        dx = self.xp.empty_like(dy)
        self._launch(self.kernels.relu_backward, dy.size, self._contiguous(dy).ravel(),
                     self._contiguous(y).ravel(), dx.ravel())
        return dx

    def add_bias(self, y, bias):
        y = self._contiguous(y)
        self._launch(self.kernels.bias_relu, y.size, y.ravel(), bias, y.shape[1],
                     y.shape[2] * y.shape[3], False)
        return y

    def overlap_sums(self, p, t, first_axis):
        rows = math.prod(p.shape[:first_axis])
        sums = self.xp.empty((rows, 3), dtype=np.float64)
        self.kernels.overlap_sums[rows, self.kernels.REDUCE_THREADS](
            self._contiguous(p).reshape(rows, -1), self._contiguous(t).reshape(rows, -1), sums)
        kept = p.shape[:first_axis] + (1,) * (p.ndim - first_axis)
        return tuple(sums[:, k].astype(p.dtype).reshape(kept) for k in range(3))

    # ---- optimizer updates: one fused pass over each parameter --------------------------------
    def sgd_update(self, params, grads, buffers, lr, momentum, dampening, nesterov,
                   weight_decay, first_step):
        for param, grad, buffer in zip(params, grads, buffers, strict=True):
            self._launch(self.kernels.sgd_step, param.size, param.ravel(),
                         self._contiguous(grad).ravel(), buffer.ravel(), lr, momentum,
                         dampening, nesterov, weight_decay, first_step)

    def adam_update(self, params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                    weight_decay, decoupled):
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        for param, grad, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
            self._launch(self.kernels.adam_step, param.size, param.ravel(),
                         self._contiguous(grad).ravel(), m.ravel(), v.ravel(), lr, beta1, beta2,
                         eps, weight_decay, decoupled, bias1, bias2)
