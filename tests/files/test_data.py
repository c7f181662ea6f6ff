"""Synthetic cells, folder datasets (formats, normalisation, errors) and the split."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyunet.data import (
    DataError,
    FolderDataset,
    SyntheticCells,
    normalize_percentile,
    split_indices,
)
from tinyunet.data.synthetic import border_classes, make_nuclei

Image = pytest.importorskip("PIL.Image")


# ---- synthetic ------------------------------------------------------------------------

def test_synthetic_is_deterministic_per_seed_and_index():
    a = SyntheticCells(4, (48, 64), seed=3)
    b = SyntheticCells(4, (48, 64), seed=3)
    # b is read in order, a in another order: sample i does not depend on the order.
    b_images = [b[i][0] for i in range(4)]
    for i in (3, 1, 0, 2):
        np.testing.assert_array_equal(a[i][0], b_images[i])
    np.testing.assert_array_equal(a[2][1], b[2][1])
    other = SyntheticCells(4, (48, 64), seed=4)
    assert not np.array_equal(a[0][0], other[0][0])
    assert not np.array_equal(a[0][0], a[1][0])


def test_synthetic_shapes_and_classes():
    binary = SyntheticCells(3, (40, 56), seed=0)
    image, mask = binary[0]
    assert image.shape == (1, 40, 56) and image.dtype == np.float32
    assert mask.shape == (40, 56) and mask.dtype == np.int64
    assert binary.num_classes == 1 and binary.in_channels == 1
    for i in range(3):
        assert set(np.unique(binary[i][1])) == {0, 1}

    multi = SyntheticCells(3, (40, 56), seed=0, kind="multiclass")
    assert multi.num_classes == 3
    # Same scene, so the cells of the multi-class mask are the binary mask's cells.
    np.testing.assert_array_equal(multi[0][1] > 0, mask > 0)
    assert set(np.unique(multi[0][1])) == {0, 1, 2}


def test_synthetic_cells_are_brighter_than_background():
    dataset = SyntheticCells(4, (64, 64), seed=1)
    for i in range(4):
        image, mask = dataset[i]
        assert image[0][mask == 1].mean() > image[0][mask == 0].mean() + 0.2


def test_border_classes_separate_touching_cells():
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2  # touches cell 1 along a column
    classes = border_classes(labels)
    assert (classes[labels == 0] == 0).all()
    # The two columns where the cells meet are border, as is each cell's outline.
    assert (classes[1:5, 3] == 2).all() and (classes[1:5, 4] == 2).all()
    assert (classes[1, 1:7] == 2).all() and (classes[4, 1:7] == 2).all()
    # Each 4x3 cell keeps an interior of 2x1 pixels.
    assert (classes[2:4, 2] == 1).all() and (classes[2:4, 5] == 1).all()
    assert (classes == 1).sum() == 4


@pytest.mark.slow
def test_synthetic_nuclei_past_65535_keep_distinct_ids():
    # About 77,000 nuclei of radius 1: uint16 would wrap the ids past 65535.
    _, ids = make_nuclei(np.random.default_rng(0), 1100, 1100, radius=(1.0, 1.0),
                         coverage=(0.2, 0.2))
    assert ids.dtype == np.uint32 and ids.max() > 65535


def test_synthetic_nuclei_are_16_bit_instances_of_a_fixed_size():
    image, ids = make_nuclei(np.random.default_rng(5), 96, 120)
    assert image.dtype == ids.dtype == np.uint16 and image.shape == ids.shape == (96, 120)
    again, same_ids = make_nuclei(np.random.default_rng(5), 96, 120)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(ids, same_ids)
    # Every id that survives the overlaps is drawn, and nuclei are brighter than the rest.
    assert image[ids > 0].mean() > image[ids == 0].mean() + 200
    # Touching nuclei: some pixels have a right or lower neighbour with another id.
    right = (ids[:, :-1] > 0) & (ids[:, 1:] > 0) & (ids[:, :-1] != ids[:, 1:])
    below = (ids[:-1] > 0) & (ids[1:] > 0) & (ids[:-1] != ids[1:])
    assert right.any() or below.any()
    # The nuclei's size does not grow with the image: a 4x larger field, 4x more nuclei.
    counts = []
    for side in (100, 200):
        areas = [np.bincount(make_nuclei(np.random.default_rng(seed), side, side,
                                         coverage=(0.3, 0.3))[1].ravel())[1:]
                 for seed in range(3)]
        counts.append(np.mean([np.count_nonzero(a) for a in areas]))
        assert 50 < np.mean([a[a > 0].mean() for a in areas]) < 400  # pi * 8**2 ~ 200
    assert 3 < counts[1] / counts[0] < 5


def test_a_folder_of_synthetic_nuclei_reads_as_instances(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    root = _folder(tmp_path, "nuclei")
    for i in range(3):
        image, ids = make_nuclei(np.random.default_rng(i), 64, 64, coverage=(0.4, 0.4))
        tifffile.imwrite(root / "images" / f"n{i}.tif", image)
        tifffile.imwrite(root / "masks" / f"n{i}.tif", ids)
    dataset = FolderDataset(root)
    assert dataset.mask_kind == "instances"
    assert any(note.startswith("masks: instances") for note in dataset.notes)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        SyntheticCells(2, kind="rainbow")
    with pytest.raises(ValueError, match="count"):
        SyntheticCells(0)


# ---- folders ----------------------------------------------------------------------------

def _folder(tmp_path, name="data"):
    root = tmp_path / name
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return root


def _pattern(h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w)).astype(np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[4:12, 6:18] = 1
    return image, mask


def test_folder_reads_png_tiff_npy_grey_and_rgb(tmp_path):
    root = _folder(tmp_path)
    image, mask = _pattern()
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(mask * 255).save(root / "masks" / "a.png")
    Image.fromarray(np.stack([image] * 3, -1)).save(root / "images" / "b.tif")
    Image.fromarray(mask).save(root / "masks" / "b.tiff")
    np.save(root / "images" / "c.npy", image.astype(np.float64) * 10)
    np.save(root / "masks" / "c.npy", mask.astype(np.int32))

    dataset = FolderDataset(root)
    assert dataset.names == ["a", "b", "c"]
    assert dataset.in_channels == 3  # one RGB image makes every sample RGB
    assert dataset.num_classes == 1  # all masks are binary
    for i in range(3):
        x, y = dataset[i]
        assert x.shape == (3, 20, 24) and x.dtype == np.float32
        np.testing.assert_array_equal(y, mask.astype(np.int64))
    # The same pixels, scaled differently and stored differently, normalise alike.
    np.testing.assert_allclose(dataset[0][0], dataset[2][0], atol=1e-5)
    np.testing.assert_allclose(dataset[0][0], dataset[1][0], atol=1e-5)


def test_folder_label_masks_give_a_multiclass_problem(tmp_path):
    root = _folder(tmp_path)
    for stem in ("x", "y"):
        image, mask = _pattern()
        mask[14:18, 2:6] = 2
        mask[14:18, 10:14] = 3
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    dataset = FolderDataset(root)
    assert dataset.num_classes == 4 and dataset.in_channels == 1
    assert dataset.mask_kind == "classes"
    assert set(np.unique(dataset[1][1])) == {0, 1, 2, 3}


def test_normalize_percentile_maps_percentiles_to_0_and_1():
    rng = np.random.default_rng(0)
    image = rng.normal(500, 40, (2, 50, 50))
    out = normalize_percentile(image)
    for channel in out:
        assert abs(np.percentile(channel, 1.0)) < 1e-4
        assert abs(np.percentile(channel, 99.8) - 1) < 1e-4
    flat = normalize_percentile(np.full((1, 4, 4), 7.0))
    assert (flat == 0).all()


def test_missing_mask_names_the_image(tmp_path):
    root = _folder(tmp_path)
    image, mask = _pattern()
    Image.fromarray(image).save(root / "images" / "lonely.png")
    with pytest.raises(DataError, match="lonely.png"):
        FolderDataset(root)


def test_missing_image_names_the_mask(tmp_path):
    root = _folder(tmp_path)
    image, mask = _pattern()
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "orphan.png")
    with pytest.raises(DataError, match="orphan.png"):
        FolderDataset(root)


def test_size_mismatch_names_the_file(tmp_path):
    root = _folder(tmp_path)
    image, mask = _pattern()
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(mask[:, :20]).save(root / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*24.*20"):
        FolderDataset(root)


def test_unreadable_file_is_named(tmp_path):
    root = _folder(tmp_path)
    image, mask = _pattern()
    (root / "images" / "broken.png").write_bytes(b"this is not a png")
    Image.fromarray(mask).save(root / "masks" / "broken.png")
    with pytest.raises(DataError, match="broken.png.*unreadable"):
        FolderDataset(root)


def test_bad_layouts_and_masks_are_errors(tmp_path):
    with pytest.raises(DataError, match="images/ and masks/"):
        FolderDataset(tmp_path / "nowhere")
    root = _folder(tmp_path, "empty")
    with pytest.raises(DataError, match="no images"):
        FolderDataset(root)

    root = _folder(tmp_path, "dupes")
    image, mask = _pattern()
    Image.fromarray(image).save(root / "images" / "a.png")
    np.save(root / "images" / "a.npy", image)
    Image.fromarray(mask).save(root / "masks" / "a.png")
    with pytest.raises(DataError, match="share the stem 'a'"):
        FolderDataset(root)

    root = _folder(tmp_path, "grey_mask")
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(image).save(root / "masks" / "a.png")  # an image given as a mask
    with pytest.raises(DataError, match=r"masks.a\.png.*binary mask"):
        FolderDataset(root)

    root = _folder(tmp_path, "fractional")
    Image.fromarray(image).save(root / "images" / "a.png")
    np.save(root / "masks" / "a.npy", mask * 0.5)
    with pytest.raises(DataError, match=r"a\.npy.*integer"):
        FolderDataset(root)


@given(count=st.integers(2, 60), fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**31))
def test_split_is_a_seeded_partition(count, fraction, seed):
    train, val = split_indices(count, fraction, seed)
    assert sorted(train + val) == list(range(count))
    assert train and val
    assert (train, val) == split_indices(count, fraction, seed)


def test_split_depends_on_seed_and_needs_two_samples(tmp_path):
    assert split_indices(40, 0.25, 0) != split_indices(40, 0.25, 1)
    assert len(split_indices(40, 0.25, 0)[1]) == 10
    with pytest.raises(DataError, match="at least 2"):
        split_indices(1, 0.2, 0)
