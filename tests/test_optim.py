"""Optimizers and schedules: hand-computed updates, and PyTorch's when it is installed."""

import math

import numpy as np
import pytest

import tinyunet as tu
from tinyunet import optim
from tinyunet.nn import Parameter

RNG = np.random.default_rng(0)
START = RNG.standard_normal((3, 4))
GRADS = [RNG.standard_normal((3, 4)) for _ in range(4)]


def run(make_optimizer, backend=None):
    param = Parameter(START.copy(), backend=backend)
    param.data = param.data.astype(np.float64)
    opt = make_optimizer([param])
    for g in GRADS:
        param.grad = tu.tensor(g, dtype=np.float64, backend=backend)
        opt.step()
    return param.numpy()


def test_sgd_momentum_by_hand(backend):
    lr, mu, wd = 0.1, 0.9, 0.01
    p, buf = START.copy(), None
    for g in GRADS:
        d = g + wd * p
        buf = d if buf is None else mu * buf + d
        p = p - lr * (d + mu * buf)  # nesterov
    ours = run(lambda ps: optim.SGD(ps, lr, momentum=mu, nesterov=True, weight_decay=wd), backend)
    np.testing.assert_allclose(ours, p, rtol=1e-12)


def test_adam_and_adamw_by_hand(backend):
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.1
    for decoupled in (False, True):
        p, m, v = START.copy(), 0, 0
        for t, g in enumerate(GRADS, start=1):
            if decoupled:
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        kind = optim.AdamW if decoupled else optim.Adam
        ours = run(lambda ps, kind=kind: kind(ps, lr=lr, weight_decay=wd), backend)
        np.testing.assert_allclose(ours, p, rtol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "sgd-dampening", "adam", "adamw"])
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    pairs = {
        "sgd": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                          weight_decay=0.01)),
        "sgd-dampening": (lambda p: optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3),
                          lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3)),
        "adam": (lambda p: optim.Adam(p, lr=0.01, weight_decay=0.1),
                 lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
        "adamw": (lambda p: optim.AdamW(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01)),
    }
    ours_factory, theirs_factory = pairs[name]
    theirs = torch.tensor(START.copy(), requires_grad=True)
    opt = theirs_factory([theirs])
    for g in GRADS:
        theirs.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(run(ours_factory), theirs.detach().numpy(), rtol=1e-12)


def test_state_dict_resumes_identically():
    def steps(opt, param, grads):
        for g in grads:
            param.grad = tu.tensor(g, dtype=np.float64)
            opt.step()

    whole = Parameter(START.copy())
    whole.data = whole.data.astype(np.float64)
    opt = optim.Adam([whole], lr=0.05)
    steps(opt, whole, GRADS)

    first = Parameter(START.copy())
    first.data = first.data.astype(np.float64)
    opt1 = optim.Adam([first], lr=0.05)
    steps(opt1, first, GRADS[:2])
    second = Parameter(first.numpy())
    opt2 = optim.Adam([second], lr=999)
    opt2.load_state_dict(opt1.state_dict())
    steps(opt2, second, GRADS[2:])
    np.testing.assert_array_equal(second.numpy(), whole.numpy())


def test_schedules():
    opt = optim.SGD([Parameter(np.zeros(1))], lr=1.0)
    step = optim.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        step.step()
        lrs.append(step.get_last_lr()[0])
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25]

    opt = optim.SGD([Parameter(np.zeros(1))], lr=1.0)
    cosine = optim.CosineAnnealingLR(opt, T_max=4, eta_min=0.1)
    for epoch in range(1, 5):
        cosine.step()
        assert math.isclose(opt.param_groups[0]["lr"],
                            0.1 + 0.9 * (1 + math.cos(math.pi * epoch / 4)) / 2)
    restored = optim.CosineAnnealingLR(optim.SGD([Parameter(np.zeros(1))], lr=1.0), T_max=4)
    restored.load_state_dict(cosine.state_dict())
    assert restored.last_epoch == 4


def test_bad_arguments():
    with pytest.raises(tu.ShapeError, match="SGD"):
        optim.SGD([Parameter(np.zeros(1))], lr=-1)
    with pytest.raises(tu.ShapeError, match="at least one parameter"):
        optim.Adam([])
