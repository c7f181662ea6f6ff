"""Optimizer updates, one fused pass over one flat parameter each.

* ``sgd_step``: PyTorch's SGD.
* ``adam_step``: PyTorch's Adam or AdamW.
"""

from __future__ import annotations

import math

from numba import cuda


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
