"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, with PyTorch's arguments and rules.

    opt = optim.Adam(model.parameters(), lr=1e-3)
    schedule = optim.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        schedule.step()

As in PyTorch, a parameter whose ``grad`` is None is skipped by ``step()``, and its
state (momentum buffer, Adam moments and step count) starts on its first gradient.
The arithmetic of a step lives in the backend (``sgd_update``/``adam_update``), so a
fast backend can update every parameter in one fused kernel. Hyper-parameters are read
from ``param_groups[0]`` at every step, so ``opt.param_groups[0]["lr"] = 0.01`` works.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .autograd import Tensor
from .errors import check


class Optimizer:
    """Base class: one parameter group, per-parameter state, state_dict round trips."""

    # Per-parameter buffers (arrays shaped like the parameter) that the optimizer may
    # keep, and those that every started parameter has.
    buffer_names: tuple[str, ...] = ()
    required_buffers: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict):
        name = type(self).__name__
        params = list(params)
        check(len(params) > 0, name, "at least one parameter", "none")
        for index, p in enumerate(params):
            check(isinstance(p, Tensor) and p.requires_grad and p.is_leaf, name,
                  "parameters: leaf Tensors with requires_grad=True",
                  f"{p!r} at position {index}")
            check(p.backend is params[0].backend, name,
                  f"every parameter on backend '{params[0].backend.name}'",
                  f"a parameter on '{p.backend.name}' at position {index}")
        self.param_groups = [dict(defaults, params=params)]
        # One dict per parameter: its buffers and "step", filled on its first gradient.
        self.state: list[dict] = [{} for _ in params]

    @property
    def params(self) -> list:
        return self.param_groups[0]["params"]

    @property
    def backend(self):
        return self.params[0].backend

    def zero_grad(self):
        """Drop every parameter's gradient (the next backward starts from zero)."""
        for p in self.params:
            p.grad = None

    def _stepping(self) -> list[int]:
        """Indexes of the parameters that have a gradient; starts the state of new ones."""
        indexes = [i for i, p in enumerate(self.params) if p.grad is not None]
        xp = self.backend.xp
        for i in indexes:
            if not self.state[i]:
                self.state[i] = {name: xp.zeros_like(self.params[i].data)
                                 for name in self.required_buffers}
                self.state[i]["step"] = 0
        return indexes

    def step(self):
        raise NotImplementedError

    # ---- saving and loading -----------------------------------------------------------
    def state_dict(self) -> dict:
        """Hyper-parameters and per-parameter state as host numpy arrays and Python numbers.

        {"param_group": {"lr": ..., ...}, "state": [{"step": int, buffer: array}, ...]}
        with one entry per parameter, in order ({} for one that never had a gradient).
        """
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        to_host = self.backend.to_numpy
        state = [{k: (int(v) if k == "step" else np.array(to_host(v), copy=True))
                  for k, v in entry.items()} for entry in self.state]
        return {"param_group": group, "state": state}

    def load_state_dict(self, state: dict):
        """Restore what ``state_dict`` returned (for the same parameters, in the same order).

        Raises ShapeError naming the mismatch; nothing changes then.
        """
        name = f"{type(self).__name__}.load_state_dict"
        keys = sorted(state) if isinstance(state, dict) else []
        check({"param_group", "state"} <= set(keys), name,
              "a dict with 'param_group' and 'state' (from Optimizer.state_dict)",
              f"{type(state).__name__} with keys {keys}")
        entries = list(state["state"])
        check(len(entries) == len(self.params), name,
              f"state for {len(self.params)} parameters", f"state for {len(entries)}")
        restored: list[dict] = []
        for index, (entry, p) in enumerate(zip(entries, self.params, strict=True)):
            if not entry:
                restored.append({})
                continue
            entry_keys, allowed = set(entry), {"step", *self.buffer_names}
            check({"step", *self.required_buffers} <= entry_keys <= allowed, name,
                  f"parameter {index} state with 'step' and buffers among {self.buffer_names}",
                  f"keys {sorted(entry_keys)}")
            new = {"step": int(entry["step"])}
            for key in sorted(entry_keys - {"step"}):
                value = np.asarray(entry[key])
                check(value.shape == p.shape, name,
                      f"'{key}' of parameter {index} with shape {p.shape}",
                      f"shape {value.shape}")
                new[key] = self.backend.asarray(value.astype(p.dtype))
            restored.append(new)
        self.param_groups[0].update(state["param_group"])
        self.state = restored


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum, dampening and L2 weight decay, as torch.optim.SGD.

    g = grad + weight_decay * p; buf = g on a parameter's first step, else
    buf = momentum * buf + (1 - dampening) * g; the step is g + momentum * buf with
    nesterov, else buf (g itself when momentum is 0); p -= lr * step.
    """

    # Kept only with momentum (started on a parameter's first step with momentum).
    buffer_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        check(lr >= 0 and momentum >= 0 and weight_decay >= 0, "SGD",
              "lr, momentum and weight_decay of 0 or more", f"{lr}, {momentum}, {weight_decay}")
        check(not nesterov or (momentum > 0 and dampening == 0), "SGD",
              "momentum > 0 and dampening 0 with nesterov (as PyTorch)",
              f"momentum {momentum}, dampening {dampening}")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))

    def step(self):
        g = self.param_groups[0]
        indexes = self._stepping()
        fresh = set()
        if g["momentum"]:
            for i in indexes:
                if "momentum_buffer" not in self.state[i]:
                    self.state[i]["momentum_buffer"] = self.backend.xp.zeros_like(
                        self.params[i].data)
                    fresh.add(i)
        # The hook sets a momentum buffer to g on its first step, so parameters with a
        # fresh buffer and those with a running one go in separate calls.
        for first in (True, False):
            chosen = [i for i in indexes if (i in fresh) == first]
            if not chosen:
                continue
            params = [self.params[i].data for i in chosen]
            grads = [self.params[i].grad.data for i in chosen]
            # Without momentum the hook leaves the buffers untouched, so the gradients
            # stand in for them rather than allocating arrays that are never read.
            buffers = ([self.state[i]["momentum_buffer"] for i in chosen] if g["momentum"]
                       else grads)
            self.backend.sgd_update(params, grads, buffers, g["lr"], g["momentum"],
                                    g["dampening"], g["nesterov"], g["weight_decay"],
                                    first_step=first)
            for i in chosen:
                self.state[i]["step"] += 1


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient, as torch.optim.Adam.

    g = grad + weight_decay * p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps), t the parameter's step count.
    """

    buffer_names = required_buffers = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        name = type(self).__name__
        check(lr >= 0 and eps >= 0 and weight_decay >= 0, name,
              "lr, eps and weight_decay of 0 or more", f"{lr}, {eps}, {weight_decay}")
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), name, "betas in [0, 1)",
              f"{betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def step(self):
        g = self.param_groups[0]
        by_step = defaultdict(list)
        for i in self._stepping():
            self.state[i]["step"] += 1
            by_step[self.state[i]["step"]].append(i)
        # One hook call per step count (bias corrections differ); usually there is one.
        for step, chosen in by_step.items():
            self.backend.adam_update(
                [self.params[i].data for i in chosen], [self.params[i].grad.data for i in chosen],
                [self.state[i]["exp_avg"] for i in chosen],
                [self.state[i]["exp_avg_sq"] for i in chosen],
                step, g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"],
                self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW: p *= 1 - lr * weight_decay
    before the Adam step, and the gradient is left alone."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


class LRScheduler:
    """Sets ``param_groups[0]["lr"]`` from the epoch count; call ``step()`` once per epoch.

    The lr is a closed form of the epoch (PyTorch's formulas), so a schedule resumed
    from ``state_dict`` continues exactly.
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = float(optimizer.param_groups[0]["lr"])
        self.last_epoch = 0

    def lr_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self):
        self.last_epoch += 1
        self.optimizer.param_groups[0]["lr"] = self.lr_at(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict):
        self.base_lr, self.last_epoch = float(state["base_lr"]), int(state["last_epoch"])
        self.optimizer.param_groups[0]["lr"] = self.lr_at(self.last_epoch)


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size), as torch.optim.lr_scheduler.StepLR."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        check(step_size >= 1, "StepLR", "step_size of 1 or more", f"{step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2.

    As in torch.optim.lr_scheduler.CosineAnnealingLR, the curve goes on past T_max
    (back up towards base_lr by 2 * T_max), so set T_max to the number of epochs.
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):  # noqa: N803 - PyTorch's name
        check(T_max >= 1, "CosineAnnealingLR", "T_max of 1 or more", f"{T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * epoch / self.T_max)) / 2
