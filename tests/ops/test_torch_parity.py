"""Forward and backward of every op against torch.nn.functional, in float32.

PyTorch is an optional peer: without it these tests skip, and the loop references
in test_reference.py and the finite-difference checks in test_gradients.py still
cover every op. With it, each op must agree to a relative error of 1e-5, which also
pins down PyTorch's semantics: output sizes, 'same' padding of even kernels, the pool
tie rule, weighted cross-entropy's mean, BCE's pos_weight.
"""

import numpy as np
import pytest

import tinyunet as tu
import tinyunet.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional
# PyTorch warns that 'same' padding of an even kernel copies the input; that case is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def relative_error(ours, theirs):
    theirs = theirs.detach().numpy()
    return float(np.abs(ours - theirs).max(initial=0) / max(1e-6, np.abs(theirs).max(initial=0)))


def compare(ours_fn, theirs_fn, arrays, constants=(), backend="numpy"):
    """Run both on float32 copies of ``arrays``; compare outputs and input gradients."""
    rng = np.random.default_rng(1)
    ours = [tu.tensor(a, requires_grad=True, backend=backend) for a in arrays]
    theirs = [torch.tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    y, ty = ours_fn(*ours), theirs_fn(*theirs)
    assert y.shape == tuple(ty.shape)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(tu.tensor(g, backend=backend))
    ty.backward(torch.tensor(g))
    assert relative_error(y.numpy(), ty) <= 1e-5
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a.grad.numpy(), b.grad) <= 1e-5


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), 1, 1, 1), ((2, 3), 2, (1, 0), 1), ((4, 4), 1, "same", 1), ((3, 2), 1, "same", 2),
    ((5, 5), 3, 2, 1), ((3, 3), 1, "valid", 2),
])
def test_conv2d(backend, kernel, stride, padding, dilation):
    arrays = [RNG.standard_normal((2, 3, 11, 9)), RNG.standard_normal((4, 3, *kernel)),
              RNG.standard_normal(4)]
    compare(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation),
            lambda x, w, b: TF.conv2d(x, w, b, stride, padding, dilation), arrays,
            backend=backend)


@pytest.mark.parametrize("kernel, stride, padding, output_padding, dilation", [
    ((2, 2), 2, 0, 0, 1), ((3, 3), 2, 1, 1, 1), ((3, 2), 3, (1, 0), (2, 0), 2),
])
def test_conv_transpose2d(backend, kernel, stride, padding, output_padding, dilation):
    arrays = [RNG.standard_normal((2, 3, 5, 6)), RNG.standard_normal((3, 4, *kernel)),
              RNG.standard_normal(4)]
    compare(lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, output_padding, 1,
                                               dilation),
            lambda x, w, b: TF.conv_transpose2d(x, w, b, stride, padding, output_padding, 1,
                                                dilation), arrays, backend=backend)


@pytest.mark.parametrize("kernel, stride, padding, dilation, ties", [
    (2, None, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, True), ((2, 3), (1, 2), (1, 1), 1,
                                                                     False),
])
def test_max_pool2d(backend, kernel, stride, padding, dilation, ties):
    x = (RNG.integers(0, 3, (2, 3, 9, 7)) if ties else RNG.permutation(378).reshape(2, 3, 9, 7))
    compare(lambda t: F.max_pool2d(t, kernel, stride, padding, dilation),
            lambda t: TF.max_pool2d(t, kernel, stride, padding, dilation),
            [x.astype(np.float64)], backend=backend)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "softmax", "log_softmax"])
def test_activations(backend, name):
    ours = {"softmax": lambda x: F.softmax(x, 1), "log_softmax": lambda x: F.log_softmax(x, 1)}
    theirs = {"softmax": lambda x: TF.softmax(x, 1), "log_softmax": lambda x: TF.log_softmax(x, 1)}
    compare(ours.get(name, getattr(F, name)), theirs.get(name, getattr(TF, name, None)
                                                          or getattr(torch, name)),
            [3 * RNG.standard_normal((2, 4, 5, 6))], backend=backend)


@pytest.mark.parametrize("mode, align_corners", [("nearest", None), ("bilinear", False),
                                                 ("bilinear", True)])
def test_interpolate(backend, mode, align_corners):
    compare(lambda x: F.interpolate(x, 2, mode, align_corners),
            lambda x: TF.interpolate(x, scale_factor=2, mode=mode, align_corners=align_corners),
            [RNG.standard_normal((2, 3, 5, 4))], backend=backend)


