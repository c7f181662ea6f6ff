"""Tensor and reverse-mode automatic differentiation.

A ``Tensor`` wraps one backend array (shape convention for images: (N, C, H, W)).
Every op is a ``Function`` subclass with a static ``forward(ctx, ...)`` that works on
raw backend arrays and a static ``backward(ctx, grad)`` that returns one gradient per
tensor input. ``Function.apply`` runs the forward and, when gradients are wanted,
records a node in the graph. ``Tensor.backward`` walks that graph in reverse
topological order without recursion, so graphs of any depth are fine. It releases
each node's saved arrays once used, so a second backward through the same graph raises
unless the first was given ``retain_graph=True``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .errors import check, fail

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Context manager in which ops record no graph (inference, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class Context:
    """What a Function's forward leaves for its backward."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.saved: tuple = ()
        self.needs_input_grad: tuple[bool, ...] = ()

    def save_for_backward(self, *values):
        self.saved = values


class Node:
    """One recorded Function application: the context to differentiate it and where the
    gradients of its inputs go.

    ``inputs`` has one entry per tensor argument: the Node that computed it, the leaf
    Tensor itself (its gradient lands in ``.grad``), or None where no gradient flows.
    The graph never holds an intermediate Tensor, so an activation no backward needs
    (a conv's output once its ReLU has run) is freed as soon as the forward moves on.
    ``shape`` is the output's, to check the gradients that arrive. A backward that has
    used a node sets its ``ctx`` to None (its saved arrays released).
    """

    __slots__ = ("function", "ctx", "inputs", "shape")

    def __init__(self, function, ctx, inputs, shape):
        self.function = function
        self.ctx = ctx
        self.inputs = inputs
        self.shape = shape


def _graph_input(tensor):
    """What a Node keeps of one of its inputs (see Node)."""
    if not tensor.requires_grad:
        return None
    return tensor if tensor._node is None else tensor._node


