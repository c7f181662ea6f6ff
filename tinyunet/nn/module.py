"""Module and Parameter: named, nested containers of trainable tensors, as in PyTorch."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..autograd import Tensor
from ..backends import Backend, get_backend
from ..errors import check


class Parameter(Tensor):
    """A leaf tensor that a Module trains (requires_grad is always on)."""

    def __init__(self, data, backend: Backend | str | None = None):
        backend = get_backend(backend)
        super().__init__(backend.asarray(np.asarray(data)), requires_grad=True, backend=backend)


class Module:
    """Base class of layers and models.

    Assigning a Parameter or a Module to an attribute registers it, so
    ``named_parameters`` can walk the tree ("encoders.0.conv1.weight").
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- the tree -------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        yield from self._modules.items()

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def modules(self) -> Iterator[Module]:
        yield self
        for child in self.children():
            yield from child.modules()

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
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, backend: Backend | str) -> Module:
        """Move every parameter to ``backend`` (in place) and return self."""
        target = get_backend(backend)
        for parameter in self.parameters():
            if parameter.backend is not target:
                parameter.data = target.asarray(parameter.numpy())
                parameter.backend = target
                parameter.grad = None
        return self

    # ---- saving and loading ----------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter, by dotted name."""
        return {name: p.numpy().copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy ``state``'s arrays into the parameters; ``strict`` demands the same keys."""
        own = dict(self.named_parameters())
        if strict:
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            check(not missing, "load_state_dict", "every parameter of the model in the state",
                  f"missing keys {missing}")
            check(not unexpected, "load_state_dict", "only the model's parameters in the state",
                  f"unexpected keys {unexpected}")
        for name, value in state.items():
            if name not in own:
                continue
            parameter, value = own[name], np.asarray(value)
            check(value.shape == parameter.shape, "load_state_dict",
                  f"'{name}' of shape {parameter.shape}", f"shape {value.shape}")
            parameter.data = parameter.backend.asarray(value.astype(parameter.dtype))
            parameter.grad = None
