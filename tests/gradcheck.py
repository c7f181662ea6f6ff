"""Finite-difference gradient check of the full Jacobian-vector product, in float64.

For f: inputs -> output and a random output gradient v, backward gives
g_i = J_i^T v for each input. Along random directions u_i the central difference

    (<f(x + eps*u), v> - <f(x - eps*u), v>) / (2*eps)  ~  sum_i <g_i, u_i>

has error O(eps^2) from truncation and O(1e-16 / eps) from rounding. With eps = 1e-6
both stay below 1e-8 of the scale sum_i <|g_i|, |u_i|>, so the stated tolerance is
    |numeric - analytic| <= 1e-6 * (1 + sum_i <|g_i|, |u_i|>).
"""

from __future__ import annotations

import numpy as np

import tinyunet as tu

EPS = 1e-6
RTOL = 1e-6


def _tensors(arrays, backend, requires_grad):
    return [tu.tensor(a, requires_grad=requires_grad, dtype=np.float64, backend=backend)
            for a in arrays]


def check_gradients(fn, inputs, backend, seed=0, directions=2):
    """Assert that backward of ``fn(*tensors)`` matches central differences.

    ``inputs`` are float64 arrays; each becomes a Tensor that requires grad. Returns the
    analytic gradients as numpy arrays.
    """
    rng = np.random.default_rng(seed)
    tensors = _tensors(inputs, backend, True)
    out = fn(*tensors)
    v = rng.standard_normal(out.shape)
    out.backward(tu.tensor(v, dtype=np.float64, backend=backend))
    grads = [t.grad.numpy() if t.grad is not None else np.zeros(t.shape) for t in tensors]

    def probe(step, directions_):
        shifted = [a + step * u for a, u in zip(inputs, directions_, strict=True)]
        with tu.no_grad():
            return float((fn(*_tensors(shifted, backend, False)).numpy() * v).sum())

    for _ in range(directions):
        us = [rng.standard_normal(np.shape(a)) for a in inputs]
        numeric = (probe(EPS, us) - probe(-EPS, us)) / (2 * EPS)
        analytic = sum(float((g * u).sum()) for g, u in zip(grads, us, strict=True))
        scale = 1 + sum(float((np.abs(g) * np.abs(u)).sum()) for g, u in zip(grads, us,
                                                                             strict=True))
        assert abs(numeric - analytic) <= RTOL * scale, (
            f"directional derivative: finite differences {numeric!r}, backward {analytic!r}"
        )
    return grads
