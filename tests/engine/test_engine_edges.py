"""Engine edge cases found by the drill of issue 19: many parameters on the numba
backend, tensor() copying its input, and ops on empty or unusual inputs giving the same
result (or the same clear error) on every backend."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SIMULATED_GPU, budget, size_limit

import tinyunet as tu
from tinyunet import optim
from tinyunet.nn import Parameter

# ---- optimizers over more parameter tensors than one numba tuple may hold ----------------

# numba refuses tuples of more than 100 entries in its parallel loops. On numba the
# parameters hold more elements than it updates serially; elsewhere they are small (the
# simulated GPU runs a thread per element).
MANY = 130


def _many_parameters(backend, sides, steps, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(*sides)), int(rng.integers(*sides))) for _ in range(MANY)]
    params = [Parameter(rng.standard_normal(shape), backend=backend) for shape in shapes]
    grads = [[rng.standard_normal(shape) for shape in shapes] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: optim.SGD(ps, lr=0.1),
    lambda ps: optim.Adam(ps, lr=0.01),
    lambda ps: optim.AdamW(ps, lr=0.01),
], ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_an_optimizer_steps_over_any_number_of_parameters(backend, make):
    results = {}
    sides = (8, 17) if backend == "numba" else (1, 4)
    steps = 1 if backend == "cuda" and SIMULATED_GPU else 3  # a launch per parameter
    for name in ("numpy", backend):
        params, grads = _many_parameters(name, sides, steps)
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


# ---- the same result or the same clear error on every backend ----------------------------

# Each edge says what every backend must do with it: "result" (the numpy reference's
# values and gradients) or "error" (the same ShapeError message).
EDGES = {
    "empty batch": "result",
    "numpy integer arguments": "result",
    "no input channels": "error",
    "no output channels": "error",
    "float16": "error",
}
CONVS = ("conv2d", "conv2d_relu", "conv_transpose2d", "conv_transpose2d_concat")
LOSSES = ("dice_loss", "iou_loss", "binary_cross_entropy_with_logits", "cross_entropy",
          "bce_dice_loss")


@st.composite
def edge_cases(draw, limit):
    op = draw(st.sampled_from(CONVS + ("max_pool2d",) + LOSSES))
    edges = ["empty batch"]
    if op in CONVS:
        edges += ["numpy integer arguments", "no input channels", "no output channels",
                  "float16"]
    elif op == "max_pool2d":
        edges += ["numpy integer arguments"]
    edge = draw(st.sampled_from(edges))
    n = 0 if edge == "empty batch" else draw(st.integers(1, limit.batch))
    c_in = 0 if edge == "no input channels" else draw(st.integers(1, limit.channels))
    c_out = 0 if edge == "no output channels" else draw(st.integers(1, limit.channels))
    if op in ("cross_entropy",) or (op in LOSSES and draw(st.booleans())):
        c_out = max(c_out, 2)  # softmax logits
    elif op in LOSSES:
        c_out = 1
    side = draw(st.integers(2, limit.side))
    dtype = np.float16 if edge == "float16" else np.float32
    return dict(op=op, edge=edge, n=n, c_in=c_in, c_out=c_out, side=side, dtype=dtype,
                seed=draw(st.integers(0, 2**16)),
                integer=np.int64 if edge == "numpy integer arguments" else int)


def _edge_outcome(case, backend):
    """("result", arrays) or ("error", message) of one case's forward and backward."""
    rng = np.random.default_rng(case["seed"])
    op, n, c_in, c_out, side = (case[k] for k in ("op", "n", "c_in", "c_out", "side"))
    integer, dtype = case["integer"], case["dtype"]
    F = tu.functional

    def leaf(*shape):
        return tu.tensor(rng.standard_normal(shape), dtype=dtype, requires_grad=True,
                         backend=backend)

    try:
        if op in ("conv2d", "conv2d_relu"):
            inputs = [leaf(n, c_in, side, side), leaf(c_out, c_in, 2, 2), leaf(c_out)]
            output = getattr(F, op)(*inputs, stride=integer(1), padding=integer(1),
                                    dilation=integer(1))
        elif op == "conv_transpose2d":
            inputs = [leaf(n, c_in, side, side), leaf(c_in, c_out, 2, 2), leaf(c_out)]
            output = F.conv_transpose2d(*inputs, stride=integer(2), padding=integer(0))
        elif op == "conv_transpose2d_concat":
            inputs = [leaf(n, 1, 2 * side, 2 * side), leaf(n, c_in, side, side),
                      leaf(c_in, c_out, 2, 2), leaf(c_out)]
            output = F.conv_transpose2d_concat(*inputs, stride=integer(2))
        elif op == "max_pool2d":
            inputs = [leaf(n, c_in, side, side)]
            output = F.max_pool2d(inputs[0], integer(2), stride=integer(1))
        else:
            inputs = [leaf(n, c_out, side, side)]
            labels = rng.integers(0, c_out, (n, side, side)) if c_out > 1 else None
            if op == "binary_cross_entropy_with_logits" or (labels is None
                                                              and op != "cross_entropy"):
                target = tu.tensor(rng.random((n, 1, side, side)) > 0.5, dtype=dtype,
                                   backend=backend)
            else:
                target = tu.tensor(labels, backend=backend)
            if op == "binary_cross_entropy_with_logits" and c_out > 1:
                target = tu.tensor(rng.random((n, c_out, side, side)), dtype=dtype,
                                   backend=backend)
            output = getattr(F, op)(inputs[0], target)
        (output * output).sum().backward()
    except tu.ShapeError as error:
        return "error", str(error)
    return "result", [output.numpy()] + [t.grad.numpy() for t in inputs]


@pytest.mark.filterwarnings("error")  # no numpy warnings about empty means either
def test_edge_cases_agree_on_every_backend(backend):
    @budget(backend)
    @given(case=edge_cases(size_limit(backend)))
    def check(case):
        expected = _edge_outcome(case, "numpy")
        assert expected[0] == EDGES[case["edge"]], (case, expected)
        if expected[0] == "error":
            assert "Expect:" in expected[1] and "Actual:" in expected[1]
        actual = _edge_outcome(case, backend)
        assert actual[0] == expected[0], (case, actual, expected)
        if actual[0] == "error":
            assert actual[1] == expected[1]
            return
        for ours, reference in zip(actual[1], expected[1], strict=True):
            assert ours.shape == reference.shape and ours.dtype == reference.dtype
            np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
        if case["edge"] == "numpy integer arguments":  # the same as plain ints
            plain = _edge_outcome(dict(case, integer=int), backend)
            for ours, reference in zip(actual[1], plain[1], strict=True):
                np.testing.assert_array_equal(ours, reference)

    check()
