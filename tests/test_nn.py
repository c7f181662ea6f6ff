"""Module, Parameter, layers and saving/loading."""

import numpy as np
import pytest

import tinyunet as tu
from tinyunet import nn


def make_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1))


def test_named_parameters_follow_registration_order():
    names = [name for name, _ in make_net().named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_state_dict_round_trip_restores_outputs():
    tu.manual_seed(0)
    net = make_net()
    x = tu.tensor(np.random.default_rng(0).standard_normal((2, 1, 6, 6)))
    expected = net(x).numpy()
    tu.manual_seed(1)
    other = make_net()
    assert not np.allclose(other(x).numpy(), expected)
    other.load_state_dict(net.state_dict())
    np.testing.assert_array_equal(other(x).numpy(), expected)


def test_state_dict_is_a_copy():
    net = make_net()
    state = net.state_dict()
    state["0.weight"][...] = 0
    assert np.abs(net.state_dict()["0.weight"]).sum() > 0


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("2.bias"), ["missing", "2.bias"]),
        (lambda s: s.update(extra=np.zeros(1)), ["unexpected", "extra"]),
        (lambda s: s.update({"0.weight": np.zeros((3, 1, 5, 5))}), ["0.weight", "(3, 1, 3, 3)",
                                                                   "(3, 1, 5, 5)"]),
    ],
)
def test_strict_load_names_the_key_and_shapes(edit, words):
    net = make_net()
    state = net.state_dict()
    edit(state)
    with pytest.raises(tu.ShapeError) as error:
        net.load_state_dict(state)
    for word in words:
        assert word in str(error.value)


def test_train_eval_zero_grad():
    net = make_net()
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    loss = net(tu.tensor(np.ones((1, 1, 4, 4)))).sum()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_he_initialisation_std():
    tu.manual_seed(3)
    conv = nn.Conv2d(64, 64, 3)
    expected = np.sqrt(2 / (64 * 9))
    assert abs(conv.weight.numpy().std() / expected - 1) < 0.02
    assert not conv.bias.numpy().any()


def test_seed_makes_initialisation_repeatable():
    tu.manual_seed(5)
    first = make_net().state_dict()
    tu.manual_seed(5)
    second = make_net().state_dict()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_layers_match_functional():
    tu.manual_seed(0)
    x = tu.tensor(np.random.default_rng(1).standard_normal((1, 2, 8, 8)))
    up = nn.ConvTranspose2d(2, 3, 2, stride=2)
    assert up(x).shape == (1, 3, 16, 16)
    assert nn.MaxPool2d(2)(x).shape == (1, 2, 4, 4)
    assert nn.Upsample(2, "bilinear")(x).shape == (1, 2, 16, 16)
    np.testing.assert_array_equal(nn.ReLU()(x).numpy(), np.maximum(x.numpy(), 0))
