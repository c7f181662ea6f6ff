"""Training loop: metrics, checkpoints, exact resume, determinism, divergence handling."""

import json
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyunet.checkpoint import (
    CheckpointError,
    decode_tree,
    encode_tree,
    load_model,
    read_checkpoint,
)
from tinyunet.train import (
    AUGMENTATIONS,
    REAL_DATA_DEFAULTS,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    config_from_checkpoint,
    dice_iou,
    loss_function,
    one_class_warning,
)


def tiny_config(out, **changes):
    """A run that takes about a second: depth-2 U-Net, 4 base channels, 32-px images."""
    settings = dict(epochs=2, batch_size=4, depth=2, base_channels=4, crop=32,
                    synthetic_train=8, synthetic_val=2, synthetic_size=32, lr=3e-3,
                    out=str(out))
    settings.update(changes)
    return TrainConfig(**settings)


def quiet_trainer(config):
    return Trainer(config, log=lambda line: None, progress_stream=False)


def weights(model):
    return {name: value.copy() for name, value in model.state_dict().items()}


# ---- metrics ------------------------------------------------------------------------------

def test_dice_and_iou_of_known_masks():
    truth = np.zeros((4, 4), dtype=np.int64)
    truth[:2] = 1                       # 8 foreground pixels
    prediction = np.zeros_like(truth)
    prediction[1:3] = 1                 # 8 predicted, 4 of them right
    dice, iou = dice_iou(prediction, truth, num_classes=1)
    assert dice == pytest.approx(2 * 4 / 16) and iou == pytest.approx(4 / 12)
    assert dice_iou(truth, truth, 1) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(truth), np.zeros_like(truth), 1) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(truth), truth, 1) == (0.0, 0.0)
    # Three classes: the mean over the foreground classes 1 and 2.
    truth3 = np.array([[0, 1, 1, 2]])
    prediction3 = np.array([[0, 1, 2, 2]])
    dice3, iou3 = dice_iou(prediction3, truth3, num_classes=3)
    assert dice3 == pytest.approx((2 / 3 + 2 / 3) / 2) and iou3 == pytest.approx(0.5)


def test_one_class_warning():
    truth = [np.array([[0, 1], [1, 0]])]
    assert "all-black" in one_class_warning([np.zeros((2, 2), dtype=int)], truth)
    assert "foreground" in one_class_warning([np.ones((2, 2), dtype=int)], truth)
    assert one_class_warning([np.array([[0, 1], [0, 0]])], truth) is None
    # Nothing to find in the truth either: no warning.
    assert one_class_warning([np.zeros((2, 2), dtype=int)], [np.zeros((2, 2))]) is None


# ---- checkpoint encoding ----------------------------------------------------------------------

@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.integers(0, 5) | st.text(max_size=3), children, max_size=3)
    | st.tuples(children, children),
    max_leaves=10,
))
def test_encode_decode_round_trip(value):
    arrays = {}
    tree = json.loads(json.dumps(encode_tree(value, arrays, "x/")))
    assert decode_tree(tree, arrays) == value


def test_encode_keeps_arrays_and_numpy_scalars_exact():
    value = {"state": {0: {"m": np.arange(6, dtype=np.float32).reshape(2, 3)}},
             "step": np.int64(7), "lr": np.float32(0.1)}
    arrays = {}
    decoded = decode_tree(json.loads(json.dumps(encode_tree(value, arrays, "o/"))), arrays)
    np.testing.assert_array_equal(decoded["state"][0]["m"], value["state"][0]["m"])
    assert decoded["step"] == 7 and decoded["step"].dtype == np.int64
    assert decoded["lr"].dtype == np.float32 and decoded["lr"] == np.float32(0.1)


# ---- training, checkpoints, resume --------------------------------------------------------------

def test_training_writes_checkpoints_history_and_pngs(tmp_path):
    config = tiny_config(tmp_path / "run")
    result = quiet_trainer(config).fit()
    for name in ("last.npz", "best.npz", "history.json", "history.csv", "curves.png",
                 "samples.png"):
        assert (tmp_path / "run" / name).is_file(), name
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert result["epoch"] == 2 and 0 <= result["val_dice"] <= 1
    meta, arrays = read_checkpoint(tmp_path / "run" / "last.npz")
    assert meta["epoch"] == 2 and meta["config"]["depth"] == 2
    assert meta["model_config"]["base_channels"] == 4
    assert "rng_state" in meta and "optimizer" in meta
    assert not list((tmp_path / "run").glob("*.tmp"))  # no temporary file left behind


