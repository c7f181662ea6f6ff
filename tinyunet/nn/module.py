"""Module and Parameter: named, nested containers of trainable tensors, as in PyTorch.

Parameters live on a backend (the default one, ``tu.get_backend()``, unless moved with
``Module.to``); ``state_dict`` holds host numpy copies, so it can be saved anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..autograd import Tensor
from ..backends import Backend, get_backend
from ..errors import check


def _host(value) -> np.ndarray:
    return value.numpy() if isinstance(value, Tensor) else np.asarray(value)


class Parameter(Tensor):
    """A leaf tensor that a Module trains (requires_grad is always on).

    ``data`` is an array-like or a Tensor; its dtype is kept (layers create float32).
    """

    def __init__(self, data, backend: Backend | str | None = None):
        backend = get_backend(backend)
        super().__init__(backend.asarray(_host(data)), requires_grad=True, backend=backend)


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it under that name, so
    ``named_parameters`` walks the tree in registration order with dotted names
    ("encoders.0.conv1.weight"). ``model(x)`` calls ``forward``.
    """

    _parameters: dict[str, Parameter]
    _modules: dict[str, Module]
    training: bool

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        # A re-assignment replaces the registration (e.g. a layer's bias set to None).
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- the tree -------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """(dotted name, module) for this module ("") and every descendant, depth first."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, parameter in self._parameters.items():
            yield prefix + name, parameter
        for name, child in self._modules.items():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> Iterator[Parameter]:
        for _, parameter in self.named_parameters():
            yield parameter

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- modes and housekeeping ------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set ``training`` on this module and all below it (no layer here depends on it)."""
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, backend: Backend | str) -> Module:
        """Move every parameter to ``backend`` in place (gradients are dropped); returns self.

        The Parameter objects stay the same, but build the optimizer after moving, so
        that its buffers live on the same backend.
        """
        target = get_backend(backend)
        for parameter in self.parameters():
            if parameter.backend is not target:
                parameter.data = target.asarray(parameter.numpy())
                parameter.backend = target
                parameter.grad = None
        return self

    # ---- saving and loading ----------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host numpy copies of every parameter, by dotted name, in registration order."""
        return {name: np.array(p.numpy(), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy ``state``'s arrays into the parameters (cast to each parameter's dtype).

        ``strict`` demands exactly the model's keys; with ``strict=False`` missing and
        unexpected keys are skipped. A shape mismatch is an error either way. Raises
        ShapeError naming the keys, or the key and both shapes; nothing is copied then.
        """
        own = dict(self.named_parameters())
        if strict:
            missing = [name for name in own if name not in state]
            unexpected = [name for name in state if name not in own]
            check(not missing, "load_state_dict", "every parameter of the model in the state",
                  f"missing keys {missing}")
            check(not unexpected, "load_state_dict", "only the model's parameters in the state",
                  f"unexpected keys {unexpected}")
        updates = []
        for name, value in state.items():
            if name not in own:
                continue
            parameter, value = own[name], _host(value)
            check(value.shape == parameter.shape, "load_state_dict",
                  f"'{name}' of shape {parameter.shape}", f"'{name}' of shape {value.shape}")
            updates.append((parameter, value))
        for parameter, value in updates:
            parameter.data = parameter.backend.asarray(value.astype(parameter.dtype))
            parameter.grad = None

    # ---- printing ----------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The constructor arguments shown by ``repr`` (layers override it)."""
        return ""

    def __repr__(self):
        lines = [f"({name}): {child!r}".replace("\n", "\n  ")
                 for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"
