"""Overlap-tile prediction equals whole-image prediction where both fit."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tinyunet as tu
from tinyunet.data.tiling import (
    DIHEDRAL,
    _same_windows,
    balanced_tile,
    default_tile,
    dihedral_inverse,
    dihedral_transform,
    logits_to_labels,
    logits_to_probabilities,
    predict_logits,
    predict_tiled,
    receptive_halo,
)
from tinyunet.ensemble import Ensemble
from tinyunet.nn import UNet


def _model(padding, num_classes=2, depth=2, up="transpose", seed=0):
    tu.manual_seed(seed)
    return UNet(in_channels=1, num_classes=num_classes, depth=depth, base_channels=2,
                padding=padding, up=up).eval()


def _whole(model, image):
    with tu.no_grad():
        return model(tu.tensor(image[None])).numpy()[0]


@settings(max_examples=6)
@given(h=st.integers(20, 110), w=st.integers(20, 110), seed=st.integers(0, 1000),
       up=st.sampled_from(["transpose", "upsample"]))
def test_same_tiles_equal_the_whole_image(h, w, seed, up):
    model = _model("same", up=up)
    image = np.random.default_rng(seed).normal(size=(1, h, w)).astype(np.float32)
    halo = receptive_halo(2)
    # Tiles of 2 * halo + 8: several tiles per side for the larger images.
    tiled = predict_logits(model, image, tile=2 * halo + 8, batch_size=3)
    np.testing.assert_allclose(tiled, _whole(model, image), rtol=1e-4, atol=1e-5)


def test_same_tiles_cover_several_rows_and_columns():
    """A case that certainly stitches 3x3 tiles, with the image size off the 2**depth grid."""
    model = _model("same", num_classes=1)
    image = np.random.default_rng(1).normal(size=(1, 150, 141)).astype(np.float32)
    tiled = predict_logits(model, image, tile=80, halo=32)
    np.testing.assert_allclose(tiled, _whole(model, image), rtol=1e-4, atol=1e-5)
    # A halo too small for the receptive field no longer matches: the check can fail.
    too_small = predict_logits(model, image, tile=80, halo=4)
    assert np.abs(too_small - _whole(model, image)).max() > 1e-3


@settings(max_examples=5)
@given(rows=st.integers(0, 12), cols=st.integers(0, 12), seed=st.integers(0, 1000))
def test_valid_tiles_equal_the_whole_mirrored_image(rows, cols, seed):
    model = _model("valid")
    in_hw = model.valid_input_hw((40, 40))
    out_hw = model.output_hw(in_hw)
    margin = (in_hw[0] - out_hw[0]) // 2
    # Output sizes with a usable whole input: the 2**depth grid of valid input sizes.
    h, w = out_hw[0] + 4 * rows, out_hw[1] + 4 * cols
    image = np.random.default_rng(seed).normal(size=(1, h, w)).astype(np.float32)
    mirrored = np.pad(image, ((0, 0), (margin, margin), (margin, margin)), mode="reflect")
    whole = _whole(model, mirrored)
    assert whole.shape[1:] == (h, w)
    tiled = predict_logits(model, image, tile=in_hw[0])
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5)


def test_valid_prediction_of_an_odd_sized_image_has_its_size():
    model = _model("valid", num_classes=1)
    image = np.random.default_rng(2).normal(size=(1, 37, 53)).astype(np.float32)
    probabilities = predict_tiled(model, image, tile=40)
    assert probabilities.shape == (1, 37, 53)
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_probabilities_and_labels():
    logits = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
    p = logits_to_probabilities(logits)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(logits_to_labels(logits), logits.argmax(axis=0))
    one = logits[:1]
    np.testing.assert_array_equal(logits_to_labels(one), (one[0] > 0).astype(np.int64))
    np.testing.assert_allclose(logits_to_probabilities(one), 1 / (1 + np.exp(-one)), rtol=1e-6)


def test_bad_inputs_are_clear_errors():
    model = _model("same")
    with pytest.raises(ValueError, match=r"predict: Expect: an image of shape \(1, H, W\)"):
        predict_logits(model, np.zeros((3, 40, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="larger than 2 \\* halo"):
        predict_logits(model, np.zeros((1, 200, 200), dtype=np.float32), tile=40, halo=32)


# ---- the default tile and test-time augmentation -------------------------------------------------

def test_default_tile_covers_twice_the_halo_at_every_depth():
    for depth in range(1, 7):
        tile = default_tile(depth)
        assert tile % 2**depth == 0 and tile >= max(1024, 4 * receptive_halo(depth))
        assert tile - 2**depth < max(1024, 4 * receptive_halo(depth))  # the smallest such


@given(padded=st.integers(1, 3000), tile=st.integers(1, 1200), halo=st.integers(0, 200),
       depth=st.integers(0, 5))
def test_balanced_tiles_are_no_more_and_no_larger(padded, tile, halo, depth):
    align = 2**depth
    padded, tile = padded * align, tile * align
    assume(tile > 2 * halo)
    balanced = balanced_tile(padded, tile, halo, align)
    assert balanced % align == 0
    if padded <= tile:
        assert balanced == padded                                  # one tile, the whole side
    else:
        assert 2 * halo < balanced <= tile
        windows = _same_windows(padded, padded, balanced, halo)
        assert len(windows) <= len(_same_windows(padded, padded, tile, halo))
        assert windows[0][2] == 0 and windows[-1][3] == padded   # the whole side is kept
        pairs = zip(windows, windows[1:], strict=False)
        assert all(b[2] <= a[3] for a, b in pairs)                 # with no gap
    assert balanced_tile(1104, 1024, 144, 16) == 704   # a 1100-px image at depth 4


def test_default_tile_predicts_a_depth_4_image_larger_than_the_tile():
    tu.manual_seed(0)
    model = UNet(in_channels=1, num_classes=1, depth=4, base_channels=1).eval()
    image = np.random.default_rng(0).normal(size=(1, 1100, 40)).astype(np.float32)
    np.testing.assert_allclose(predict_logits(model, image), _whole(model, image),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@settings(max_examples=4)
@given(h=st.integers(9, 40), w=st.integers(9, 40), seed=st.integers(0, 1000),
       padding=st.sampled_from(["same", "valid"]), classes=st.sampled_from([1, 3]),
       view=st.sampled_from(DIHEDRAL[1:]))
def test_tta_is_equivariant(h, w, seed, padding, classes, view):
    """TTA of a flipped or rotated image is the flipped or rotated TTA output."""
    model = _model(padding, num_classes=classes, seed=seed)
    image = np.random.default_rng(seed).normal(size=(1, h, w)).astype(np.float32)
    turned = np.ascontiguousarray(dihedral_transform(image, *view))
    expected = dihedral_transform(predict_tiled(model, image, tile=40, tta=True), *view)
    np.testing.assert_allclose(predict_tiled(model, turned, tile=40, tta=True), expected,
                               rtol=1e-5, atol=1e-6)
    # The plain prediction is not equivariant (the net is not), so the check can fail.
    plain = dihedral_transform(predict_tiled(model, image, tile=40), *view)
    assert np.abs(predict_tiled(model, turned, tile=40) - plain).max() > 1e-4


def test_tta_averages_the_probabilities_of_the_eight_views():
    model = _model("same", num_classes=1)
    image = np.random.default_rng(3).normal(size=(1, 24, 20)).astype(np.float32)
    views = [dihedral_inverse(logits_to_probabilities(_whole(
        model, np.ascontiguousarray(dihedral_transform(image, *view)))), *view)
        for view in DIHEDRAL]
    np.testing.assert_allclose(predict_tiled(model, image, tta=True), np.mean(views, axis=0),
                               rtol=1e-5, atol=1e-6)
    logits = predict_logits(model, image, tta=True)
    np.testing.assert_allclose(logits_to_probabilities(logits), np.mean(views, axis=0),
                               rtol=1e-4, atol=1e-6)
    # Without tta, the prediction is the plain one.
    np.testing.assert_array_equal(predict_logits(model, image, tta=False),
                                  predict_logits(model, image))
    np.testing.assert_allclose(predict_logits(model, image), _whole(model, image),
                               rtol=1e-4, atol=1e-5)


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities():
    # Members of other depths and paddings: each predicts with its own tiles.
    members = [_model("same", num_classes=3, seed=1),
               _model("valid", num_classes=3, seed=2),
               _model("same", num_classes=3, depth=3, seed=3)]
    ensemble = Ensemble(members)
    image = np.random.default_rng(4).normal(size=(1, 30, 26)).astype(np.float32)
    for tta in (False, True):
        expected = np.mean([predict_tiled(member, image, tta=tta) for member in members],
                           axis=0)
        np.testing.assert_allclose(predict_tiled(ensemble, image, tta=tta), expected,
                                   rtol=1e-6, atol=1e-7)
        labels = logits_to_labels(predict_logits(ensemble, image, tta=tta))
        np.testing.assert_array_equal(labels, expected.argmax(axis=0))
    # The members disagree somewhere, so the mean is not any one member's.
    assert not np.allclose(predict_tiled(ensemble, image), predict_tiled(members[0], image))


def test_an_ensemble_refuses_members_of_other_classes_or_channels():
    with pytest.raises(ValueError, match=r"num_classes 3 in every member \(as in a.npz\)\. "
                       r"Actual: 2 in b.npz"):
        Ensemble([_model("same", num_classes=3), _model("same", num_classes=2)],
                 ["a.npz", "b.npz"])
    rgb = UNet(in_channels=3, num_classes=3, depth=2, base_channels=2)
    with pytest.raises(ValueError, match="in_channels 1 in every member.*Actual: 3 in member 2"):
        Ensemble([_model("same", num_classes=3), rgb])
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble([])


def test_dihedral_views_are_the_eight_symmetries_and_invert():
    square = np.arange(9).reshape(1, 3, 3)
    seen = {dihedral_transform(square, *view).tobytes() for view in DIHEDRAL}
    assert len(seen) == 8
    image = np.arange(12).reshape(1, 3, 4)
    for view in DIHEDRAL:
        np.testing.assert_array_equal(dihedral_inverse(dihedral_transform(image, *view),
                                                       *view), image)