def test_checkpoint_round_trip_restores_the_model(tmp_path):
    trainer = quiet_trainer(tiny_config(tmp_path / "run", epochs=1))
    trainer.fit()
    model, meta = load_model(tmp_path / "run" / "last.npz")
    assert model.config == trainer.model.config
    saved, loaded = weights(trainer.model), weights(model)
    assert saved.keys() == loaded.keys()
    for name in saved:
        np.testing.assert_array_equal(saved[name], loaded[name])
    assert meta["history"] == trainer.history


def test_same_seed_same_loss_curve_other_seed_another(tmp_path):
    runs = [quiet_trainer(tiny_config(tmp_path / f"r{i}", seed=seed, epochs=2))
            for i, seed in enumerate((5, 5, 6))]
    for run in runs:
        run.fit()
    losses = [[row["train_loss"] for row in run.history] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", "step")])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, optimizer, schedule):
    config = dict(epochs=3, optimizer=optimizer, schedule=schedule)
    whole = quiet_trainer(tiny_config(tmp_path / "whole", **config))
    whole.fit()

    interrupted = quiet_trainer(tiny_config(tmp_path / "parts", **config))
    interrupted.fit(stop_after=1)  # as if killed after the first epoch's checkpoint
    resumed = quiet_trainer(tiny_config(tmp_path / "parts", **config))
    resumed.restore(tmp_path / "parts" / "last.npz")
    assert resumed.epoch == 1
    resumed.fit()

    # Bit for bit: same weights, same loss curve.
    final_whole, final_resumed = weights(whole.model), weights(resumed.model)
    for name in final_whole:
        np.testing.assert_array_equal(final_resumed[name], final_whole[name], err_msg=name)
    keys = ("train_loss", "val_loss", "val_dice", "lr")
    assert ([{k: r[k] for k in keys} for r in resumed.history]
            == [{k: r[k] for k in keys} for r in whole.history])


def test_resume_refuses_another_architecture(tmp_path):
    quiet_trainer(tiny_config(tmp_path / "run", epochs=1)).fit()
    other = quiet_trainer(tiny_config(tmp_path / "other", base_channels=6))
    with pytest.raises(CheckpointError, match="base_channels=4.*base_channels=6"):
        other.restore(tmp_path / "run" / "last.npz")


def test_damaged_checkpoints_are_clear_errors(tmp_path):
    quiet_trainer(tiny_config(tmp_path / "run", epochs=1)).fit()
    good = tmp_path / "run" / "last.npz"

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.npz: not a tinyunet checkpoint"):
        load_model(truncated)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.npz"):
        load_model(garbage)

    plain = tmp_path / "plain.npz"
    np.savez(plain, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="plain.npz"):
        load_model(plain)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.npz")

    # Weights that don't fit the architecture the metadata describes.
    meta, arrays = read_checkpoint(good)
    meta["model_config"]["base_channels"] = 5
    arrays["meta"] = np.array(json.dumps(meta))
    lying = tmp_path / "lying.npz"
    np.savez(lying, **arrays)
    with pytest.raises(CheckpointError, match="do not fit this U-Net"):
        load_model(lying)

    with zipfile.ZipFile(good) as archive:
        assert "meta.npy" in archive.namelist()  # one file, readable without pickle


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = quiet_trainer(tiny_config(tmp_path / "run", epochs=3, optimizer="sgd",
                                        schedule="none"))
    trainer.fit(stop_after=1)
    last = tmp_path / "run" / "last.npz"
    before = last.read_bytes()
    trainer.optimizer.param_groups[0]["lr"] = 1e30  # a learning rate that must blow up
    with pytest.raises(TrainingDiverged, match=r"epoch 2.*last good checkpoint.*epoch 1"):
        trainer.fit()
    assert last.read_bytes() == before
    model, meta = load_model(last)
    assert meta["epoch"] == 1
    assert all(np.isfinite(v).all() for v in model.state_dict().values())


def test_nan_in_the_first_epoch_says_nothing_was_saved(tmp_path):
    trainer = quiet_trainer(tiny_config(tmp_path / "run", lr=1e30, optimizer="sgd",
                                        schedule="none"))
    with pytest.raises(TrainingDiverged, match="No checkpoint had been written"):
        trainer.fit()
    assert not (tmp_path / "run" / "last.npz").exists()


def test_multiclass_and_valid_training_run(tmp_path):
    config = tiny_config(tmp_path / "multi", classes="multiclass", loss="ce", epochs=1)
    trainer = quiet_trainer(config)
    assert trainer.model.config["num_classes"] == 3
    trainer.fit()
    config = tiny_config(tmp_path / "valid", padding="valid", crop=8, epochs=1,
                         loss="dice")
    trainer = quiet_trainer(config)
    assert trainer.output_hw[0] < trainer.input_hw[0]
    result = trainer.fit()
    assert 0 <= result["val_dice"] <= 1


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="--loss"):
        tiny_config("x", loss="hinge").validate()
    with pytest.raises(ValueError, match="--lr"):
        tiny_config("x", lr=-1.0).validate()
    with pytest.raises(ValueError, match="'ce' needs more than two classes"):
        quiet_trainer(tiny_config("x", loss="ce"))


