"""Optimizer updates of every parameter in one call.

* ``sgd_update``: PyTorch's SGD (momentum, dampening, Nesterov, weight decay).
* ``adam_update``: PyTorch's Adam and AdamW.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .jit import kernel

# Parameter i's values, gradient and state are entry i of flat arrays in numba typed
# Lists (parameters, state) or tuples (gradients, new every step; and the buffers when
# the kernel ignores them); ``spans`` rows (i, start, stop) cut them into pieces of
# similar size, one parallel step each, so one call updates a whole model and its
# threads share the work evenly, however the parameters' sizes differ.


@njit(cache=True, inline="always")
def _sgd_piece(param, grad, buf, lr, momentum, keep, nesterov, weight_decay, first):
    dt = param.dtype.type
    lr, momentum, keep, weight_decay = dt(lr), dt(momentum), dt(keep), dt(weight_decay)
    for k in range(param.size):
        g = grad[k]
        if weight_decay != 0:
            g = g + weight_decay * param[k]
        if momentum != 0:
            b = g if first else buf[k] * momentum + keep * g
            buf[k] = b
            g = g + momentum * b if nesterov else b
        param[k] = param[k] - lr * g


@kernel()
def sgd_update(params, grads, buffers, spans, lr, momentum, keep, nesterov, weight_decay,
               first):
    """One SGD step on every parameter, in place, in the numpy reference's order of operations.

    g = grad + wd*param; buf = g (first step) or buf*momentum + keep*g, keep = 1 -
    dampening; step = g + momentum*buf (nesterov) or buf; param -= lr*step. ``buf``
    is untouched when momentum is 0. Scalars arrive as Python floats and are rounded
    to the arrays' dtype once, as numpy does with Python scalars.
    """
    for piece in prange(spans.shape[0]):
        i, lo, hi = spans[piece, 0], spans[piece, 1], spans[piece, 2]
        _sgd_piece(params[i][lo:hi], grads[i][lo:hi], buffers[i][lo:hi], lr, momentum, keep,
                   nesterov, weight_decay, first)


@njit(cache=True, inline="always")
def _adam_piece(param, grad, m, v, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2,
                bias2, eps, weight_decay, decay_factor, decoupled):
    dt = param.dtype.type
    step_size, beta1, one_minus_beta1 = dt(step_size), dt(beta1), dt(one_minus_beta1)
    beta2, one_minus_beta2, bias2, eps = dt(beta2), dt(one_minus_beta2), dt(bias2), dt(eps)
    weight_decay, decay_factor = dt(weight_decay), dt(decay_factor)
    for k in range(param.size):
        g = grad[k]
        p = param[k]
        if decoupled:
            p = p * decay_factor
        elif weight_decay != 0:
            g = g + weight_decay * p
        mk = m[k] * beta1 + one_minus_beta1 * g
        vk = v[k] * beta2 + one_minus_beta2 * g * g
        m[k] = mk
        v[k] = vk
        param[k] = p - step_size * mk / (np.sqrt(vk / bias2) + eps)


@kernel()
def adam_update(params, grads, exp_avgs, exp_avg_sqs, spans, step_size, beta1,
                one_minus_beta1, beta2, one_minus_beta2, bias2, eps, weight_decay,
                decay_factor, decoupled):
    """One Adam (AdamW when ``decoupled``) step on every parameter, in place.

    m = m*b1 + (1-b1)*g; v = v*b2 + ((1-b2)*g)*g;
    param -= (step_size*m) / (sqrt(v / bias2) + eps), step_size = lr / bias1;
    AdamW first scales param by decay_factor = 1 - lr*wd, Adam adds wd*param to g.
    The order of operations is the numpy reference's, so the rounding is the same.
    """
    for piece in prange(spans.shape[0]):
        i, lo, hi = spans[piece, 0], spans[piece, 1], spans[piece, 2]
        _adam_piece(params[i][lo:hi], grads[i][lo:hi], exp_avgs[i][lo:hi],
                    exp_avg_sqs[i][lo:hi], step_size, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, bias2, eps, weight_decay, decay_factor, decoupled)