class Function:
    """Base class of every differentiable op.

    Subclasses define ``forward(ctx, *args, **kwargs)`` on backend arrays (Tensor
    arguments arrive unwrapped) and ``backward(ctx, grad)`` returning a tuple with one
    entry per Tensor argument, in order (None where no gradient flows).
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, Tensor)]
        backend = tensors[0].backend
        for t in tensors[1:]:
            if t.backend is not backend:
                fail(
                    cls.__name__,
                    f"all tensors on backend '{backend.name}'",
                    f"a tensor on backend '{t.backend.name}'",
                )
        ctx = Context(backend)
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        out = cls.forward(ctx, *raw, **kwargs)
        requires_grad = _grad_enabled and any(t.requires_grad for t in tensors)
        result = Tensor._wrap(out, backend, requires_grad)
        if requires_grad:
            ctx.needs_input_grad = tuple(t.requires_grad for t in tensors)
            result._node = Node(cls, ctx, [_graph_input(t) for t in tensors], result.shape)
        return result


class Tensor:
    """An n-dimensional array on a backend, with an optional gradient."""

    __array_priority__ = 1000  # so numpy scalars on the left defer to Tensor operators

    def __init__(self, data, requires_grad: bool = False, backend: Backend | str | None = None):
        self.backend = get_backend(backend)
        self.data = data
        self.requires_grad = requires_grad
        self.grad: Tensor | None = None
        self._node: Node | None = None

    @classmethod
    def _wrap(cls, data, backend, requires_grad=False):
        t = cls.__new__(cls)
        t.backend, t.data, t.requires_grad, t.grad, t._node = (
            backend,
            data,
            requires_grad,
            None,
            None,
        )
        return t

    # ---- plain properties -------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def numel(self) -> int:
        return math.prod(self.shape)

    def numpy(self) -> np.ndarray:
        """A host numpy copy of the data."""
        return self.backend.to_numpy(self.data)

    def item(self) -> float:
        check(self.numel() == 1, "item", "a tensor with one element", f"shape {self.shape}")
        return float(self.numpy().reshape(()))

    def detach(self) -> Tensor:
        """The same data, cut off from the graph."""
        return Tensor._wrap(self.data, self.backend, False)

    def to(self, backend: Backend | str) -> Tensor:
        """A copy on another backend: a new leaf, so no gradient flows back across."""
        target = get_backend(backend)
        if target is self.backend:
            return self
        return Tensor._wrap(target.asarray(self.numpy()), target, self.requires_grad)

    def astype(self, dtype) -> Tensor:
        from .ops.elementwise import Cast

        return Cast.apply(self, dtype=np.dtype(dtype))

    def zero_grad(self):
        self.grad = None

    def requires_grad_(self, flag: bool = True) -> Tensor:
        self.requires_grad = flag
        return self

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (
            f"Tensor(shape={self.shape}, dtype={self.dtype}, "
            f"backend='{self.backend.name}'{grad})"
        )

    def __len__(self):
        return self.shape[0]

    # ---- reverse mode -----------------------------------------------------------
    def backward(self, grad: Tensor | None = None, retain_graph: bool = False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the gradient flowing into ``self``; it may be omitted only for a
        tensor with one element. Saved intermediates are released afterwards unless
        ``retain_graph`` is set.
        """
        check(
            self.requires_grad,
            "backward",
            "a tensor that requires grad",
            "a tensor with requires_grad=False (no graph was recorded)",
        )
        if grad is None:
            check(
                self.numel() == 1,
                "backward",
                "a scalar output, or an explicit gradient of the output's shape",
                f"an output of shape {self.shape} and no gradient",
            )
            seed = self.backend.xp.ones(self.data.shape, dtype=self.data.dtype)
        else:
            seed = grad.data if isinstance(grad, Tensor) else self.backend.asarray(grad)
            # As in PyTorch, the output gradient takes the output's dtype.
            seed = seed.astype(self.data.dtype, copy=False)
            check(
                tuple(seed.shape) == self.shape,
                "backward",
                f"a gradient of shape {self.shape}",
                f"shape {tuple(seed.shape)}",
            )

        if self._node is None:
            _accumulate_leaf(self, seed)
            return
        grads = {id(self._node): seed}
        leaf_grads: dict[int, tuple[Tensor, Any]] = {}
        for node in reversed(_topological_order(self._node)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node.ctx is None:
                fail(
                    "backward",
                    "a graph not yet backpropagated (use retain_graph=True to go through it "
                    "twice)",
                    f"a path through a {node.function.__name__} whose saved values an earlier "
                    "backward released",
                )
            input_grads = node.function.backward(node.ctx, g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for inp, ig in zip(node.inputs, input_grads, strict=True):
                if ig is None or inp is None:
                    continue
                if tuple(ig.shape) != tuple(inp.shape):
                    fail(
                        f"{node.function.__name__}.backward",
                        f"an input gradient of shape {tuple(inp.shape)}",
                        f"shape {tuple(ig.shape)}",
                    )
                key = id(inp)
                if isinstance(inp, Node):
                    grads[key] = ig if key not in grads else grads[key] + ig
                else:
                    # Leaves are summed here and written once all their paths are in.
                    total = leaf_grads[key][1] + ig if key in leaf_grads else ig
                    leaf_grads[key] = (inp, total)
            if not retain_graph:
                # Frees the saved activations, and the graph above them, as soon as they
                # are used.
                node.ctx = None
                node.inputs = ()
        for leaf, g in leaf_grads.values():
            _accumulate_leaf(leaf, g)

    # ---- operators (defined in ops; bound here for a PyTorch feel) ---------------
    def __add__(self, other):
        from .ops.elementwise import add

        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        from .ops.elementwise import add, neg

        return add(self, neg(_as_tensor(other, self)))

    def __rsub__(self, other):
        from .ops.elementwise import add, neg

        return add(_as_tensor(other, self), neg(self))

    def __mul__(self, other):
        from .ops.elementwise import mul

        return mul(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        from .ops.elementwise import div

        return div(self, other)

    def __rtruediv__(self, other):
        from .ops.elementwise import div

        return div(_as_tensor(other, self), self)

    def __neg__(self):
        from .ops.elementwise import neg

        return neg(self)

    def __pow__(self, exponent):
        from .ops.elementwise import power

        return power(self, exponent)

    def sum(self, dim=None, keepdim=False):
        from .ops.elementwise import sum as sum_

        return sum_(self, dim=dim, keepdim=keepdim)

    def mean(self, dim=None, keepdim=False):
        from .ops.elementwise import mean

        return mean(self, dim=dim, keepdim=keepdim)

    def reshape(self, *shape):
        from .ops.elementwise import reshape

        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)


def _as_tensor(value, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return Tensor._wrap(like.backend.xp.asarray(value, dtype=like.data.dtype), like.backend)


def _topological_order(root: Node) -> list[Node]:
    """Nodes of the graph under ``root``, each after the nodes of its inputs (iterative DFS)."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for inp in node.inputs:
            if isinstance(inp, Node) and id(inp) not in visited:
                stack.append((inp, False))
    return order


def _accumulate_leaf(tensor: Tensor, g):
    if tensor.grad is None:
        # A fresh array, so a later in-place accumulation never aliases a graph buffer.
        tensor.grad = Tensor._wrap(g.copy(), tensor.backend)
    else:
        tensor.grad.data = tensor.grad.data + g


def tensor(array, requires_grad: bool = False, dtype=None, backend: Backend | str | None = None):
    """Build a Tensor from array-like data (float32 unless ``dtype`` says otherwise).

    Integer input keeps its integer dtype (class labels for cross-entropy). The data is
    always copied, as ``torch.tensor`` does: changing ``array`` later changes nothing
    here (``from_numpy`` shares the array's memory instead).
    """
    b = get_backend(backend)
    if isinstance(array, Tensor):
        array = array.numpy()
    host = np.asarray(array)
    if dtype is None:
        dtype = host.dtype if host.dtype.kind in "iub" else np.float32
    data = b.asarray(host.astype(dtype, copy=False))
    # A CPU backend keeps the numpy array it is given; astype copies only to convert.
    if isinstance(data, np.ndarray) and np.may_share_memory(data, host):
        data = data.copy()
    if requires_grad:
        check(
            np.dtype(dtype).kind == "f",
            "tensor",
            "a floating dtype for requires_grad=True",
            f"dtype {np.dtype(dtype)}",
        )
    return Tensor._wrap(data, b, requires_grad)


def from_numpy(array: np.ndarray, backend: Backend | str | None = None) -> Tensor:
    """A Tensor that shares ``array``'s memory, as ``torch.from_numpy``: writes to either
    show in both. The dtype is kept (float64 stays float64) and no gradient is recorded
    (``requires_grad`` is False). Only backends whose arrays are numpy arrays (numpy,
    numba) can share; use ``tensor`` to copy onto another backend.
    """
    b = get_backend(backend)
    if not isinstance(array, np.ndarray):
        fail("from_numpy", "a numpy array", f"{type(array).__name__}")
    if array.dtype.kind not in "biuf":
        fail("from_numpy", "a numeric or boolean dtype", f"dtype {array.dtype}")
    data = b.asarray(array)
    if not (isinstance(data, np.ndarray) and np.may_share_memory(data, array)):
        fail("from_numpy", "a backend whose arrays are numpy arrays (numpy, numba), so "
             "that memory can be shared", f"backend '{b.name}'; use tensor() to copy")
    return Tensor._wrap(data, b, False)
