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


# ---- tensor() copies; from_numpy() shares ---------------------------------------------------

def test_tensor_copies_the_callers_array(backend):
    """Changing the array after the forward pass must not change the gradients."""
    image = np.ones((1, 1, 4, 4), dtype=np.float32)
    weight = tu.tensor(np.full((1, 1, 3, 3), 0.5), requires_grad=True, backend=backend)
    x = tu.tensor(image, backend=backend)
    loss = tu.functional.conv2d(x, weight, padding=1).sum()
    image[:] = 0.0  # the caller reuses its buffer
    loss.backward()
    assert float(np.abs(weight.grad.numpy()).sum()) > 0
    np.testing.assert_array_equal(x.numpy(), np.ones((1, 1, 4, 4)))
    # A Tensor given to tensor() is copied too.
    y = tu.tensor(x, backend=backend)
    y.data[...] = 7
    np.testing.assert_array_equal(x.numpy(), np.ones((1, 1, 4, 4)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_from_numpy_shares_memory_and_keeps_the_dtype(backend, dtype):
    array = np.arange(6, dtype=dtype).reshape(2, 3)
    try:
        t = tu.from_numpy(array, backend=backend)
    except tu.ShapeError as error:  # a GPU backend's arrays can't share host memory
        assert backend == "cuda" and "from_numpy" in str(error)
        return
    assert t.dtype == dtype and t.shape == (2, 3) and not t.requires_grad
    array[0, 0] = 41
    assert t.numpy()[0, 0] == 41


def test_from_numpy_refuses_what_it_cannot_share():
    with pytest.raises(tu.ShapeError, match=r"from_numpy: Expect: a numpy array.*list"):
        tu.from_numpy([1.0, 2.0], backend="numpy")
    with pytest.raises(tu.ShapeError, match=r"from_numpy: Expect: .*Actual: dtype object"):
        tu.from_numpy(np.array([None, 1]), backend="numpy")
