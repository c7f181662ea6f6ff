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


def test_nested_names_modules_and_counts():
    inner = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    outer = nn.Sequential(inner, nn.Conv2d(2, 1, 1, bias=False))
    assert [n for n, _ in outer.named_parameters()] == ["0.0.weight", "0.0.bias", "1.weight"]
    assert [n for n, _ in outer.named_modules()] == ["", "0", "0.0", "0.1", "1"]
    assert outer.num_parameters() == 2 * 9 + 2 + 2
    assert len(outer) == 2 and outer[1] is list(outer)[1]
    assert "Conv2d(1, 2, kernel_size=(3, 3)" in repr(outer)


def test_reassigning_an_attribute_replaces_its_registration():
    conv = nn.Conv2d(1, 1, 1)
    conv.bias = None
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    assert conv(tu.tensor(np.ones((1, 1, 2, 2)))).shape == (1, 1, 2, 2)


def test_parameter_from_a_tensor_and_sequential_rejects_non_modules():
    p = nn.Parameter(tu.tensor(np.arange(3.0)))
    assert p.requires_grad and p.is_leaf
    np.testing.assert_array_equal(p.numpy(), np.arange(3.0, dtype=np.float32))
    with pytest.raises(tu.ShapeError, match="Sequential: Expect: Modules"):
        nn.Sequential(nn.ReLU(), lambda x: x)


def test_failed_load_changes_nothing():
    net = make_net()
    before = net.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    state["2.weight"] = np.zeros((7, 7))
    with pytest.raises(tu.ShapeError, match="'2.weight' of shape"):
        net.load_state_dict(state)
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_non_strict_load_skips_missing_and_unexpected_keys():
    net = make_net()
    state = {"0.bias": np.full(3, 7.0), "not.a.key": np.zeros(2)}
    net.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(net.state_dict()["0.bias"], np.full(3, 7.0, np.float32))
    assert net.state_dict()["0.bias"].dtype == np.float32


def test_to_moves_every_parameter_and_keeps_outputs(backend):
    tu.manual_seed(0)
    net = make_net()
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 5))
    expected = net(tu.tensor(x)).numpy()
    ids = [id(p) for p in net.parameters()]
    assert net.to(backend) is net
    assert [id(p) for p in net.parameters()] == ids
    assert all(p.backend.name == backend for p in net.parameters())
    got = net(tu.tensor(x, backend=backend)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_conv_transpose_he_fan_in_is_inputs_per_output_pixel():
    tu.manual_seed(0)
    up = nn.ConvTranspose2d(256, 8, 2, stride=2)  # each output pixel hears 256 inputs
    assert abs(up.weight.numpy().std() / np.sqrt(2 / 256) - 1) < 0.05
    assert up.weight.shape == (256, 8, 2, 2) and up.weight.dtype == np.float32


def test_layers_match_torch_modules():
    torch = pytest.importorskip("torch")
    tu.manual_seed(0)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    pairs = [
        (nn.Conv2d(3, 4, 3, stride=2, padding=1),
         torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
         torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)),
        (nn.MaxPool2d(3, stride=2, padding=1), torch.nn.MaxPool2d(3, stride=2, padding=1)),
        (nn.Upsample(2, "bilinear"), torch.nn.Upsample(scale_factor=2, mode="bilinear")),
    ]
    for ours, theirs in pairs:
        state = {k: torch.tensor(v) for k, v in ours.state_dict().items()}
        theirs.load_state_dict(state)  # same names and shapes as PyTorch's layers
        np.testing.assert_allclose(ours(tu.tensor(x)).numpy(),
                                   theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5,
                                   atol=1e-5)
