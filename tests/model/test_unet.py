"""The U-Net: sizes in both padding modes, and that it can learn."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyunet as tu
import tinyunet.functional as F
from tinyunet import nn, optim


@pytest.mark.parametrize("up", ["transpose", "upsample"])
def test_paper_sizes_572_to_388(up):
    model = nn.UNet(1, 2, depth=4, base_channels=2, padding="valid", up=up)
    assert model.output_hw((572, 572)) == (388, 388)
    assert model.output_hw((572, 380)) == (388, 196)
    assert model.valid_input_hw((1, 1)) == (188, 188)
    assert model.output_hw((188, 188)) == (4, 4)


def test_depth_4_valid_forward_has_the_paper_size_relation():
    # The paper's network with 1 base channel instead of 64; 188 -> 4 is 572 -> 388
    # shifted by 384 = 2**4 * 24, the same crops at every level.
    tu.manual_seed(0)
    model = nn.UNet(1, 2, depth=4, base_channels=1, padding="valid")
    y = model(tu.tensor(np.random.default_rng(0).standard_normal((1, 1, 188, 204))))
    assert y.shape == (1, 2, 4, 20) == (1, 2, *model.output_hw((188, 204)))


def test_valid_forward_matches_output_hw():
    tu.manual_seed(0)
    model = nn.UNet(1, 3, depth=2, base_channels=2, padding="valid")
    hw = model.valid_input_hw((40, 50))
    y = model(tu.tensor(np.zeros((1, 1, *hw))))
    assert y.shape == (1, 3, *model.output_hw(hw))


def test_valid_rejects_unusable_size_and_suggests_one():
    model = nn.UNet(1, 1, depth=4, base_channels=2, padding="valid")
    with pytest.raises(tu.ShapeError, match=r"e\.g\. \(188, 188\)"):
        model.output_hw((100, 100))
    with pytest.raises(tu.ShapeError, match="UNet"):
        model(tu.tensor(np.zeros((1, 1, 100, 100))))


@given(depth=st.integers(1, 4), side=st.integers(1, 300))
def test_valid_input_hw_is_smallest_usable(depth, side):
    model = nn.UNet(1, 1, depth=depth, base_channels=1, padding="valid")
    (found, _) = model.valid_input_hw((side, side))
    model.output_hw((found, found))
    for smaller in range(side, found):
        with pytest.raises(tu.ShapeError):
            model.output_hw((smaller, smaller))


@pytest.mark.parametrize("up", ["transpose", "upsample"])
def test_same_mode_keeps_any_size(up):
    tu.manual_seed(0)
    model = nn.UNet(2, 2, depth=3, base_channels=2, up=up)
    x = tu.tensor(np.random.default_rng(0).standard_normal((1, 2, 37, 45)), requires_grad=True)
    y = model(x)
    assert y.shape == (1, 2, 37, 45)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_config_rebuilds_the_same_architecture():
    model = nn.UNet(1, 2, depth=2, base_channels=3, padding="valid", up="upsample")
    clone = nn.UNet(**model.config)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_bad_input_channels():
    model = nn.UNet(3, 1, depth=1, base_channels=2)
    with pytest.raises(tu.ShapeError, match=r"Expect: input \(N, 3, H, W\)"):
        model(tu.tensor(np.zeros((1, 1, 8, 8))))


def blobs(n=4, size=16, seed=0):
    """Images with a bright disc, and the disc as the mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.stack([
        ((yy - rng.uniform(4, size - 4)) ** 2 + (xx - rng.uniform(4, size - 4)) ** 2
         < rng.uniform(9, 16)) for _ in range(n)
    ]).astype(np.float32)[:, None]
    images = masks + 0.3 * rng.standard_normal(masks.shape).astype(np.float32)
    return tu.tensor(images), tu.tensor(masks)


