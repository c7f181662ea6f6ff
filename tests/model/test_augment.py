"""Augmentation moves image and mask together, and the elastic deformation is the paper's."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tinyunet.data import Augmenter, elastic_field, flip_rotate, random_crop, warp
from tinyunet.data.augment import cubic_weights, intensity_jitter
from tinyunet.data.synthetic import gaussian_blur


def _smooth_pattern(h, w, seed, channels=1):
    """A smooth random image (C, H, W) and its mask: image channel 0 > 0."""
    rng = np.random.default_rng(seed)
    image = gaussian_blur(rng.normal(0, 1, (channels, h, w)), 2.0).astype(np.float32)
    return image, (image[0] > 0).astype(np.int64)


@given(seed=st.integers(0, 2**31), side=st.integers(8, 40), extra=st.integers(0, 12),
       crop=st.integers(4, 48))
def test_crops_flips_rotations_keep_mask_aligned(seed, side, extra, crop):
    image, mask = _smooth_pattern(side, side + extra, seed, channels=2)
    augment = Augmenter(crop=(crop, crop), elastic_p=0.0, jitter=False)
    out_image, out_mask = augment(image, mask, np.random.default_rng(seed))
    assert out_image.shape == (2, crop, crop) and out_mask.shape == (crop, crop)
    # The mask is still exactly "channel 0 > 0" of the transformed image.
    np.testing.assert_array_equal(out_mask, (out_image[0] > 0).astype(np.int64))


def test_flip_rotate_covers_the_eight_symmetries():
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    mask = np.arange(9).reshape(3, 3)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        out_image, out_mask = flip_rotate(image, mask, rng)
        np.testing.assert_array_equal(out_image[0], out_mask)
        seen.add(out_mask.tobytes())
    assert len(seen) == 8


def test_random_crop_mirrors_small_images():
    image, mask = _smooth_pattern(10, 12, 0)
    out_image, out_mask = random_crop(image, mask, (16, 20), np.random.default_rng(0))
    assert out_image.shape == (1, 16, 20) and out_mask.shape == (16, 20)
    np.testing.assert_array_equal(out_mask, (out_image[0] > 0).astype(np.int64))
    # Symmetric padding by 3 rows/4 columns on top/left puts the original at (3, 4).
    np.testing.assert_array_equal(out_image[:, 3:13, 4:16], image)


def test_zero_displacement_is_the_identity():
    image, mask = _smooth_pattern(13, 17, 1, channels=3)
    zeros = np.zeros((13, 17))
    out_image, out_mask = warp(image, mask, zeros, zeros)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


@given(seed=st.integers(0, 2**31), dy=st.integers(-30, 30), dx=st.integers(-30, 30))
def test_integer_shift_moves_image_and_mask_alike(seed, dy, dx):
    image, mask = _smooth_pattern(16, 20, seed)
    out_image, out_mask = warp(image, mask, np.full((16, 20), float(dy)),
                               np.full((16, 20), float(dx)))
    np.testing.assert_array_equal(out_mask, (out_image[0] > 0).astype(np.int64))
    # Inside the image, a shift reads the pixel dy rows down and dx columns right.
    if 0 <= dy < 16 and 0 <= dx < 20:
        np.testing.assert_array_equal(out_image[:, : 16 - dy, : 20 - dx], image[:, dy:, dx:])


@given(seed=st.integers(0, 2**31), sigma=st.floats(0.5, 8.0))
def test_elastic_deformation_keeps_mask_aligned(seed, sigma):
    """Deform a binary pattern stored as an image: wherever the bilinear image is clearly 0
    or 1, the nearest-neighbour mask must hold the same label."""
    _, mask = _smooth_pattern(32, 32, seed)
    image = mask[None].astype(np.float32)
    rng = np.random.default_rng(seed)
    dy, dx = elastic_field((32, 32), rng, sigma=sigma)
    out_image, out_mask = warp(image, mask, dy, dx)
    assert set(np.unique(out_mask)) <= {0, 1}
    assert (out_mask[out_image[0] > 0.999] == 1).all()
    assert (out_mask[out_image[0] < 0.001] == 0).all()
    # Most pixels are far from an edge, so this checks most of the mask.
    assert ((out_image[0] > 0.999) | (out_image[0] < 0.001)).mean() > 0.5


def test_elastic_field_is_smooth_random_and_seeded():
    dy, dx = elastic_field((64, 48), np.random.default_rng(0), sigma=5.0, grid=3)
    assert dy.shape == dx.shape == (64, 48)
    again = elastic_field((64, 48), np.random.default_rng(0), sigma=5.0, grid=3)
    np.testing.assert_array_equal(dy, again[0])
    assert not np.allclose(dy, dx)
    # Smooth: neighbouring pixels move by much less than the displacements themselves.
    assert np.abs(np.diff(dy, axis=0)).max() < 0.2 * np.abs(dy).max() + 1e-9
    stds = [np.std(elastic_field((9, 9), np.random.default_rng(s), 5.0)[0][::4, ::4])
            for s in range(200)]
    assert 4.0 < np.mean(stds) < 6.0  # grid nodes are N(0, sigma^2)


@given(points=st.integers(2, 6), size=st.integers(2, 80))
def test_cubic_weights_interpolate_the_grid(points, size):
    weights = cubic_weights(points, size)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    # Where a pixel sits exactly on a grid node, it takes that node's value.
    for j in range(points):
        position = j * (size - 1) / (points - 1)
        if position == int(position):
            expected = np.zeros(points)
            expected[j] = 1
            np.testing.assert_allclose(weights[int(position)], expected, atol=1e-12)


def test_intensity_jitter_changes_only_the_image():
    image, mask = _smooth_pattern(16, 16, 3)
    rng = np.random.default_rng(4)
    out = intensity_jitter(image, rng, gain=0.2, offset=0.1)
    gain = np.polyfit(image.ravel(), out.ravel(), 1)[0]
    assert 0.8 < gain < 1.25 and not np.allclose(out, image)
    augment = Augmenter(crop=None, flip=False, elastic_p=0.0, jitter=True)
    _, out_mask = augment(image, mask, rng)
    np.testing.assert_array_equal(out_mask, mask)


def test_augmenter_is_deterministic_by_generator():
    image, mask = _smooth_pattern(40, 40, 5)
    augment = Augmenter(crop=(24, 24), elastic_p=1.0)
    first = augment(image, mask, np.random.default_rng(7))
    second = augment(image, mask, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    third = augment(image, mask, np.random.default_rng(8))
    assert not np.array_equal(first[0], third[0])
