"""Image and mask I/O: every TIFF dtype, PNG depths and palettes, the channel rule,
multi-page files, mask kinds (explicit and auto), and the errors for bad input."""

import struct
import zlib
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyunet.data import (
    DataError,
    FolderDataset,
    interpret_masks,
    normalize_percentile,
    parse_channels,
    read_array,
    read_image,
    read_mask,
    regions_per_label,
)
from tinyunet.data.instances import instance_targets

Image = pytest.importorskip("PIL.Image")
tifffile = pytest.importorskip("tifffile")

H, W = 20, 24


def _folder(tmp_path, name="data"):
    root = tmp_path / name
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return root


def _grey(seed=0, h=H, w=W):
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def _pair(root, stem, image, mask, mask_ext="png"):
    """Save ``image`` as PNG and ``mask`` (H, W) in ``mask_ext``."""
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    path = root / "masks" / f"{stem}.{mask_ext}"
    if mask_ext == "npy":
        np.save(path, mask)
    elif mask_ext == "tif":
        tifffile.imwrite(path, mask)
    else:
        Image.fromarray(mask).save(path)


# ---- TIFF: every dtype ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int8", "int16", "int32",
                                   "float32", "float64", "bool"])
def test_tiff_keeps_every_dtype_exactly(tmp_path, dtype):
    rng = np.random.default_rng(1)
    if dtype == "bool":
        data = rng.random((H, W)) > 0.5
    elif np.dtype(dtype).kind == "f":
        data = (rng.standard_normal((H, W)) * 1e4).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, (H, W), endpoint=True, dtype=dtype)
        data[0, :2] = info.min, info.max
    path = tmp_path / f"{dtype}.tif"
    tifffile.imwrite(path, data)
    back = read_array(path)
    assert back.dtype == data.dtype and back.shape == data.shape
    np.testing.assert_array_equal(back, data)
    image = read_image(path)
    assert image.shape == (1, H, W) and image.dtype == np.float32
    np.testing.assert_allclose(image, normalize_percentile(data[None].astype(np.float32)))


