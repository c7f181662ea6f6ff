"""Optimizers and schedules: hand-computed updates, and PyTorch's when it is installed."""

import io
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


def torch_run(torch, make_torch, make_ours, grads_per_step, lr_changes=None):
    """Run both optimizers on two parameters; ``grads_per_step`` gives (g0, g1) per step,
    None where that parameter has no gradient (PyTorch then skips it)."""
    lr_changes = lr_changes or {}
    starts = [START.copy(), START[:2].copy() * 3]
    ours = []
    for start in starts:
        p = Parameter(start)
        p.data = p.data.astype(np.float64)
        ours.append(p)
    theirs = [torch.tensor(s, requires_grad=True) for s in starts]
    opt, topt = make_ours(ours), make_torch(theirs)
    for step, grads in enumerate(grads_per_step):
        if step in lr_changes:
            opt.param_groups[0]["lr"] = topt.param_groups[0]["lr"] = lr_changes[step]
        opt.zero_grad()
        topt.zero_grad()
        for p, tp, g in zip(ours, theirs, grads, strict=True):
            if g is not None:
                p.grad = tu.tensor(g, dtype=np.float64)
                tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for p, tp in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd", "sgd-dampening-decay", "adam", "adamw"])
def test_parameters_without_gradients_and_lr_changes_match_torch(name):
    torch = pytest.importorskip("torch")
    makers = {
        "sgd": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)),
        "sgd-dampening-decay": (
            lambda p: optim.SGD(p, lr=0.1, momentum=0.7, dampening=0.2, weight_decay=0.05),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.7, dampening=0.2,
                                      weight_decay=0.05)),
        "adam": (lambda p: optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6),
                 lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
        "adamw": (lambda p: optim.AdamW(p, lr=0.02, weight_decay=0.3),
                  lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.3)),
    }
    ours, theirs = makers[name]
    second = [g[:2] for g in GRADS]
    # The second parameter starts two steps late and skips one step in between.
    steps = [(GRADS[0], None), (GRADS[1], None), (GRADS[2], second[0]), (GRADS[3], None),
             (GRADS[0], second[1]), (GRADS[1], second[2])]
    torch_run(torch, theirs, ours, steps, lr_changes={3: 0.05})


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    pairs = [
        (lambda o: optim.StepLR(o, step_size=3, gamma=0.5),
         lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
        # 13 epochs with T_max 5: PyTorch's curve goes back up after T_max.
        (lambda o: optim.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=0.01)),
    ]
    for ours_factory, theirs_factory in pairs:
        opt = optim.SGD([Parameter(np.zeros(1))], lr=0.3)
        topt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        ours, theirs = ours_factory(opt), theirs_factory(topt)
        for _ in range(13):
            topt.step()
            ours.step()
            theirs.step()
            assert math.isclose(ours.get_last_lr()[0], theirs.get_last_lr()[0], rel_tol=1e-12,
                                abs_tol=1e-15)


def test_sgd_without_momentum_by_hand_keeps_no_buffer():
    p = Parameter(START.copy())
    p.data = p.data.astype(np.float64)
    opt = optim.SGD([p], lr=0.5, weight_decay=0.1)
    p.grad = tu.tensor(GRADS[0], dtype=np.float64)
    opt.step()
    np.testing.assert_allclose(p.numpy(), START - 0.5 * (GRADS[0] + 0.1 * START), rtol=1e-14)
    np.testing.assert_array_equal(p.grad.numpy(), GRADS[0])  # the gradient is not touched
    assert opt.state_dict()["state"] == [{"step": 1}]


def flatten_for_npz(value, prefix, out):
    """Store a state_dict the way a checkpoint would: arrays by path, no pickling."""
    if isinstance(value, dict):
        for key, item in value.items():
            flatten_for_npz(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            flatten_for_npz(item, f"{prefix}/{index}", out)
    else:
        assert isinstance(value, (np.ndarray, int, float, bool)), (prefix, type(value))
        out[prefix] = np.asarray(value)


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: optim.AdamW(ps, lr=0.05),
])
def test_state_dict_is_host_arrays_and_resumes_identically(make, backend):
    def fresh():
        p = Parameter(START.copy(), backend=backend)
        p.data = p.data.astype(np.float64)
        return p

    def steps(opt, param, grads):
        for g in grads:
            param.grad = tu.tensor(g, dtype=np.float64, backend=backend)
            opt.step()

    whole = fresh()
    steps(make([whole]), whole, GRADS)

    first = fresh()
    opt1 = make([first])
    steps(opt1, first, GRADS[:2])
    state = opt1.state_dict()
    stored = {}
    flatten_for_npz(state, "optim", stored)
    np.savez(io.BytesIO(), **stored)  # plain arrays and numbers only
    for entry in state["state"]:
        for value in entry.values():
            if isinstance(value, np.ndarray):
                value[...] = 1e9  # a copy: scribbling on it must not reach the optimizer
    second = Parameter(first.numpy(), backend=backend)
    opt2 = make([second])
    opt2.param_groups[0]["lr"] = 999.0
    opt2.load_state_dict(opt1.state_dict())
    assert opt2.param_groups[0]["lr"] == opt1.param_groups[0]["lr"]
    steps(opt2, second, GRADS[2:])
    np.testing.assert_array_equal(second.numpy(), whole.numpy())


def test_load_state_dict_errors_name_the_problem():
    opt = optim.Adam([Parameter(np.zeros((2, 3))), Parameter(np.zeros(4))])
    for p in opt.params:
        p.grad = tu.tensor(np.ones(p.shape), dtype=np.float64)
    opt.step()
    state = opt.state_dict()
    other = optim.Adam([Parameter(np.zeros((2, 3)))])
    with pytest.raises(tu.ShapeError, match="state for 1 parameters.*state for 2"):
        other.load_state_dict(state)
    wrong = optim.Adam([Parameter(np.zeros((2, 3))), Parameter(np.zeros(5))])
    with pytest.raises(tu.ShapeError, match=r"'exp_avg' of parameter 1 with shape \(5,\)"):
        wrong.load_state_dict(state)
    with pytest.raises(tu.ShapeError, match="'param_group' and 'state'"):
        wrong.load_state_dict({"lr": 1})
    sgd = optim.SGD([Parameter(np.zeros((2, 3))), Parameter(np.zeros(4))], lr=0.1)
    with pytest.raises(tu.ShapeError, match="buffers among"):
        sgd.load_state_dict(state)


def test_parameters_must_be_leaves_that_require_grad():
    with pytest.raises(tu.ShapeError, match="leaf Tensors with requires_grad=True"):
        optim.SGD([tu.tensor(np.zeros(2))], lr=0.1)
    with pytest.raises(tu.ShapeError, match="betas in"):
        optim.Adam([Parameter(np.zeros(1))], betas=(0.9, 1.0))
    with pytest.raises(tu.ShapeError, match="nesterov"):
        optim.SGD([Parameter(np.zeros(1))], lr=0.1, nesterov=True)