# ---- real-data training: any depth, any mask dtype ----------------------------------------------

def _write_folder(root, count, size, seed=0, mask_dtype=np.uint8):
    """``count`` synthetic cell images of ``size`` as NPY files in root/images, root/masks."""
    from tinyunet.data import SyntheticCells

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    cells = SyntheticCells(count, size, seed=seed)
    for i in range(count):
        image, mask = cells[i]
        np.save(root / "images" / f"c{i}.npy", image[0])
        np.save(root / "masks" / f"c{i}.npy", mask.astype(mask_dtype))
    return root


def test_depth_4_validates_on_images_larger_than_256(tmp_path):
    """The default tile follows the halo: depth 4 needs more than 2 * 144 = 288 pixels."""
    data = _write_folder(tmp_path / "data", 2, (300, 300))
    config = tiny_config(tmp_path / "run", data=str(data), depth=4, base_channels=2,
                         epochs=1, batch_size=2, samples_per_epoch=2)
    result = quiet_trainer(config).fit()
    assert 0 <= result["val_dice"] <= 1


# ---- per-pixel loss weights ----------------------------------------------------------------------

@pytest.mark.parametrize("name,classes", [("bce", 1), ("dice+bce", 1), ("ce", 3),
                                          ("dice+bce", 3), ("dice", 1)])
def test_all_ones_weights_give_the_unweighted_loss(name, classes):
    rng = np.random.default_rng(0)
    logits = tensor_of(rng.normal(size=(2, classes, 5, 6)))
    masks = rng.integers(0, max(classes, 2), (2, 5, 6)).astype(np.uint8)
    loss = loss_function(name, classes)
    plain = loss(logits, masks).item()
    np.testing.assert_allclose(loss(logits, masks, np.ones((2, 5, 6))).item(), plain,
                               rtol=1e-6)
    # Other weights change the cross-entropy term (not the Dice-only loss).
    doubled = loss(logits, masks, np.full((2, 5, 6), 2.0)).item()
    assert (doubled == pytest.approx(plain)) == (name == "dice")


def test_weighted_loss_is_the_mean_of_weight_times_pixel_loss():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 1, 4, 4))
    masks = rng.integers(0, 2, (2, 4, 4))
    weights = rng.random((2, 4, 4)) * 5
    bce = np.maximum(z[:, 0], 0) - z[:, 0] * masks + np.log1p(np.exp(-np.abs(z[:, 0])))
    got = loss_function("bce", 1)(tensor_of(z, np.float64), masks, weights).item()
    assert got == pytest.approx((weights * bce).mean(), rel=1e-12)


def tensor_of(array, dtype=np.float32):
    import tinyunet as tu

    return tu.tensor(array, dtype=dtype)


def test_weighted_losses_pass_the_gradient_check(backend):
    from gradcheck import check_gradients
    from strategies import budget, image_shapes, seeds, size_limit

    @budget(backend)
    @given(shape=image_shapes(size_limit(backend)), classes=st.sampled_from([1, 3]),
           name=st.sampled_from(["bce", "ce", "dice+bce"]), seed=seeds)
    def check(shape, classes, name, seed):
        if (name, classes) in (("bce", 3), ("ce", 1)):
            name = "dice+bce"
        rng = np.random.default_rng(seed)
        n, _, h, w = shape
        masks = rng.integers(0, max(classes, 2), (n, h, w)).astype(np.uint16)
        weights = rng.random((n, h, w)) * 10
        loss = loss_function(name, classes)
        check_gradients(lambda z: loss(z, masks, weights),
                        [2 * rng.standard_normal((n, classes, h, w))], backend, seed)

    check()


# ---- epochs of crops, validation choices, arrays in ---------------------------------------------