@pytest.mark.slow
def test_tiny_unet_overfits_one_batch():
    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=2, base_channels=4)
    opt = optim.Adam(model.parameters(), lr=0.01)
    images, masks = blobs()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.dice_loss(model(images), masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with tu.no_grad():
        prediction = (model(images).numpy() > 0).astype(np.float32)
    truth = masks.numpy()
    dice = 2 * (prediction * truth).sum() / (prediction.sum() + truth.sum())
    assert dice > 0.95, (dice, losses[::10])


def test_a_few_sgd_steps_lower_the_loss():
    tu.manual_seed(1)
    model = nn.UNet(1, 1, depth=2, base_channels=4)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, masks = blobs(seed=1)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(images), masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_parameter_names_and_count_follow_the_architecture():
    model = nn.UNet(1, 2, depth=2, base_channels=4)
    names = [name for name, _ in model.named_parameters()]
    assert names[:4] == ["encoders.0.conv1.weight", "encoders.0.conv1.bias",
                         "encoders.0.conv2.weight", "encoders.0.conv2.bias"]
    assert {"ups.0.weight", "ups.1.bias", "decoders.1.conv2.weight", "head.weight"} <= set(names)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert shapes["encoders.2.conv1.weight"] == (16, 8, 3, 3)
    assert shapes["ups.1.weight"] == (16, 8, 2, 2)  # 16 -> 8 channels, 2x2 stride 2
    assert shapes["decoders.0.conv1.weight"] == (4, 8, 3, 3)  # skip (4) + up (4) channels
    assert shapes["head.weight"] == (2, 4, 1, 1)

    def conv(c_in, c_out, k):
        return c_out * c_in * k * k + c_out

    by_hand = (conv(1, 4, 3) + conv(4, 4, 3) + conv(4, 8, 3) + conv(8, 8, 3)
               + conv(8, 16, 3) + conv(16, 16, 3)                      # encoders
               + conv(16, 8, 2) + conv(8, 4, 2)                        # up-convs
               + conv(16, 8, 3) + conv(8, 8, 3) + conv(8, 4, 3) + conv(4, 4, 3)  # decoders
               + conv(4, 2, 1))                                        # head
    assert model.num_parameters() == by_hand


def test_upsample_variant_uses_bilinear_and_a_1x1_conv():
    model = nn.UNet(1, 1, depth=2, base_channels=4, up="upsample")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    assert shapes["ups.0.1.weight"] == (4, 8, 1, 1)
    assert model.ups[0][0].mode == "bilinear"


def test_same_mode_pads_bottom_right_and_crops_back():
    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=2, base_channels=2)
    x = np.random.default_rng(0).standard_normal((1, 1, 13, 10))
    padded = np.zeros((1, 1, 16, 12))
    padded[:, :, :13, :10] = x
    np.testing.assert_allclose(model(tu.tensor(x)).numpy(),
                               model(tu.tensor(padded)).numpy()[:, :, :13, :10], rtol=1e-6)
    assert model.valid_input_hw((13, 10)) == (16, 12)
    assert model.output_hw((13, 10)) == (13, 10)


@pytest.mark.parametrize("padding, up", [("same", "transpose"), ("valid", "upsample")])
def test_every_parameter_gets_a_gradient(padding, up):
    tu.manual_seed(2)
    model = nn.UNet(2, 3, depth=2, base_channels=2, padding=padding, up=up)
    hw = model.valid_input_hw((20, 20))
    x = tu.tensor(np.random.default_rng(0).standard_normal((2, 2, *hw)))
    (model(x) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and np.abs(p.grad.numpy()).sum() > 0, name


def test_unet_state_dict_round_trip_and_seeded_init():
    tu.manual_seed(4)
    model = nn.UNet(1, 2, depth=2, base_channels=3, padding="valid", up="upsample")
    tu.manual_seed(4)
    twin = nn.UNet(**model.config)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, twin.state_dict()[key])
    other = nn.UNet(**model.config)
    x = tu.tensor(np.random.default_rng(1).standard_normal((1, 1, 44, 44)))
    assert not np.allclose(other(x).numpy(), model(x).numpy())
    other.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(other(x).numpy(), model(x).numpy())


def test_loading_another_architecture_names_the_key_and_shapes():
    small = nn.UNet(1, 1, depth=2, base_channels=4)
    with pytest.raises(tu.ShapeError, match=r"'encoders\.0\.conv1\.weight' of shape "
                                            r"\(4, 1, 3, 3\).*\(8, 1, 3, 3\)"):
        small.load_state_dict(nn.UNet(1, 1, depth=2, base_channels=8).state_dict())
    with pytest.raises(tu.ShapeError, match="missing keys.*encoders.3"):
        nn.UNet(1, 1, depth=3, base_channels=4).load_state_dict(small.state_dict())


@pytest.mark.parametrize("kwargs, words", [
    (dict(padding="full"), "padding 'same' or 'valid'"),
    (dict(up="nearest"), "up 'transpose' or 'upsample'"),
    (dict(depth=0), "integers of 1 or more"),
    (dict(base_channels=2.5), "integers of 1 or more"),
])
def test_bad_configuration(kwargs, words):
    with pytest.raises(tu.ShapeError, match="UNet: Expect") as error:
        nn.UNet(**kwargs)
    assert words in str(error.value)