def test_16_bit_rgb_tiff_stays_16_bit_and_3_channels(tmp_path):
    data = np.random.default_rng(2).integers(0, 65536, (H, W, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    back = read_array(path)
    assert back.dtype == np.uint16 and back.shape == (H, W, 3)
    np.testing.assert_array_equal(back, data)
    image = read_image(path)
    assert image.shape == (3, H, W)
    np.testing.assert_allclose(image, normalize_percentile(np.moveaxis(data, -1, 0)))


def test_unreadable_tiff_is_named(tmp_path):
    path = tmp_path / "broken.tif"
    path.write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(DataError, match=r"broken\.tif.*unreadable"):
        read_array(path)


def test_lzw_tiff_is_read_exactly_or_named_with_the_missing_codec(tmp_path):
    data = (np.arange(H * W).reshape(H, W) * 97 % 65536).astype(np.uint16)
    path = tmp_path / "lzw.tif"
    Image.fromarray(data).save(path, compression="tiff_lzw")
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"lzw\.tif.*pip install imagecodecs"):
            read_array(path)
    else:
        np.testing.assert_array_equal(read_array(path), data)


# ---- PNG -----------------------------------------------------------------------------------

def test_16_bit_grey_png_stays_16_bit(tmp_path):
    data = np.random.default_rng(3).integers(0, 65536, (H, W), dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(data).save(path)
    back = read_array(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, data)


def _png(path, array, colour_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour)."""
    h, w = array.shape[:2]
    big_endian = array.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_colour_png_is_refused_not_cut_to_8_bits(tmp_path):
    path = tmp_path / "rgb16.png"
    _png(path, np.full((H, W, 3), 40000, dtype=np.uint16), colour_type=2)
    with Image.open(path) as opened:  # what Pillow alone would give: 8 bits
        assert np.asarray(opened).dtype == np.uint8
    with pytest.raises(DataError, match=r"rgb16\.png.*16-bit RGB"):
        read_array(path)


def _palette_png(path, indices):
    image = Image.frombytes("P", indices.shape[::-1], indices.astype(np.uint8).tobytes())
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * 753)
    image.save(path)


def test_palette_png_is_read_as_its_indices(tmp_path):
    indices = np.zeros((H, W), dtype=np.uint8)
    indices[2:8, 3:9], indices[10:16, 12:20], indices[1:4, 15:22] = 1, 2, 3
    path = tmp_path / "voc.png"
    _palette_png(path, indices)
    back = read_array(path)
    assert back.dtype == np.uint8 and back.shape == (H, W)
    np.testing.assert_array_equal(back, indices)


# ---- the channel rule --------------------------------------------------------------------

@pytest.mark.parametrize("channels", [2, 4])
def test_2_and_4_channels_are_all_kept(tmp_path, channels):
    data = np.random.default_rng(4).integers(0, 256, (H, W, channels), dtype=np.uint8)
    expected = normalize_percentile(np.moveaxis(data, -1, 0))
    png = tmp_path / "a.png"
    Image.fromarray(data).save(png)  # LA or RGBA
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, data, photometric="minisblack", planarconfig="contig")
    npy = tmp_path / "a.npy"
    np.save(npy, data)
    for path in (png, tif, npy):
        image = read_image(path)
        assert image.shape == (channels, H, W), path
        np.testing.assert_allclose(image, expected, err_msg=str(path))


@pytest.mark.parametrize("how", ["planar", "imagej", "ome"])
def test_channels_first_tiff(tmp_path, how):
    data = np.random.default_rng(5).integers(0, 4096, (3, H, W), dtype=np.uint16)
    path = tmp_path / f"{how}.tif"
    if how == "planar":
        tifffile.imwrite(path, data, photometric="rgb", planarconfig="separate")
    elif how == "imagej":  # one page per channel
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    np.testing.assert_array_equal(read_array(path), data)
    np.testing.assert_allclose(read_image(path), normalize_percentile(data))


def test_shape_outside_the_channel_rule_is_named(tmp_path):
    path = tmp_path / "odd.npy"
    np.save(path, np.zeros((H, W, 7), dtype=np.float32))
    with pytest.raises(DataError, match=r"odd\.npy.*\(20, 24, 7\)"):
        read_image(path)


def test_parse_channels():
    assert parse_channels("0,2") == (0, 2)
    assert parse_channels(" 3 , 1") == (3, 1)
    for bad in ("", "a", "0,,1", "-1", "1.5", "0,0"):
        with pytest.raises(ValueError, match="--channels"):
            parse_channels(bad)


def test_channels_pick_and_order_image_channels(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(data).save(path)
    full = read_image(path)
    np.testing.assert_array_equal(read_image(path, channels=(2, 0)), full[[2, 0]])
    with pytest.raises(DataError, match=r"rgb\.png.*0\.\.2.*\(0, 3\)"):
        read_image(path, channels=(0, 3))


# ---- multi-page files -------------------------------------------------------------------

def test_z_stack_is_refused_unless_a_page_is_picked(tmp_path):
    stack = np.random.default_rng(7).integers(0, 65536, (5, H, W), dtype=np.uint16)
    plain = tmp_path / "stack.tif"
    tifffile.imwrite(plain, stack)
    imagej = tmp_path / "imagej.tif"
    tifffile.imwrite(imagej, stack[:3], imagej=True, metadata={"axes": "ZYX"})
    ome = tmp_path / "ome.tif"
    tifffile.imwrite(ome, stack[:2, None].repeat(2, 1), ome=True, metadata={"axes": "ZCYX"})
    for path, pages, shape in ((plain, 5, r"\(5, 20, 24\)"), (imagej, 3, "'ZYX'"),
                               (ome, 4, r"OME-TIFF series 0: shape \(2, 2, 20, 24\)")):
        with pytest.raises(DataError, match=rf"{path.name}.*{pages} pages.*{shape}.*--page"):
            read_array(path)
    np.testing.assert_array_equal(read_array(plain, page=3), stack[3])
    np.testing.assert_array_equal(read_array(imagej, page=2), stack[2])
    with pytest.raises(DataError, match=r"stack\.tif.*0\.\.4.*page 5"):
        read_array(plain, page=5)


def test_two_images_in_one_tiff_are_refused(tmp_path):
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, np.zeros((H, W), np.uint8))
    tifffile.imwrite(path, np.ones((H + 2, W), np.uint8), append=True)
    with pytest.raises(DataError, match=r"two\.tif.*2 pages.*series 1"):
        read_array(path)
    np.testing.assert_array_equal(read_array(path, page=1), np.ones((H + 2, W)))


def test_page_picks_images_and_masks_of_a_folder(tmp_path):
    root = _folder(tmp_path)
    stack = np.random.default_rng(8).integers(0, 256, (6, H, W), dtype=np.uint8)
    masks = np.zeros((6, H, W), dtype=np.uint8)
    masks[:, 3:9, 4:12] = 1
    masks[2, 12:, :] = 1
    tifffile.imwrite(root / "images" / "z.tif", stack)
    tifffile.imwrite(root / "masks" / "z.tif", masks)
    with pytest.raises(DataError, match=r"z\.tif.*6 pages"):
        FolderDataset(root)
    dataset = FolderDataset(root, page=2)
    np.testing.assert_allclose(dataset[0][0], normalize_percentile(stack[2:3]))
    np.testing.assert_array_equal(dataset[0][1], masks[2])


# ---- mask kinds --------------------------------------------------------------------------

def _blobs(ids_per_row=4, rows=3, size=5, touching=True):
    """Square objects with ids 1..N on a grid; with ``touching`` each pair of grid
    neighbours in a row shares an edge."""
    gap = 0 if touching else 1
    mask = np.zeros((rows * (size + 2) + 2, ids_per_row * (size + gap) + 4), dtype=np.uint16)
    label = 0
    for r in range(rows):
        for c in range(ids_per_row):
            label += 1
            top, left = 1 + r * (size + 2), 2 + c * (size + gap)
            mask[top : top + size, left : left + size] = label
    return mask


def _dataset(tmp_path, labels, ext="png", name="data", **options):
    root = _folder(tmp_path, name)
    for i, mask in enumerate(labels):
        _pair(root, f"m{i}", _grey(i, *mask.shape), mask, ext)
    return FolderDataset(root, **options)


@pytest.mark.parametrize("encoding", ["0/255", "0/1", "bool"])
def test_binary_masks_become_0_1(tmp_path, encoding):
    truth = np.zeros((H, W), dtype=bool)
    truth[4:12, 6:18] = True
    stored = {"0/255": truth.astype(np.uint8) * 255, "0/1": truth.astype(np.uint8),
              "bool": truth}[encoding]
    ext = "npy" if encoding == "bool" else "png"
    for kind in ("auto", "binary"):
        dataset = _dataset(tmp_path, [stored, stored], ext, name=kind, masks=kind)
        assert dataset.mask_kind == "binary" and dataset.num_classes == 1
        assert dataset.masks[0].dtype == np.uint8
        np.testing.assert_array_equal(dataset[1][1], truth)
        assert dataset.notes[-1].startswith("masks: binary")
        assert dataset.instances is None and not dataset.warnings


def _class_mask(seed):
    """Labels 0..3, each class spread over several regions."""
    mask = np.zeros((H, W), dtype=np.uint8)
    for k, column in enumerate((2, 8, 14), start=1):
        mask[2:6, column : column + 3] = k
        mask[10:14, column : column + 3] = k
        mask[16:19, column + seed : column + seed + 2] = k
    return mask


def test_class_masks_auto_and_explicit(tmp_path):
    masks = [_class_mask(0), _class_mask(1)]
    for kind in ("auto", "classes"):
        dataset = _dataset(tmp_path, masks, "tif", name=kind, masks=kind)
        assert dataset.mask_kind == "classes" and dataset.num_classes == 4
        assert dataset.masks[0].dtype == np.uint8
        np.testing.assert_array_equal(dataset[1][1], masks[1])
    assert "classes 0..3" in dataset.notes[-1]


def test_palette_png_masks_are_classes(tmp_path):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:8, 3:9], mask[10:16, 12:20] = 1, 2
    root = _folder(tmp_path)
    Image.fromarray(_grey()).save(root / "images" / "a.png")
    _palette_png(root / "masks" / "a.png", mask)
    dataset = FolderDataset(root)
    assert dataset.mask_kind == "classes" and dataset.num_classes == 3
    assert "palette" in dataset.notes[-1]
    np.testing.assert_array_equal(dataset[0][1], mask)


def test_instance_masks_with_touching_objects(tmp_path):
    masks = [_blobs(4, 3), _blobs(3, 3)]  # 12 and 9 objects, touching in rows
    masks[1] = masks[1][:, : masks[0].shape[1]]
    masks[1] = np.pad(masks[1], ((0, 0), (0, masks[0].shape[1] - masks[1].shape[1])))
    for kind in ("auto", "instances"):
        dataset = _dataset(tmp_path, masks, "tif", name=kind, masks=kind)
        # Three classes: background, cell, and the border where cells touch.
        assert dataset.mask_kind == "instances" and dataset.num_classes == 3
        for ids, target, mask in zip(dataset.instances, dataset.masks, masks, strict=True):
            assert ids.dtype == np.uint16 and target.dtype == np.uint8
            np.testing.assert_array_equal(ids, mask)
            np.testing.assert_array_equal(target > 0, mask > 0)
            np.testing.assert_array_equal(target, instance_targets(mask))
            assert (target == 2).any()
        # 3 touching pairs per row of 4, 3 rows; 2 per row of 3.
        assert "ids up to 12 in 2 files; 15 pairs of touching objects" in dataset.notes[-1]
        reason = "100% of ids are one connected region" if kind == "auto" else "as the masks"
        assert reason in dataset.notes[-1]


def test_few_single_region_labels_with_a_varying_count_are_instances(tmp_path):
    one, two = _blobs(2, 1, touching=False), _blobs(2, 1, touching=False)
    one[one == 2] = 0  # 1 object here, 2 there
    dataset = _dataset(tmp_path, [one, two], "tif")
    assert dataset.mask_kind == "instances"
    assert "a different number per file" in dataset.notes[-1]


def test_label_gaps_are_refused_naming_the_file_and_labels(tmp_path):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:8, 3:9], mask[10:16, 12:20] = 1, 3
    for kind in ("auto", "classes"):
        with pytest.raises(DataError, match=r"masks.m0\.png.*\{0, 1, 3\}.*no mask holds \{2\}"):
            _dataset(tmp_path, [mask, mask], name=f"gap_{kind}", masks=kind)
        five = np.where(mask == 1, 5, 0).astype(np.uint8)
        with pytest.raises(DataError, match=r"m0\.png.*\{0, 5\}.*\{1, 2, 3, 4\}"):
            _dataset(tmp_path, [five], name=f"five_{kind}", masks=kind)


def test_mixed_encodings_are_refused_unless_the_kind_is_given(tmp_path):
    white = np.zeros((H, W), dtype=np.uint8)
    white[4:12, 6:18] = 255
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2:6, 2:6], labels[10:14, 10:14] = 1, 2
    with pytest.raises(DataError, match=r"m1\.png.*\{0, 1, 2\}.*0/255 in .*m0\.png"):
        _dataset(tmp_path, [white, labels], name="mixed")
    # Given explicitly, values that fit the kind are read as it says.
    dataset = _dataset(tmp_path, [white, labels], name="as_ids", masks="instances")
    assert dataset.mask_kind == "instances"
    np.testing.assert_array_equal(dataset.instances[0], white)
    with pytest.raises(DataError, match=r"m1\.png.*binary.*\{0, 1, 2\}"):
        _dataset(tmp_path, [white, labels], name="as_binary", masks="binary")


def test_masks_use_the_smallest_unsigned_dtype():
    many = (np.arange(H * W).reshape(H, W) % 300).astype(np.uint16)  # labels 0..299
    classes = interpret_masks([many], ["many.tif"], "classes")
    assert classes.masks[0].dtype == np.uint16 and classes.num_classes == 300
    ids = np.zeros((H, W), dtype=np.uint32)
    ids[2:6, 2:6], ids[8:12, 8:12] = 70000, 3
    instances = interpret_masks([ids], ["ids.npy"], "instances")
    assert instances.instances[0].dtype == np.uint32 and instances.masks[0].dtype == np.uint8


def test_read_mask_holds_labels_in_the_smallest_dtype(tmp_path):
    for dtype, largest, expected in ((np.int64, 3, np.uint8), (np.float64, 300, np.uint16),
                                     (np.int32, 70000, np.uint32)):
        labels = np.zeros((H, W), dtype=dtype)
        labels[3:7, 3:7] = largest
        path = tmp_path / f"{np.dtype(dtype).name}.npy"
        np.save(path, labels)
        mask = read_mask(path)
        assert mask.dtype == expected
        np.testing.assert_array_equal(mask, labels)


def test_folder_masks_are_uint8(tmp_path):
    wide = np.zeros((H, W), dtype=np.int64)
    wide[4:12, 6:18] = 1
    dataset = _dataset(tmp_path, [wide, wide], "npy")
    assert all(mask.dtype == np.uint8 for mask in dataset.masks)


def test_empty_masks_warn_instead_of_failing(tmp_path):
    dataset = _dataset(tmp_path, [np.zeros((H, W), np.uint8)] * 2)
    assert dataset.mask_kind == "binary"
    assert len(dataset.warnings) == 1 and "every mask is empty" in dataset.warnings[0]


def test_masks_in_memory_are_checked_like_files():
    labels = np.zeros((H, W), dtype=np.int64)
    labels[2:5, 2:5] = -1
    with pytest.raises(DataError, match="array 0: Expect: mask values >= 0. Actual: minimum -1"):
        interpret_masks([labels], ["array 0"])
    with pytest.raises(DataError, match="array 1: Expect: integer"):
        interpret_masks([np.zeros((H, W)), np.full((H, W), 0.5)], ["array 0", "array 1"])


def test_unknown_mask_kind_is_refused():
    with pytest.raises(ValueError, match="masks.*'boxes'"):
        interpret_masks([np.zeros((H, W), np.uint8)], ["a.png"], "boxes")


# ---- channels in a folder -----------------------------------------------------------------

def test_folder_channel_counts_must_agree(tmp_path):
    root = _folder(tmp_path)
    mask = np.zeros((H, W), dtype=np.uint8)
    rgb = np.random.default_rng(9).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / "a.png")
    Image.fromarray(_grey()).save(root / "images" / "b.png")
    for stem in "ab":
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    dataset = FolderDataset(root)
    assert dataset.in_channels == 3 and dataset[1][0].shape == (3, H, W)
    assert any("b.png" in note and "repeated to 3 channels" in note for note in dataset.notes)

    Image.fromarray(rgb[..., :2]).save(root / "images" / "b.png")  # grey + alpha
    with pytest.raises(DataError, match=r"a\.png: Expect: 2 channel.*b\.png.*Actual: 3"):
        FolderDataset(root)
    dataset = FolderDataset(root, channels=(0, 1))
    assert dataset.in_channels == 2
    np.testing.assert_allclose(dataset[0][0], normalize_percentile(np.moveaxis(rgb, -1, 0))[:2])
    with pytest.raises(DataError, match=r"b\.png.*0\.\.1.*\(0, 2\)"):
        FolderDataset(root, channels=(0, 2))


# ---- connected regions against a flood fill ------------------------------------------------

def _regions_by_flood_fill(labels):
    seen = np.zeros(labels.shape, dtype=bool)
    regions = {}
    for y, x in zip(*np.nonzero(labels), strict=True):
        if seen[y, x]:
            continue
        value = labels[y, x]
        regions[value] = regions.get(value, 0) + 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if (0 <= ny < labels.shape[0] and 0 <= nx < labels.shape[1]
                            and not seen[ny, nx] and labels[ny, nx] == value):
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return regions


@settings(max_examples=60)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)),
              elements=st.integers(0, 3)))
def test_regions_per_label_matches_a_flood_fill(labels):
    values, regions = regions_per_label(labels)
    assert dict(zip(values.tolist(), regions.tolist(), strict=True)) == \
        {int(k): v for k, v in _regions_by_flood_fill(labels).items()}


def test_regions_per_label_on_shapes_that_need_several_rounds():
    spiral = np.zeros((9, 9), dtype=np.uint8)
    spiral[0, :], spiral[:, 8], spiral[8, :], spiral[2:, 0] = 1, 1, 1, 1
    spiral[2, :7], spiral[2:7, 6], spiral[6, 2:7], spiral[4:7, 2] = 1, 1, 1, 1
    spiral[4, 4] = 2
    spiral[7, 4] = 2
    values, regions = regions_per_label(spiral)
    assert values.tolist() == [1, 2] and regions.tolist() == [1, 2]
    assert _regions_by_flood_fill(spiral) == {1: 1, 2: 2}
    diagonal = np.eye(6, dtype=np.uint8) * 5  # 8-connected: one region
    assert regions_per_label(diagonal)[1].tolist() == [1]
