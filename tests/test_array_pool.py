"""The pool that the numba backend takes its outputs from: an array is handed out again
only when nothing outside the pool refers to it, views included."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyunet.backends.array_pool import ArrayPool

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@given(shape=SHAPES, dtype=st.sampled_from([np.float32, np.float64, np.int64]))
def test_memory_comes_back_only_after_its_last_reference_goes(shape, dtype):
    pool = ArrayPool()
    first = pool.empty(shape, dtype)
    assert first.shape == shape and first.dtype == dtype and first.flags.c_contiguous
    second = pool.empty(shape, dtype)
    assert not np.shares_memory(first, second)
    view = first.reshape(-1)[1:]  # a view of a view still holds the block
    address = first.ctypes.data
    del first
    third = pool.empty(shape, dtype)
    assert third.ctypes.data != address and not np.shares_memory(third, second)
    del view
    assert pool.empty(shape, dtype).ctypes.data == address


def test_any_shape_and_dtype_of_the_same_size_reuses_a_block():
    pool = ArrayPool()
    a = pool.empty((2, 3), np.float32)
    address = a.ctypes.data
    del a
    assert pool.empty((3, 3), np.float32).ctypes.data != address  # 36 bytes, not 24
    b = pool.empty((3, 2), np.int32)  # 24 bytes: the same block
    assert b.ctypes.data == address
    del b
    c = pool.empty((3,), np.float64)
    assert c.ctypes.data == address and c.dtype == np.float64 and c.shape == (3,)


def test_idle_arrays_are_dropped_when_shapes_change():
    pool = ArrayPool()
    for side in range(1, 40):
        pool.empty((side, 64), np.float32)  # each dropped at once: all idle
    # Never more than about twice what is in use (here: nothing) plus the request.
    assert pool.nbytes <= 2 * 39 * 64 * 4


def test_a_training_step_reuses_last_steps_arrays():
    pytest.importorskip("numba")
    import tinyunet as tu
    import tinyunet.functional as F
    from tinyunet import nn, optim

    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=2, base_channels=4).to("numba")
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = tu.tensor(np.random.default_rng(0).standard_normal((2, 1, 16, 16)), dtype=np.float32,
                  backend="numba")
    target = tu.tensor((x.numpy() > 0).astype(np.float32), backend="numba")
    pool = x.backend._outputs
    sizes = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.dice_loss(model(x), target)
        loss.backward()
        optimizer.step()
        sizes.append(pool.nbytes)
    assert sizes[0] > 0 and sizes[1] == sizes[0] == sizes[2]
