"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules, with PyTorch's arguments.

The arithmetic of a step lives in the backend (``sgd_update``/``adam_update``), so a
fast backend can update every parameter in one fused kernel.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import check


class Optimizer:
    def __init__(self, params, defaults: dict):
        self.params = list(params)
        check(len(self.params) > 0, type(self).__name__, "at least one parameter", "none")
        self.param_groups = [dict(defaults, params=self.params)]
        self.step_count = 0

    @property
    def backend(self):
        return self.params[0].backend

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _with_grads(self):
        """(params, grads) of the parameters that received a gradient."""
        pairs = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        return [i for i, _ in pairs], [p.data for _, p in pairs], [p.grad.data for _, p in pairs]

    def _state_arrays(self) -> dict[str, list]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Hyper-parameters, the step count and host copies of every state buffer."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        arrays = {name: [self.backend.to_numpy(a).copy() for a in buffers]
                  for name, buffers in self._state_arrays().items()}
        return {"param_group": group, "step_count": self.step_count, "state": arrays}

    def load_state_dict(self, state: dict):
        self.param_groups[0].update(state["param_group"])
        self.step_count = int(state["step_count"])
        for name, buffers in self._state_arrays().items():
            saved = state["state"][name]
            check(len(saved) == len(buffers), "load_state_dict",
                  f"{len(buffers)} '{name}' buffers", f"{len(saved)}")
            for buffer, value in zip(buffers, saved, strict=True):
                check(buffer.shape == np.shape(value), "load_state_dict",
                      f"a '{name}' buffer of shape {buffer.shape}", f"{np.shape(value)}")
                buffer[...] = self.backend.asarray(np.asarray(value, dtype=buffer.dtype))


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum, dampening and L2 weight decay, as torch.optim.SGD."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        check(lr >= 0 and momentum >= 0 and weight_decay >= 0, "SGD",
              "lr, momentum and weight_decay of 0 or more", f"{lr}, {momentum}, {weight_decay}")
        check(not nesterov or (momentum > 0 and dampening == 0), "SGD",
              "momentum > 0 and dampening 0 with nesterov", f"{momentum}, {dampening}")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))
        xp = self.backend.xp
        self.momentum_buffers = [xp.zeros_like(p.data) for p in self.params]

    def _state_arrays(self):
        return {"momentum_buffer": self.momentum_buffers}

    def step(self):
        g = self.param_groups[0]
        indexes, params, grads = self._with_grads()
        self.backend.sgd_update(params, grads, [self.momentum_buffers[i] for i in indexes],
                                g["lr"], g["momentum"], g["dampening"], g["nesterov"],
                                g["weight_decay"], first_step=self.step_count == 0)
        self.step_count += 1


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient, as torch.optim.Adam."""

    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        check(lr >= 0 and eps >= 0 and all(0 <= b < 1 for b in betas), type(self).__name__,
              "lr >= 0, eps >= 0 and betas in [0, 1)", f"{lr}, {eps}, {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        xp = self.backend.xp
        self.exp_avgs = [xp.zeros_like(p.data) for p in self.params]
        self.exp_avg_sqs = [xp.zeros_like(p.data) for p in self.params]

    def _state_arrays(self):
        return {"exp_avg": self.exp_avgs, "exp_avg_sq": self.exp_avg_sqs}

    def step(self):
        g = self.param_groups[0]
        indexes, params, grads = self._with_grads()
        self.step_count += 1
        self.backend.adam_update(params, grads, [self.exp_avgs[i] for i in indexes],
                                 [self.exp_avg_sqs[i] for i in indexes], self.step_count,
                                 g["lr"], g["betas"][0], g["betas"][1], g["eps"],
                                 g["weight_decay"], self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


class _Schedule:
    """Sets the optimizer's lr from the epoch count; call ``step()`` once per epoch."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = optimizer.param_groups[0]["lr"]
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


class StepLR(_Schedule):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        check(step_size >= 1, "StepLR", "step_size of 1 or more", f"{step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):  # noqa: N803 - PyTorch's name
        check(T_max >= 1, "CosineAnnealingLR", "T_max of 1 or more", f"{T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, epoch):
        progress = min(epoch, self.T_max) / self.T_max
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2
