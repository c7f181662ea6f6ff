"""The U-Net: sizes in both padding modes, and that it can learn."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinyunet as tu
import tinyunet.functional as F
from tinyunet import nn, optim


def test_paper_sizes_572_to_388():
    model = nn.UNet(1, 2, depth=4, base_channels=2, padding="valid")
    assert model.output_hw((572, 572)) == (388, 388)


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
