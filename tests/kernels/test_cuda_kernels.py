"""The cuda backend's kernels equal the numpy reference backend.

Without a GPU they run under Numba's CUDA simulator (conftest.py turns it on), one
simulated thread costing about a millisecond, so shapes stay small while still
crossing the padding, the strides and several grid-stride rounds of the 32-thread
launch. On a real GPU (NUMBA_ENABLE_CUDASIM=0) they draw more and larger cases.
Tolerances: gathers add the same terms as numpy in another order (1e-12 relative in
float64); the Dice/IoU block reduction sums in float64 partials (1e-12 relative).
"""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import SIMULATED_GPU, conv_geometries, pool_cases, size_limit

import tinyunet as tu

pytestmark = pytest.mark.skipif("cuda" not in tu.available_backends(),
                                reason="the cuda backend (GPU or simulator) is not available")

CUDA_EXAMPLES = settings(max_examples=6 if SIMULATED_GPU else 20)


def on_gpu(backend, *arrays):
    """Device copies of host arrays (numpy arrays themselves under the simulator)."""
    return [backend.asarray(a) for a in arrays]


@CUDA_EXAMPLES
@given(problem=conv_geometries(size_limit("cuda"), max_pad=2))
def test_conv_kernels_match_numpy(problem):
    x_shape, w_shape, geometry, seed = problem
    cuda, numpy_ = tu.get_backend("cuda"), tu.get_backend("numpy")
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = numpy_.conv2d(x, w, geometry)
    dy = rng.standard_normal(y.shape)
    on_device = on_gpu(cuda, x, w, dy)
    for ours, ref in [
        (cuda.conv2d(on_device[0], on_device[1], geometry), y),
        (cuda.conv2d_grad_input(on_device[2], on_device[1], geometry, x_shape[2:]),
         numpy_.conv2d_grad_input(dy, w, geometry, x_shape[2:])),
        (cuda.conv2d_grad_weight(on_device[2], on_device[0], geometry, w_shape[2:]),
         numpy_.conv2d_grad_weight(dy, x, geometry, w_shape[2:])),
    ]:
        np.testing.assert_allclose(cuda.to_numpy(ours), ref, rtol=1e-12, atol=1e-12)


@CUDA_EXAMPLES
@given(case=pool_cases(size_limit("cuda")), ties=st.booleans())
def test_pool_kernels_match_numpy_including_ties(case, ties):
    shape, geometry = case.x_shape, case.geometry
    cuda, numpy_ = tu.get_backend("cuda"), tu.get_backend("numpy")
    rng = np.random.default_rng(case.seed)
    # Few distinct values force ties, which both must break toward the first maximum.
    x = rng.integers(0, 3, shape).astype(float) if ties else rng.standard_normal(shape)
    y, argmax = cuda.max_pool2d(cuda.asarray(x), geometry)
    y_ref, argmax_ref = numpy_.max_pool2d(x, geometry)
    np.testing.assert_array_equal(cuda.to_numpy(y), y_ref)
    np.testing.assert_array_equal(cuda.to_numpy(argmax), argmax_ref)
    dy = rng.standard_normal(y.shape)
    dx = cuda.max_pool2d_backward(cuda.asarray(dy), argmax, shape, geometry)
    np.testing.assert_allclose(cuda.to_numpy(dx),
                               numpy_.max_pool2d_backward(dy, argmax_ref, shape, geometry),
                               rtol=1e-12, atol=1e-12)


@CUDA_EXAMPLES
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5),
                       st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_elementwise_and_reduction_kernels(shape, seed):
    cuda, numpy_ = tu.get_backend("cuda"), tu.get_backend("numpy")
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    x_dev, dy_dev, y_dev = on_gpu(cuda, x, dy, numpy_.relu(x))
    host = cuda.to_numpy
    np.testing.assert_array_equal(host(cuda.relu(x_dev)), numpy_.relu(x))
    np.testing.assert_array_equal(host(cuda.relu_backward(dy_dev, y_dev)),
                                  numpy_.relu_backward(dy, numpy_.relu(x)))
    bias = rng.standard_normal(shape[1])
    np.testing.assert_allclose(host(cuda.add_bias(cuda.asarray(x.copy()), cuda.asarray(bias))),
                               numpy_.add_bias(x.copy(), bias), rtol=1e-15)
    p, t = rng.random(shape), (rng.random(shape) > 0.5).astype(float)
    for first_axis in (1, 2):
        for ours, ref in zip(cuda.overlap_sums(*on_gpu(cuda, p, t), first_axis),
                             numpy_.overlap_sums(p, t, first_axis), strict=True):
            assert ours.shape == ref.shape
            np.testing.assert_allclose(host(ours), ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_kernels_match_numpy(dtype):
    cuda, numpy_ = tu.get_backend("cuda"), tu.get_backend("numpy")
    rng = np.random.default_rng(0)
    shapes = [(3, 2, 3, 3), (3,), (40,)]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    for first_step in (True, False):
        states = []
        for backend in (cuda, numpy_):
            params = on_gpu(backend, *[np.linspace(-1, 1, int(np.prod(s))).reshape(s)
                                       .astype(dtype) for s in shapes])
            buffers = on_gpu(backend, *[np.full(s, 0.5, dtype) for s in shapes])
            backend.sgd_update(params, on_gpu(backend, *grads), buffers, 0.1, 0.9, 0.1, False,
                               0.01, first_step)
            m = on_gpu(backend, *[np.full(s, 0.1, dtype) for s in shapes])
            v = on_gpu(backend, *[np.full(s, 0.2, dtype) for s in shapes])
            backend.adam_update(params, on_gpu(backend, *grads), m, v, 3, 0.01, 0.9, 0.999,
                                1e-8, 0.01, True)
            states.append([backend.to_numpy(a) for a in params + buffers + m + v])
        rtol = 1e-6 if dtype == np.float32 else 1e-12
        for ours, ref in zip(*states, strict=True):
            np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol)


def test_only_numbas_low_occupancy_warning_is_silenced():
    from tinyunet.backends.cuda_backend import CudaBackend

    # A fresh backend: pytest restores the warning filters after each test.
    CudaBackend()
    # The message as numba's CUDA target words it, bold codes included.
    occupancy = ("\x1b[1mGrid size 3 will likely result in GPU under-utilization due to low "
                 "occupancy.\x1b[0m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(occupancy, RuntimeWarning, stacklevel=1)
        warnings.warn("some other performance warning", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other performance warning"]