def test_an_epoch_is_samples_per_epoch_crops(tmp_path):
    synthetic = quiet_trainer(tiny_config(tmp_path / "s", epochs=1))
    assert synthetic.samples_per_epoch == 8  # one crop per synthetic training image
    assert synthetic.sampler.foreground_fraction == 0  # the demo's crops stay uniform
    assert "placed uniformly; augmentation: flips, turns, elastic" in synthetic.data_description
    counted = []
    trainer = quiet_trainer(tiny_config(tmp_path / "n", epochs=1, samples_per_epoch=10))
    original = trainer._batch
    trainer._batch = lambda chunk: counted.append(len(chunk)) or original(chunk)
    trainer.fit()
    assert counted == [4, 4, 2]
    assert "10 crops of 32x32 (3 steps of 4)" in trainer.data_description


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_each_augmentation_choice_changes_the_crops_as_it_says(tmp_path, augment):
    """'none' trains on the sampler's crops as cut; 'flips' only flips and turns them
    (the same pixel values, moved); 'full' also deforms and jitters them."""
    trainer = quiet_trainer(tiny_config(tmp_path, augment=augment))
    crops = []
    original = trainer.sampler.crop
    trainer.sampler.crop = lambda *a: crops.append(original(*a)) or crops[-1]
    images, _, _ = trainer._batch(np.arange(8) % len(trainer.train_set))
    pairs = [(image, crop) for image, (crop, _, _) in zip(images, crops, strict=True)]
    moved = [not np.array_equal(image, crop) for image, crop in pairs]
    same_values = [np.array_equal(np.sort(image, None), np.sort(crop, None))
                   for image, crop in pairs]
    if augment == "none":
        assert not any(moved)
    elif augment == "flips":
        assert any(moved) and all(same_values)
    else:
        assert not any(same_values)  # the intensity jitter changes every crop's values


def test_checkpoints_of_the_old_yes_or_no_augment_option_still_load():
    assert config_from_checkpoint("old.npz", {"augment": True}).augment == "full"
    assert config_from_checkpoint("old.npz", {"augment": False}).augment == "none"
    with pytest.raises(CheckpointError, match="old.npz: .*config augment"):
        config_from_checkpoint("old.npz", {"augment": 3})
    with pytest.raises(ValueError, match="--augment: Expect: one of"):
        tiny_config("x", augment="elastic").validate()


def test_augment_is_a_train_option():
    from tinyunet.cli import _given, build_parser

    parser = build_parser()
    assert _given(parser.parse_args(["train", "--augment", "flips"]))["augment"] == "flips"
    assert "augment" not in _given(parser.parse_args(["train"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--augment", "elastic"])


def test_a_single_large_image_trains_on_its_top_and_validates_on_its_bottom(tmp_path):
    data = _write_folder(tmp_path / "data", 1, (200, 72), mask_dtype=np.uint16)
    trainer = quiet_trainer(tiny_config(tmp_path / "run", data=str(data), epochs=1))
    train_mask, val_mask = trainer.train_set[0][1], trainer.val_set[0][1]
    assert train_mask.shape == (160, 72) and val_mask.shape == (40, 72)  # 20% of the rows
    assert "last 40 rows" in trainer.data_description
    assert "33% of them centred on foreground" in trainer.data_description
    # Folder data left at None gets the command line's epoch length, whatever its size.
    assert trainer.samples_per_epoch == REAL_DATA_DEFAULTS["samples_per_epoch"]
    trainer.samples_per_epoch = 8  # a shorter epoch keeps the test fast
    result = trainer.fit()
    assert 0 <= result["val_dice"] <= 1


def test_val_data_keeps_every_training_image(tmp_path):
    data = _write_folder(tmp_path / "data", 2, (40, 40))
    val = _write_folder(tmp_path / "val", 1, (48, 40), seed=5)
    trainer = quiet_trainer(tiny_config(tmp_path / "run", data=str(data), val_data=str(val),
                                        epochs=1, samples_per_epoch=4))
    assert len(trainer.train_set) == 2 and trainer.val_set[0][1].shape == (48, 40)
    assert "all 2 training images train" in trainer.data_description
    trainer.fit()
    with pytest.raises(ValueError, match="--val-data"):
        tiny_config("x", val_data=str(val)).validate()


def test_arrays_with_weights_and_small_mask_dtypes_train(tmp_path):
    from tinyunet.data.arrays import ArrayDataset
    from tinyunet.data.synthetic import SyntheticCells

    cells = SyntheticCells(3, (40, 40), seed=4, kind="multiclass")
    images = [(cells[i][0][0] * 1000).astype(np.uint16) for i in range(3)]
    masks = [cells[i][1].astype(np.uint8) for i in range(3)]
    weights = [1 + 9 * (mask == 2) for mask in masks]  # heavier borders
    train = ArrayDataset(images, masks, weights=weights)
    config = tiny_config(tmp_path / "run", epochs=1, samples_per_epoch=4, loss="ce")
    trainer = Trainer(config, log=lambda line: None, progress_stream=False, train_set=train)
    assert trainer.num_classes == 3 and trainer.train_set.weights is not None
    images, masks, weights = trainer._batch([0, 1])
    assert masks.dtype == np.int64 and weights.shape == masks.shape
    np.testing.assert_array_equal(weights, 1 + 9 * (masks == 2))  # moved with the masks
    trainer.fit()