def test_concat_and_pad(backend):
    compare(lambda a, b: F.pad(F.concat([a, b]), (1, -1, 2, 0)),
            lambda a, b: TF.pad(torch.cat([a, b], 1), (1, -1, 2, 0)),
            [RNG.standard_normal((2, 3, 5, 4)), RNG.standard_normal((2, 1, 5, 4))],
            backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_with_weights_and_ignore_index(backend, reduction):
    labels = RNG.integers(0, 4, (3, 5, 6))
    labels[0, 0, 0] = -100
    weight = RNG.random(4)
    compare(lambda z: F.cross_entropy(z, tu.tensor(labels, backend=backend), weight=weight,
                                      reduction=reduction),
            lambda z: TF.cross_entropy(z, torch.tensor(labels), weight=torch.tensor(
                weight, dtype=torch.float32), reduction=reduction),
            [5 * RNG.standard_normal((3, 4, 5, 6))], backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_weight_and_pos_weight(backend, reduction):
    target, weight = RNG.random((3, 2, 5, 6)), RNG.random((3, 2, 5, 6))
    pos_weight = np.array([2.0, 0.5]).reshape(2, 1, 1)
    compare(lambda z: F.binary_cross_entropy_with_logits(
                z, tu.tensor(target, backend=backend), weight=weight, pos_weight=pos_weight,
                reduction=reduction),
            lambda z: TF.binary_cross_entropy_with_logits(
                z, torch.tensor(target, dtype=torch.float32), weight=torch.tensor(
                    weight, dtype=torch.float32),
                pos_weight=torch.tensor(pos_weight, dtype=torch.float32), reduction=reduction),
            [20 * RNG.standard_normal((3, 2, 5, 6))], backend=backend)


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div"])
def test_broadcasting_arithmetic(backend, name):
    ops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a / b}
    b = RNG.standard_normal((3, 1, 4))
    compare(ops[name], ops[name], [RNG.standard_normal((2, 3, 5, 4)), np.sign(b) + b],
            backend=backend)


def test_power_reductions_and_reshape(backend):
    def fn(x, sum_, mean):
        y = (x * x + 1) ** 1.5
        return (y.sum(dim=(0, 2), keepdim=True) * sum_(y, 1).reshape(2, 1, 5, 4)
                + mean(y, dim=-1).reshape(2, 3, 5, 1))

    compare(lambda x: fn(x, lambda t, d: t.sum(dim=d), lambda t, dim: t.mean(dim=dim)),
            lambda x: fn(x, torch.sum, lambda t, dim: t.mean(dim=dim)),
            [RNG.standard_normal((2, 3, 5, 4))], backend=backend)


def test_softmax_over_the_last_axis(backend):
    compare(lambda x: F.softmax(x, -1) * F.log_softmax(x, 0),
            lambda x: TF.softmax(x, -1) * TF.log_softmax(x, 0),
            [3 * RNG.standard_normal((2, 4, 5, 6))], backend=backend)


def test_center_crop_matches_slicing(backend):
    # Not in torch.nn.functional; the definition is: drop (H - h) // 2 rows on top.
    compare(lambda x: F.center_crop(x, (3, 2)), lambda x: x[:, :, 2:5, 1:3],
            [RNG.standard_normal((2, 3, 8, 5))], backend=backend)


def torch_overlap_loss(kind, z, target, smooth=1.0, ignore_background=False, reduction="mean"):
    """Soft Dice / IoU written out in torch from the definitions in losses.py."""
    if z.shape[1] == 1:
        p, t, axes = torch.sigmoid(z), target, (1, 2, 3)
    else:
        p, axes = torch.softmax(z, 1), (2, 3)
        t = TF.one_hot(target, z.shape[1]).permute(0, 3, 1, 2).to(z.dtype)
    inter, total = (p * t).sum(axes), p.sum(axes) + t.sum(axes)
    if kind == "dice":
        score = (2 * inter + smooth) / (total + smooth)
    else:
        score = (inter + smooth) / (total - inter + smooth)
    if z.shape[1] > 1:
        score = score[:, 1:] if ignore_background else score
        score = score.mean(1)
    loss = 1 - score
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


@pytest.mark.parametrize("kind", ["dice", "iou"])
@pytest.mark.parametrize("channels, ignore_background, reduction", [
    (1, False, "mean"), (1, False, "none"), (3, False, "sum"), (4, True, "mean"),
    (2, True, "none"),
])
def test_soft_overlap_losses(backend, kind, channels, ignore_background, reduction):
    if channels == 1:
        target = (RNG.random((2, 1, 6, 5)) > 0.5).astype(np.float32)
        ours_target, theirs_target = tu.tensor(target, backend=backend), torch.tensor(target)
    else:
        labels = RNG.integers(0, channels, (2, 6, 5))
        ours_target, theirs_target = tu.tensor(labels, backend=backend), torch.tensor(labels)
    ours = getattr(F, f"{kind}_loss")
    compare(lambda z: ours(z, ours_target, smooth=0.5, ignore_background=ignore_background,
                           reduction=reduction),
            lambda z: torch_overlap_loss(kind, z, theirs_target, 0.5, ignore_background,
                                         reduction),
            [2 * RNG.standard_normal((2, channels, 6, 5))], backend=backend)


@pytest.mark.parametrize("channels", [1, 3])
def test_bce_dice_loss(backend, channels):
    labels = RNG.integers(0, max(channels, 2), (2, 6, 5))
    if channels == 1:
        def theirs_pixel(z):
            return TF.binary_cross_entropy_with_logits(
                z, torch.tensor(labels[:, None], dtype=torch.float32))
    else:
        def theirs_pixel(z):
            return TF.cross_entropy(z, torch.tensor(labels))
    theirs_target = torch.tensor(labels[:, None].astype(np.float32) if channels == 1 else labels)
    compare(lambda z: F.bce_dice_loss(z, tu.tensor(labels, backend=backend), bce_weight=0.3),
            lambda z: 0.3 * theirs_pixel(z) + 0.7 * torch_overlap_loss("dice", z, theirs_target),
            [2 * RNG.standard_normal((2, channels, 6, 5))], backend=backend)


def test_bce_with_per_channel_weight(backend):
    target, weight = RNG.random((3, 2, 5, 6)), RNG.random((2, 1, 1))
    compare(lambda z: F.binary_cross_entropy_with_logits(
                z, tu.tensor(target, backend=backend), weight=weight),
            lambda z: TF.binary_cross_entropy_with_logits(
                z, torch.tensor(target, dtype=torch.float32),
                weight=torch.tensor(weight, dtype=torch.float32)),
            [4 * RNG.standard_normal((3, 2, 5, 6))], backend=backend)
