"""The autograd engine: graph walking, accumulation, no_grad, detach, memory release."""

import gc
import weakref

import numpy as np
import pytest

import tinyunet as tu
import tinyunet.functional as F


def test_long_chain_backpropagates_without_recursion():
    x = tu.tensor(np.array([1.0]), requires_grad=True, dtype=np.float64)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1.0001**5000], rtol=1e-10)


def test_gradients_accumulate_over_reuse():
    x = tu.tensor(np.array([3.0, -2.0]), requires_grad=True, dtype=np.float64)
    (x * x + x + x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * np.array([3.0, -2.0]) + 2)


def test_diamond_graph():
    x = tu.tensor(np.array([2.0]), requires_grad=True, dtype=np.float64)
    a, b = x * 3, x * x
    (a * b).sum().backward()  # d(3x^3)/dx = 9x^2
    np.testing.assert_allclose(x.grad.numpy(), [36.0])


def test_backward_twice_accumulates_into_leaves():
    x = tu.tensor(np.ones(2), requires_grad=True)
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None


def test_no_grad_records_nothing():
    x = tu.tensor(np.ones((1, 1, 4, 4)), requires_grad=True)
    w = tu.tensor(np.ones((1, 1, 3, 3)), requires_grad=True)
    with tu.no_grad():
        y = F.relu(F.conv2d(x, w, padding=1))
    assert not y.requires_grad and y.is_leaf
    assert tu.is_grad_enabled()


def test_detach_cuts_the_graph():
    x = tu.tensor(np.array([2.0]), requires_grad=True)
    y = (x * x).detach() * x
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [4.0])  # the detached x*x is a constant


def test_intermediates_are_released_after_backward():
    x = tu.tensor(np.ones((1, 1, 6, 6)), requires_grad=True)
    w = tu.tensor(np.ones((2, 1, 3, 3)), requires_grad=True)
    hidden = F.relu(F.conv2d(x, w))
    saved = weakref.ref(hidden._node.ctx.saved[0])
    loss = F.max_pool2d(hidden, 2).sum()
    del hidden
    loss.backward()
    gc.collect()
    assert saved() is None
    assert not loss.is_leaf  # still a graph output, now with its saved values released


def test_the_graph_holds_no_activation_that_backward_does_not_need():
    """A conv's output is dead once its ReLU has run (ReLU saves its own output)."""
    x = tu.tensor(np.ones((1, 1, 6, 6)), requires_grad=True)
    w = tu.tensor(np.ones((2, 1, 3, 3)), requires_grad=True)
    pre_activation = F.conv2d(x, w)
    released = weakref.ref(pre_activation.data)
    out = F.relu(pre_activation)
    del pre_activation
    gc.collect()
    assert released() is None
    out.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), np.full((2, 1, 3, 3), 16.0))


def test_retain_graph_allows_a_second_backward():
    x = tu.tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [4.0, 8.0])


def test_output_gradient_takes_the_output_dtype():
    x = tu.tensor(np.array([1.0, 2.0]), requires_grad=True)  # float32
    (x * 2).backward(np.array([1.0, 1.0]))  # a float64 output gradient
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])


def test_cast_sends_the_gradient_back_in_the_input_dtype():
    x = tu.tensor(np.array([1.5, -2.0]), requires_grad=True)  # float32
    y = x.astype(np.float64)
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, -4.0])


def test_tensor_basics():
    x = tu.tensor([[1, 2], [3, 4]])
    assert x.dtype == np.int64 and x.shape == (2, 2)
    y = tu.tensor([[1, 2], [3, 4]], dtype=np.float64, requires_grad=True)
    assert y.dtype == np.float64 and y.requires_grad
    assert tu.tensor(np.ones(3)).dtype == np.float32
    assert tu.tensor(np.array([5.0])).item() == 5.0
    moved = y.to("numpy")
    assert moved.backend.name == "numpy"
    np.testing.assert_array_equal(moved.numpy(), y.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_is_stable_for_large_logits(backend, dtype):
    z = tu.tensor(np.array([[-100.0, 100.0, -100.0, 100.0]]), requires_grad=True, dtype=dtype,
                  backend=backend)
    target = tu.tensor(np.array([[0.0, 1.0, 1.0, 0.0]]), dtype=dtype, backend=backend)
    loss = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    np.testing.assert_allclose(loss.numpy(), [[0.0, 0.0, 100.0, 100.0]], atol=1e-6)
    loss.sum().backward()
    np.testing.assert_allclose(z.grad.numpy(), [[0.0, 0.0, -1.0, 1.0]], atol=1e-6)
    x = tu.tensor(np.array([-100.0, 100.0]), requires_grad=True, dtype=dtype, backend=backend)
    p = F.sigmoid(x)
    np.testing.assert_allclose(p.numpy(), [0.0, 1.0], atol=1e-30)
    p.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0.0, 0.0], atol=1e-30)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_losses_are_stable_for_large_logits(backend, dtype):
    z = tu.tensor(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]]).reshape(1, 2, 2, 1),
                  requires_grad=True, dtype=dtype, backend=backend)
    labels = tu.tensor(np.array([[[1], [1]]]), backend=backend)
    loss = F.cross_entropy(z, labels) + F.dice_loss(z, labels)
    loss.backward()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(z.grad.numpy()))
    np.testing.assert_allclose(F.cross_entropy(z, labels, reduction="none").numpy(),
                               [[[2000.0], [0.0]]])
