"""Engine edge cases found by the drill of issue 19: many parameters on the numba
backend, tensor() copying its input, and ops on empty or unusual inputs giving the same
result (or the same clear error) on every backend."""

import numpy as np
import pytest

import tinyunet as tu
from tinyunet import optim
from tinyunet.nn import Parameter

# ---- optimizers over more parameter tensors than one numba tuple may hold ----------------

# numba refuses tuples of more than 100 entries in its parallel loops; together the
# parameters hold more elements than the numba backend updates serially.
MANY = 130


def _many_parameters(backend, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(8, 17)), int(rng.integers(8, 17))) for _ in range(MANY)]
    params = [Parameter(rng.standard_normal(shape), backend=backend) for shape in shapes]
    grads = [[rng.standard_normal(shape) for shape in shapes] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: optim.SGD(ps, lr=0.1),
    lambda ps: optim.Adam(ps, lr=0.01),
    lambda ps: optim.AdamW(ps, lr=0.01),
], ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_an_optimizer_steps_over_any_number_of_parameters(backend, make):
    results = {}
    for name in ("numpy", backend):
        params, grads = _many_parameters(name)
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = tu.tensor(g, backend=name)
            opt.step()
        results[name] = [p.numpy() for p in params]
    for ours, reference in zip(results[backend], results["numpy"], strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
