"""Instance masks, --masks/--channels/--page and object scores, wired through training,
the checkpoint and the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tinyunet.data.instances import weight_map
from tinyunet.train import (
    TrainConfig,
    Trainer,
    config_from_checkpoint,
    dice_iou,
    pixel_scores,
    prepare_datasets,
)

tifffile = pytest.importorskip("tifffile")
Image = pytest.importorskip("PIL.Image")

TINY = ["--batch-size", "4", "--depth", "2", "--base-channels", "4", "--crop", "32",
        "--samples-per-epoch", "4", "--epochs", "1"]


def run(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "tinyunet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def cell_ids(size: int, cells: int, seed: int) -> np.ndarray:
    """Instance ids (size, size) uint16: square cells in pairs that touch side by side."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((size, size), np.uint16)
    for pair in range(cells // 2):
        top, left = 2 + 10 * (pair // 3), 2 + 15 * (pair % 3)
        side = int(rng.integers(4, 7))
        ids[top:top + side, left:left + side] = 2 * pair + 1
        ids[top:top + side, left + side:left + 2 * side] = 2 * pair + 2  # touches its twin
    return ids


def instance_folder(root, counts=(12, 8, 10), size=48, channels=1):
    """A folder of 16-bit images and uint16 instance-id TIFF masks, the counts differing
    per file (so 'auto' reads them as instances)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, count in enumerate(counts):
        ids = cell_ids(size, count, seed=i)
        rng = np.random.default_rng(10 + i)
        image = (ids > 0) * 30000 + rng.integers(0, 5000, ids.shape)
        if channels > 1:  # the cells in channel 1, noise in the others
            image = np.stack([rng.integers(0, 60000, ids.shape) if c != 1 else image
                              for c in range(channels)], axis=-1)
        tifffile.imwrite(root / "images" / f"img{i}.tif", image.astype(np.uint16))
        tifffile.imwrite(root / "masks" / f"img{i}.tif", ids)
    return root


def binary_folder(root, size=48):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        ids = cell_ids(size, 6, seed=i)
        Image.fromarray(((ids > 0) * 200 + 20).astype(np.uint8)).save(root / "images" /
                                                                      f"b{i}.png")
        Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(root / "masks" / f"b{i}.png")
    return root


def test_instance_folders_get_the_papers_weight_map(tmp_path):
    data = instance_folder(tmp_path / "data")
    val = instance_folder(tmp_path / "val", counts=(6,))
    config = TrainConfig(data=str(data), val_data=str(val), border_weight=8.0,
                         border_sigma=3.0)
    train, validation, description = prepare_datasets(config)
    assert train.mask_kind == "instances" and validation.mask_kind == "instances"
    assert "masks: instances" in description
    assert len(train.weights) == 3
    for ids, weights in zip(train.instances, train.weights, strict=True):
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights, weight_map(ids, 8.0, 3.0, class_balance=False))
    balanced, _, _ = prepare_datasets(TrainConfig(data=str(data), val_data=str(val),
                                                  border_weight=10.0, class_balance=True))
    np.testing.assert_array_equal(balanced.weights[0], weight_map(train.instances[0]))
    off, _, _ = prepare_datasets(TrainConfig(data=str(data), val_data=str(val)))
    assert off.weights is None                      # the map is off by default
    only_balance, _, _ = prepare_datasets(TrainConfig(data=str(data), val_data=str(val),
                                                      class_balance=True))
    np.testing.assert_array_equal(only_balance.weights[0],
                                  weight_map(train.instances[0], 0.0))
    binary, _, _ = prepare_datasets(TrainConfig(data=str(binary_folder(tmp_path / "b"))))
    assert binary.weights is None


def test_a_split_instance_folder_keeps_weights_and_kind(tmp_path):
    data = instance_folder(tmp_path / "data")
    trainer = Trainer(TrainConfig(data=str(data), depth=1, base_channels=4, crop=16,
                                  samples_per_epoch=4, batch_size=4, epochs=1,
                                  border_weight=10.0, out=str(tmp_path / "run")),
                      log=lambda line: None, progress_stream=False)
    assert trainer.mask_kind == "instances" and trainer.num_classes == 3
    full = weight_map(cell_ids(48, 12, seed=0), class_balance=False)
    rows = trainer.train_set.weights[0].shape[0]
    np.testing.assert_array_equal(trainer.train_set.weights[0], full[:rows])
    trainer.fit()
    meta = json.loads(np.load(tmp_path / "run" / "last.npz")["meta"].item())
    assert meta["mask_kind"] == "instances"


def test_instance_models_score_the_foreground():
    truth = np.zeros((6, 6), np.uint8)
    truth[1:5, 1:3], truth[1:5, 3:5] = 1, 2        # two cells' target: interior, border
    swapped = np.where(truth > 0, 3 - truth, 0)    # the same foreground, classes swapped
    assert dice_iou(swapped, truth, 3) == (0.0, 0.0)  # the mean over classes 1 and 2
    assert pixel_scores(swapped, truth, 3, "instances") == (1.0, 1.0)
    ids = truth.astype(np.uint16) * 7               # ids as the truth compare alike
    assert pixel_scores(swapped, ids, 3, "instances") == (1.0, 1.0)


def test_channels_survive_the_checkpoints_json(tmp_path):
    saved = json.loads(json.dumps({"channels": (0, 2), "masks": "instances", "page": 1}))
    config = config_from_checkpoint(tmp_path / "x.npz", saved)
    assert config.channels == (0, 2) and config.page == 1
    with pytest.raises(ValueError, match="--channels"):
        TrainConfig(channels=(-1,)).validate()
    with pytest.raises(ValueError, match="--masks"):
        TrainConfig(masks="ids").validate()
    with pytest.raises(ValueError, match="--border-sigma"):
        TrainConfig(border_sigma=0.0).validate()


def test_fit_reads_instance_arrays_with_weights(tmp_path):
    import tinyunet as tu

    images = [np.random.default_rng(i).random((48, 48)) for i in range(3)]
    masks = [cell_ids(48, count, seed=i) for i, count in enumerate((12, 8, 10))]
    val_ids = cell_ids(48, 6, seed=5)
    trainer = tu.fit(images, masks, val_images=[images[0]], val_masks=[val_ids],
                     mask_kind="instances", depth=1, base_channels=4, crop=16,
                     samples_per_epoch=4, batch_size=4, epochs=1, verbose=False,
                     border_weight=10.0, out=str(tmp_path / "run"))
    assert trainer.mask_kind == "instances" and trainer.num_classes == 3
    np.testing.assert_array_equal(trainer.train_set.weights[1],
                                  weight_map(masks[1], class_balance=False))


def test_the_cli_trains_evaluates_and_predicts_instances(tmp_path):
    data = instance_folder(tmp_path / "data", channels=3)
    out = tmp_path / "run"
    bad = run("train", "--data", data, "--channels", "0;1", "--out", out, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--channels: Expect: channel indices separated by commas" in bad.stderr
    done = run("train", "--data", data, "--masks", "auto", "--channels", "1",
               "--border-sigma", "4", "--members", "1", *TINY, "--out", out)
    assert "masks: instances" in done.stdout
    meta = json.loads(np.load(out / "last.npz")["meta"].item())
    assert meta["mask_kind"] == "instances" and meta["config"]["channels"] == [1]
    clash = run("train", "--resume", "--channels", "0", "--out", out, check=False)
    assert clash.returncode == 2 and "--channels is (1,), not (0,)" in clash.stderr

    scores = tmp_path / "scores.csv"
    evaluated = run("evaluate", "--checkpoint", out / "last.npz", "--data", data,
                    "--channels", "1", "--csv", scores)
    header = next(line for line in evaluated.stdout.splitlines() if line.startswith("image"))
    assert header.split() == ["image", "dice", "iou", "precision", "recall", "f1", "ap50",
                              "mean_ap"]
    rows = scores.read_text().splitlines()
    assert rows[0] == "image,dice,iou,precision,recall,f1,ap50,mean_ap"
    assert [row.split(",")[0] for row in rows[1:]] == ["img0", "img1", "img2", "mean"]
    values = [float(v) for row in rows[1:] for v in row.split(",")[1:]]
    assert all(0 <= v <= 1 for v in values)

    classes = tmp_path / "classes"
    (classes / "images").mkdir(parents=True)
    (classes / "masks").mkdir()
    for i in range(2):
        tifffile.imwrite(classes / "images" / f"c{i}.tif",
                         np.random.default_rng(i).integers(0, 999, (48, 48, 3), np.uint16))
        labels = np.zeros((48, 48), np.uint8)
        labels[:, 10:20], labels[:, 30:40] = 1, 2
        tifffile.imwrite(classes / "masks" / f"c{i}.tif", labels)
    refused = run("evaluate", "--checkpoint", out / "last.npz", "--data", classes,
                  "--masks", "classes", check=False)
    assert refused.returncode == 2 and "trained on instance masks" in refused.stderr

    predicted = tmp_path / "predicted"
    run("predict", "--checkpoint", out / "last.npz", "--out", predicted, "--instances",
        "--channels", "1", data / "images" / "img0.tif")
    ids = tifffile.imread(predicted / "img0_instances.tif")
    assert ids.dtype == np.uint16 and ids.shape == (48, 48)
    assert np.array_equal(np.unique(ids), np.arange(ids.max() + 1))  # 0..N, consecutive
    again = run("predict", "--checkpoint", out / "last.npz", "--out", predicted,
                "--instances", "--channels", "1", data / "images" / "img0.tif", check=False)
    assert again.returncode == 2 and "img0_instances.tif" in again.stderr
    run("predict", "--checkpoint", out / "last.npz", "--out", predicted, "--instances",
        "--channels", "1", "--overwrite", data / "images" / "img0.tif")


def test_evaluate_scores_binary_truth_as_connected_components(tmp_path):
    data = binary_folder(tmp_path / "data")
    out = tmp_path / "run"
    run("train", "--data", data, *TINY, "--members", "1", "--out", out)
    done = run("evaluate", "--checkpoint", out / "last.npz", "--data", data)
    assert "masks: binary" in done.stdout and "connected components" in done.stdout
    assert "ap50" in done.stdout and done.stdout.count("mean") >= 1
    # A binary model scores instance truth by its foreground and its objects.
    ids = instance_folder(tmp_path / "ids", counts=(12, 8))
    scored = run("evaluate", "--checkpoint", out / "last.npz", "--data", ids)
    assert "masks: instances" in scored.stdout and "mean_ap" in scored.stdout


def test_class_balance_is_a_train_option():
    from tinyunet.cli import _given, build_parser

    parser = build_parser()
    assert _given(parser.parse_args(["train", "--class-balance"]))["class_balance"] is True
    assert "class_balance" not in _given(parser.parse_args(["train"]))
