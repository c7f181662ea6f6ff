"""The Python API on arrays: tinyunet.fit, tinyunet.predict, ArrayDataset, tu.nn/optim."""

import subprocess
import sys

import numpy as np
import pytest

import tinyunet as tu
from tinyunet.data.arrays import ArrayDataset, image_to_chw
from tinyunet.data.images import DataError, normalize_percentile
from tinyunet.data.synthetic import SyntheticCells

TINY = dict(epochs=1, batch_size=2, depth=1, base_channels=2, crop=16,
            samples_per_epoch=4)


def _cells(count, size=(32, 32), seed=0):
    """Synthetic cells as a user holds them: uint16 (H, W) images, bool masks."""
    cells = SyntheticCells(count, size, seed=seed)
    images = [(np.clip(cells[i][0][0], 0, 2) * 20000).astype(np.uint16) for i in range(count)]
    return images, [cells[i][1].astype(bool) for i in range(count)]


def test_import_tinyunet_gives_nn_optim_and_functional():
    code = ("import tinyunet as tu; assert tu.optim.Adam and tu.nn.UNet and "
            "tu.functional.conv2d and tu.fit and tu.predict; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_fit_on_arrays_then_predict(tmp_path):
    images, masks = _cells(3)
    trainer = tu.fit(images, masks, verbose=False, out=str(tmp_path / "run"), **TINY)
    assert trainer.num_classes == 1 and len(trainer.history) == 1
    assert trainer.config.augment == "flips"  # the real-data default
    assert "rows" in trainer.data_description  # 3 images: validation strips
    for model in (trainer, trainer.model, tmp_path / "run" / "last.npz"):
        probabilities, labels = tu.predict(model, images[0])
        assert probabilities.shape == (1, 32, 32) and probabilities.dtype == np.float32
        np.testing.assert_array_equal(labels, probabilities[0] > 0.5)
    probabilities_tta, _ = tu.predict(trainer, images[0], tta=True, tile=32)
    assert probabilities_tta.shape == (1, 32, 32)
    # predict normalises as training did: the raw and the normalised image agree.
    same, _ = tu.predict(trainer, normalize_percentile(images[0][None].astype(np.float32)))
    np.testing.assert_allclose(same, tu.predict(trainer, images[0])[0], rtol=1e-4, atol=1e-5)
    # A list is an ensemble: the mean of its members' probabilities.
    tu.manual_seed(1)
    other = tu.nn.UNet(1, 1, depth=1, base_channels=2)
    mean, labels = tu.predict([trainer, other], images[0])
    np.testing.assert_allclose(mean, (tu.predict(trainer, images[0])[0]
                                      + tu.predict(other, images[0])[0]) / 2, rtol=1e-5)
    np.testing.assert_array_equal(labels, mean[0] > 0.5)
    with pytest.raises(ValueError, match="one model per call.*Actual: members=3"):
        tu.fit(images, masks, members=3)


def test_fit_with_validation_arrays_and_a_stack(tmp_path, capsys):
    images, masks = _cells(4)
    val_images, val_masks = _cells(1, seed=7)
    trainer = tu.fit(np.stack(images), np.stack(masks).astype(np.uint8) * 255,
                     val_images=val_images, val_masks=val_masks,
                     out=str(tmp_path / "run"), **TINY)
    assert len(trainer.train_set) == 4 and len(trainer.val_set) == 1
    assert set(np.unique(trainer.train_set.masks[0]).tolist()) <= {0, 1}  # 0/255 -> 0/1
    printed = capsys.readouterr().out
    assert "all 4 training images train" in printed and "epoch 1/1" in printed
    with pytest.raises(ValueError, match="'epoch'"):
        tu.fit(images, masks, epoch=3)
    with pytest.raises(ValueError, match="together"):
        tu.fit(images, masks, val_images=val_images)


def test_array_dataset_layouts_and_normalisation():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 4000, (20, 30, 3)).astype(np.uint16)
    chw = np.moveaxis(hwc, -1, 0)
    grey = rng.random((20, 30))
    masks = [rng.integers(0, 3, (20, 30)).astype(np.uint8) for _ in range(3)]
    dataset = ArrayDataset([hwc, chw, grey], masks)
    assert dataset.in_channels == 3 and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.images[0], dataset.images[1])
    np.testing.assert_allclose(dataset.images[0], normalize_percentile(chw.astype(np.float32)))
    assert dataset.images[2].shape == (3, 20, 30)             # grey repeated to RGB
    assert dataset.masks[0].dtype == np.uint8                 # kept small
    assert dataset[1][0] is dataset.images[1] and dataset.weights is None
    stack = ArrayDataset(rng.random((2, 2, 20, 30)), np.zeros((2, 20, 30), dtype=np.int32))
    assert len(stack) == 2 and stack.in_channels == 2 and stack.num_classes == 1


def test_array_dataset_errors_name_the_array():
    image = np.zeros((20, 30))
    with pytest.raises(DataError, match=r"mask array_0: Expect: the size of its image, 20x30"):
        ArrayDataset([image], [np.zeros((20, 31), dtype=np.uint8)])
    with pytest.raises(DataError, match="one mask per image"):
        ArrayDataset([image, image], [np.zeros((20, 30), dtype=np.uint8)])
    with pytest.raises(DataError, match="integer or bool mask"):
        ArrayDataset([image], [np.zeros((20, 30))])
    with pytest.raises(DataError, match="values >= 0"):
        ArrayDataset([image], [-np.ones((20, 30), dtype=np.int8)])
    with pytest.raises(DataError, match=r"image array_0: Expect: an image \(H, W\)"):
        image_to_chw(np.zeros((8, 20, 30)), "image array_0")
    with pytest.raises(DataError, match="weights array_0"):
        ArrayDataset([image], [np.zeros((20, 30), dtype=np.uint8)],
                     weights=[np.ones((20, 29))])
    with pytest.raises(DataError, match="NaN"):
        ArrayDataset([np.full((20, 30), np.nan)], [np.zeros((20, 30), dtype=np.uint8)])


def test_predict_matches_the_channels_of_the_model():
    tu.manual_seed(0)
    model = tu.nn.UNet(in_channels=3, num_classes=4, depth=1, base_channels=2)
    rng = np.random.default_rng(1)
    rgb = rng.random((24, 20, 3))
    probabilities, labels = tu.predict(model, rgb)
    assert probabilities.shape == (4, 24, 20) and labels.shape == (24, 20)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1, rtol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(axis=0))
    first = tu.predict(model, np.moveaxis(rgb, -1, 0))[0]
    np.testing.assert_allclose(first, probabilities, rtol=1e-5, atol=1e-6)
    assert tu.predict(model, rgb[..., 0])[0].shape == (4, 24, 20)  # grey repeated
    with pytest.raises(ValueError, match="predict"):
        tu.predict(model, rng.random((24, 20, 2)))


def test_the_command_line_refuses_to_rebuild_an_array_run(tmp_path, capsys):
    from tinyunet import cli

    images, masks = _cells(2)
    tu.fit(images, masks, verbose=False, out=str(tmp_path / "run"), **TINY)
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "run" / "last.npz")]) == 2
    assert "trained on arrays" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "run")]) == 2
    assert "resume it from Python" in capsys.readouterr().err
