"""A tiny U-Net trains to the same loss curve on the cuda backend as on numpy.

Under the simulator the cuda backend runs the real kernel source on the host, so
this checks the whole training step (forward, backward, fused optimizer kernels) end
to end. The tolerance is float64 rounding of reordered sums (relative 1e-9).
"""

import numpy as np
import pytest

import tinyunet as tu
import tinyunet.functional as F
from tinyunet import nn, optim

pytestmark = pytest.mark.skipif("cuda" not in tu.available_backends(),
                                reason="the cuda backend (GPU or simulator) is not available")


def loss_curve(backend, steps=3):
    tu.manual_seed(0)
    model = nn.UNet(1, 1, depth=1, base_channels=2).to(backend)
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    images = tu.tensor(rng.standard_normal((2, 1, 6, 6)), dtype=np.float64, backend=backend)
    masks = tu.tensor((rng.random((2, 1, 6, 6)) > 0.5), dtype=np.float64, backend=backend)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.bce_dice_loss(model(images), masks)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_cuda_training_matches_numpy():
    cuda_losses, cuda_state = loss_curve("cuda")
    numpy_losses, numpy_state = loss_curve("numpy")
    np.testing.assert_allclose(cuda_losses, numpy_losses, rtol=1e-9)
    assert cuda_losses[-1] < cuda_losses[0]
    for key in numpy_state:
        np.testing.assert_allclose(cuda_state[key], numpy_state[key], rtol=1e-9, atol=1e-12)
