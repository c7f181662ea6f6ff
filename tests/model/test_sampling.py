"""Training crops over the whole area, foreground-aware crops, the validation split."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyunet.data import Augmenter, sampling
from tinyunet.data.arrays import ArrayDataset
from tinyunet.data.sampling import (
    CropSampler,
    foreground_points,
    split_for_validation,
    split_indices,
    strip_rows,
)


def _dataset(shapes, foreground=0.3, seed=0, weights=False):
    """Random images of ``shapes`` with masks of about ``foreground`` share of ones."""
    rng = np.random.default_rng(seed)
    images = [rng.random(shape).astype(np.float32) for shape in shapes]
    masks = [(rng.random(shape) < foreground).astype(np.uint8) for shape in shapes]
    maps = [1 + 4 * mask.astype(np.float32) for mask in masks] if weights else None
    return ArrayDataset(images, masks, weights=maps)


# ---- foreground points -----------------------------------------------------------------------

def test_foreground_points_keep_all_when_few():
    mask = np.zeros((50, 60), dtype=np.uint16)
    mask[3, 4] = mask[40, 59] = 2
    points = foreground_points(mask, np.random.default_rng(0))
    assert points.dtype == np.int32
    np.testing.assert_array_equal(points, [3 * 60 + 4, 40 * 60 + 59])


@given(seed=st.integers(0, 2**31), block=st.integers(1, 5000))
def test_foreground_points_subsample_by_blocks(seed, block):
    rng = np.random.default_rng(seed)
    mask = rng.random((90, 70)) < rng.uniform(0.2, 0.9)
    original = sampling._BLOCK_PIXELS
    sampling._BLOCK_PIXELS = block  # many row blocks, as on a large image
    try:
        points = foreground_points(mask, np.random.default_rng(seed), limit=300)
        again = foreground_points(mask, np.random.default_rng(seed), limit=300)
    finally:
        sampling._BLOCK_PIXELS = original
    assert len(points) == min(300, mask.sum()) and points.dtype == np.int32
    assert (np.diff(points) > 0).all()            # sorted, no pixel twice
    assert mask.ravel()[points].all()             # every point is foreground
    np.testing.assert_array_equal(points, again)  # the same for the same seed


# ---- which images, where ------------------------------------------------------------------------

def test_equal_images_get_one_crop_each_per_epoch():
    sampler = CropSampler(_dataset([(20, 20)] * 7), (8, 8), (8, 8), 0.0, seed=0)
    order = sampler.epoch_order(7, np.random.default_rng(3))
    assert sorted(order.tolist()) == list(range(7))


def test_images_are_drawn_in_proportion_to_their_area():
    sampler = CropSampler(_dataset([(10, 10), (20, 20), (10, 30)]), (8, 8), (8, 8), 0.0, 0)
    for seed in range(5):
        counts = np.bincount(sampler.epoch_order(80, np.random.default_rng(seed)), minlength=3)
        expected = 80 * np.array([100, 400, 300]) / 800
        assert (np.abs(counts - expected) < 1).all() and counts.sum() == 80


def test_foreground_crops_find_sparse_foreground():
    """One foreground pixel in 200x200: uniform crops rarely see it, centred ones always."""
    mask = np.zeros((200, 200), dtype=np.uint8)
    mask[150, 37] = 1
    image = np.random.default_rng(0).random((200, 200)).astype(np.float32)
    dataset = ArrayDataset([image], [mask])
    rng = np.random.default_rng(1)
    centred = CropSampler(dataset, (32, 32), (32, 32), 1.0, seed=0)
    for _ in range(50):
        crop_image, crop_mask, weight = centred.crop(0, rng)
        assert crop_mask.shape == (32, 32) and weight is None
        # Within a quarter of the crop of its centre, so that it lies well inside.
        (y,), (x,) = np.nonzero(crop_mask)
        assert 8 <= y <= 24 and 8 <= x <= 24
    uniform = CropSampler(dataset, (32, 32), (32, 32), 0.0, seed=0)
    hits = sum(uniform.crop(0, rng)[1].any() for _ in range(50))
    assert hits < 10
    mixed = CropSampler(dataset, (32, 32), (32, 32), 1 / 3, seed=0)
    hits = sum(mixed.crop(0, rng)[1].any() for _ in range(300))
    assert 70 < hits < 140  # about a third


@given(seed=st.integers(0, 2**31), h=st.integers(5, 40), w=st.integers(5, 40),
       fraction=st.sampled_from([0.0, 0.5, 1.0]))
def test_crops_are_windows_of_the_image_mirrored_out_when_small(seed, h, w, fraction):
    rng = np.random.default_rng(seed)
    image = rng.random((2, h, w)).astype(np.float32)
    mask = (rng.random((h, w)) < 0.2).astype(np.uint8)
    weight = rng.random((h, w)).astype(np.float32)
    dataset = ArrayDataset([image], [mask], weights=[weight])
    dataset.images = [image]  # compare with the raw pixels, not the normalised ones
    sampler = CropSampler(dataset, (24, 24), (16, 16), fraction, seed=seed)
    crop_image, crop_mask, crop_weight = sampler.crop(0, rng)
    assert crop_image.shape == (2, 24, 24) and crop_mask.shape == crop_weight.shape == (24, 24)
    pads = ((0, 0), *[(max(0, 24 - s) // 2, max(0, 24 - s) - max(0, 24 - s) // 2)
                      for s in (h, w)])
    padded = np.pad(image, pads, mode="symmetric")
    # The crop is the padded image at one position: find it by its first pixel.
    found = [(top, left) for top in range(padded.shape[1] - 23)
             for left in range(padded.shape[2] - 23)
             if np.array_equal(padded[:, top : top + 24, left : left + 24], crop_image)]
    assert found
    top, left = found[0]
    np.testing.assert_array_equal(crop_mask, np.pad(mask, pads[1:], mode="symmetric")[
        top : top + 24, left : left + 24])
    np.testing.assert_array_equal(crop_weight, np.pad(weight, pads[1:], mode="symmetric")[
        top : top + 24, left : left + 24])


def test_weights_move_exactly_like_the_mask_through_augmentation():
    dataset = _dataset([(60, 50)], weights=True)
    sampler = CropSampler(dataset, (32, 32), (32, 32), 0.5, seed=0)
    augment = Augmenter(crop=None, elastic_p=1.0, elastic_sigma=6.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, mask, weight = sampler.crop(0, rng)
        np.testing.assert_array_equal(weight, 1 + 4 * mask)
        image, mask, weight = augment(image, mask, rng, weight=weight)
        assert weight.dtype == np.float32 and mask.shape == weight.shape
        np.testing.assert_array_equal(weight, 1 + 4 * mask)


def test_the_same_generator_state_gives_the_same_crops():
    sampler = CropSampler(_dataset([(40, 40), (30, 50)]), (16, 16), (16, 16), 1 / 3, seed=0)
    first = [sampler.crop(i % 2, np.random.default_rng(i))[1] for i in range(6)]
    second = [sampler.crop(i % 2, np.random.default_rng(i))[1] for i in range(6)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- the validation split ------------------------------------------------------------------------

def test_strip_rows():
    assert strip_rows(1000, 0.2, 64) == 200 and strip_rows(1100, 0.2, 64) == 220
    assert strip_rows(200, 0.2, 64) == 64      # at least one crop's worth of rows
    assert strip_rows(100, 0.2, 64) == 20      # unless the image is under twice that
    assert strip_rows(2, 0.2, 64) == 1 and strip_rows(130, 0.9, 64) == 66


def test_few_images_are_split_into_training_rows_and_validation_strips():
    dataset = _dataset([(100, 30), (150, 40)], weights=True)
    train, val, description = split_for_validation(dataset, 0.2, seed=0, min_rows=16)
    assert [m.shape for m in train.masks] == [(80, 30), (120, 40)]
    assert [m.shape for m in val.masks] == [(20, 30), (30, 40)]
    assert "last 20-30 rows" in description and "never reach" in description
    for part in (train, val):
        assert part.num_classes == dataset.num_classes and part.weights is not None
    for i in range(2):
        rows = train.masks[i].shape[0]
        np.testing.assert_array_equal(np.concatenate([train.images[i], val.images[i]], 1),
                                      dataset.images[i])
        np.testing.assert_array_equal(val.weights[i], dataset.weights[i][rows:])
        assert np.shares_memory(train.images[i], dataset.images[i])  # views, not copies


def test_five_or_more_images_are_split_by_image():
    dataset = _dataset([(20, 20)] * 6)
    train, val, description = split_for_validation(dataset, 0.2, seed=0, min_rows=32)
    assert len(train) == 5 and len(val) == 1 and "1 of 6 images" in description
    assert sorted(train.names + val.names) == sorted(dataset.names)


@given(sizes=st.lists(st.integers(1, 50), min_size=2, max_size=30),
       fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31), cap=st.integers(0, 400))
def test_held_out_pixels_are_capped_but_one_image_always_validates(sizes, fraction, seed, cap):
    train, val = split_indices(len(sizes), fraction, seed, sizes, cap)
    _, uncapped = split_indices(len(sizes), fraction, seed)
    assert sorted(train + val) == list(range(len(sizes))) and train and val
    assert set(val) <= set(uncapped)
    assert len(val) == 1 or sum(sizes[i] for i in val) <= cap
    # Only the cap stops it: one more image of the uncapped draw would pass it.
    if len(val) < len(uncapped):
        assert sum(sizes[i] for i in uncapped) > cap


def test_large_folders_hold_out_fewer_images():
    dataset = _dataset([(20, 20)] * 10)
    train, val, description = split_for_validation(dataset, 0.5, seed=0, min_rows=8,
                                                   max_pixels=900)
    assert len(val) == 2 and len(train) == 8
    assert "2 of 10 images" in description and "at most 0.0009 Mpx" in description
    _, val, description = split_for_validation(dataset, 0.5, seed=0, min_rows=8)
    assert len(val) == 5 and "Mpx" not in description


def test_large_images_give_shorter_strips():
    dataset = _dataset([(100, 50)] * 3)
    _, val, description = split_for_validation(dataset, 0.2, seed=0, min_rows=8,
                                               max_pixels=1500)
    assert [m.shape for m in val.masks] == [(10, 50)] * 3  # 1500 px / 3 images / 50 columns
    assert "at most 0.0015 Mpx" in description
    _, val, _ = split_for_validation(dataset, 0.2, seed=0, min_rows=16, max_pixels=1500)
    assert [m.shape for m in val.masks] == [(16, 50)] * 3  # never under a crop's rows


def test_an_image_of_one_row_cannot_give_a_strip():
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_for_validation(_dataset([(1, 30)]), 0.2, 0, 8)
