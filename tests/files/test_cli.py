"""The command line, run as a user runs it: ``python -m tinyunet ...`` in a subprocess."""

import json
import subprocess
import sys

import numpy as np
import pytest

import tinyunet
from tinyunet import cli
from tinyunet.train import REAL_DATA_DEFAULTS

Image = pytest.importorskip("PIL.Image")

TINY = ["--epochs", "2", "--batch-size", "4", "--depth", "2", "--base-channels", "4",
        "--crop", "32", "--synthetic-train", "8", "--synthetic-val", "2",
        "--synthetic-size", "32"]


def run(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "tinyunet", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny synthetic training run shared by the predict/evaluate tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    done = run("train", *TINY, "--out", out)
    return out, done


def test_help_on_every_command():
    for command in ([], ["train"], ["predict"], ["evaluate"]):
        done = run(*command, "--help")
        assert "usage: tinyunet" in done.stdout
    assert "--resume" in run("train", "--help").stdout
    assert "--probabilities" in run("predict", "--help").stdout


def test_train_writes_its_files_and_reports(trained):
    out, done = trained
    for name in ("last.npz", "best.npz", "history.json", "history.csv", "curves.png",
                 "samples.png"):
        assert (out / name).is_file(), name
    assert "final validation Dice" in done.stdout
    # The progress bar (steps, loss, images/s) goes to stderr.
    assert "epoch 2/2 [" in done.stderr and "img/s" in done.stderr
    assert len(json.loads((out / "history.json").read_text())) == 2
    with Image.open(out / "samples.png") as samples:
        assert samples.size[0] > samples.size[1] / 2  # three columns, two rows


def test_resume_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    run("train", *TINY[2:], "--epochs", "1", "--out", out)
    done = run("train", "--resume", "--epochs", "2", "--out", out)
    assert "resuming" in done.stdout and "epoch 2/2" in done.stdout
    meta = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in meta] == [1, 2]
    clash = run("train", "--resume", "--depth", "3", "--out", out, check=False)
    assert clash.returncode == 2 and "--depth is 2, not 3" in clash.stderr


def test_predict_writes_masks_of_the_input_size(trained, tmp_path):
    out, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 37), dtype=np.uint8)).save(inputs / "odd.png")
    np.save(inputs / "rgb.npy", rng.random((33, 50, 3)))
    masks = tmp_path / "masks"
    run("predict", "--checkpoint", out / "best.npz", "--out", masks, "--probabilities",
        inputs)
    with Image.open(masks / "odd_mask.png") as mask:
        assert mask.size == (37, 45)
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    with Image.open(masks / "rgb_mask.png") as mask:
        assert mask.size == (50, 33)
    probabilities = np.load(masks / "odd_prob.npy")
    assert probabilities.shape == (1, 45, 37)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert (masks / "odd_prob.png").is_file()


def test_evaluate_scores_each_image_of_a_folder(trained, tmp_path):
    out, _ = trained
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    from tinyunet.data import SyntheticCells

    cells = SyntheticCells(2, (40, 48), seed=9)
    for i in range(2):
        image, mask = cells[i]
        pixels = (np.clip(image[0], 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / "images" / f"cell{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(data / "masks" / f"cell{i}.png")
    scores = tmp_path / "scores.csv"
    done = run("evaluate", "--checkpoint", out / "best.npz", "--data", data, "--csv", scores)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("masks: binary")  # what the folder's masks were read as
    table = lines[lines.index(next(line for line in lines if line.startswith("image "))):]
    assert table[1].startswith("cell0") and table[2].startswith("cell1")
    assert table[3].startswith("mean")
    rows = scores.read_text().splitlines()
    assert rows[0].startswith("image,dice,iou,") and rows[-1].startswith("mean,")
    mean_dice = float(table[3].split()[1])
    assert 0 <= mean_dice <= 1


def test_several_checkpoints_predict_and_evaluate_as_an_ensemble(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    run("train", *TINY, "--seed", "1", "--out", other)
    data = _cell_folder(tmp_path / "data", 2, (40, 44), seed=5)
    singles = []
    for index, checkpoint in enumerate((out / "best.npz", other / "best.npz")):
        run("predict", "--checkpoint", checkpoint, "--out", tmp_path / f"single{index}",
            "--probabilities", data / "images")
        singles.append(np.load(tmp_path / f"single{index}" / "c0_prob.npy"))
    # A run folder stands for its best.npz.
    done = run("predict", "--checkpoint", out, "--checkpoint", other, "--out",
               tmp_path / "both", "--probabilities", data / "images")
    assert "ensemble of 2 models: the mean of their probabilities" in done.stdout
    both = np.load(tmp_path / "both" / "c0_prob.npy")
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(singles[0], singles[1])
    with Image.open(tmp_path / "both" / "c0_mask.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask), (both[0] > 0.5) * 255)

    scores = run("evaluate", "--checkpoint", out, "--checkpoint", other, "--data", data)
    assert "ensemble of 2 models" in scores.stdout
    assert scores.stdout.splitlines()[-1].startswith("mean")
    synthetic = run("evaluate", "--checkpoint", out, "--checkpoint", other, check=False)
    assert synthetic.returncode == 2 and "--data DIR for several checkpoints" in \
        synthetic.stderr

    classes = tmp_path / "classes"
    run("train", *TINY, "--classes", "multiclass", "--out", classes)
    mixed = run("predict", "--checkpoint", out, "--checkpoint", classes, "--out",
                tmp_path / "mixed", data / "images", check=False)
    assert mixed.returncode == 2 and "Expect: num_classes 1 in every member" in mixed.stderr
    assert f"Actual: 3 in {classes / 'best.npz'}" in mixed.stderr


def test_train_members_trains_an_ensemble_that_resumes_where_it_stopped(tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "ensemble"
    real_fit = cli.Trainer.fit
    seeds = []

    def fit_then_stop_in_the_second(trainer, *args, **kwargs):
        seeds.append(trainer.config.seed)
        if len(seeds) == 2:  # Ctrl-C in member 2's second epoch
            real_fit(trainer, stop_after=1)
            raise KeyboardInterrupt
        return real_fit(trainer, *args, **kwargs)

    monkeypatch.setattr(cli.Trainer, "fit", fit_then_stop_in_the_second)
    assert cli.main(["train", *TINY, "--seed", "5", "--members", "3", "--out", str(out)]) == 130
    printed = capsys.readouterr()
    assert seeds == [5, 6]
    assert "member 2 of 3 of the ensemble" in printed.out and "--seed 6" in printed.out
    assert f"holds epoch 1. Continue with: tinyunet train --resume --out {out}\n" in \
        printed.err
    assert (out / "member1" / "best.npz").is_file() and not (out / "member3").exists()

    refused = run("train", *TINY, "--out", out, check=False)
    assert refused.returncode == 2 and "member1/ (an ensemble's member)" in refused.stderr
    clash = run("train", "--resume", "--seed", "0", "--out", out, check=False)
    assert clash.returncode == 2 and "ensemble in" in clash.stderr and \
        "--seed is 5, not 0" in clash.stderr

    # In a fresh process, as a user resumes it, so that member 3 compares with a run
    # trained alone (the tests before this one may have switched kernels in this one).
    printed = run("train", "--resume", "--out", out).stdout
    assert "nothing to do: the run had reached epoch 2 of 2" in printed  # member 1
    assert f"resuming {out / 'member2' / 'last.npz'} after epoch 1 of 2" in printed
    assert "member 3 of 3 of the ensemble" in printed and "--seed 7" in printed
    for member in ("member1", "member2", "member3"):
        assert len(json.loads((out / member / "history.json").read_text())) == 2
    # Member 3, started on resume, is the run its seed gives.
    alone = tmp_path / "alone"
    run("train", *TINY, "--seed", "7", "--out", alone)
    for name, weights in np.load(alone / "last.npz").items():
        if name.startswith("model/"):
            np.testing.assert_array_equal(np.load(out / "member3" / "last.npz")[name], weights)

    data = _cell_folder(tmp_path / "data", 1, (40, 40), seed=3)
    scores = run("evaluate", "--checkpoint", out, "--data", data)
    assert "ensemble of 3 models" in scores.stdout
    refused = run("export", "--checkpoint", out, "--out", tmp_path / "m.safetensors",
                  check=False)
    assert refused.returncode == 2 and "Actual: an ensemble of 3; export each member's" \
        in refused.stderr
    exported = run("export", "--checkpoint", out / "member3", "--out", tmp_path / "m.safetensors")
    assert f"from {out / 'member3' / 'best.npz'}" in exported.stdout
    run("train", *TINY, "--epochs", "1", "--out", out, "--overwrite")
    assert not (out / "member1").exists()  # the ensemble's files went, then its folders
    assert (out / "best.npz").is_file()


def test_an_ensemble_refuses_models_of_other_mask_kinds(tmp_path, capsys):
    from tinyunet.checkpoint import save_checkpoint
    from tinyunet.nn import UNet

    # Both have 3 classes, but the labels mean other things: border or class 2.
    for kind in ("instances", "classes"):
        save_checkpoint(tmp_path / f"{kind}.npz", UNet(1, 3, depth=2, base_channels=2),
                        meta={"mask_kind": kind})
    code = cli.main(["predict", "--checkpoint", str(tmp_path / "instances.npz"),
                     "--checkpoint", str(tmp_path / "classes.npz"), "--out",
                     str(tmp_path / "out"), str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and "Expect: models trained on the same kind of masks" in error
    assert "instances.npz on instances" in error and "classes.npz on classes" in error
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_train_on_a_data_folder(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    from tinyunet.data import SyntheticCells

    cells = SyntheticCells(5, (40, 40), seed=3)
    for i in range(5):
        image, mask = cells[i]
        np.save(data / "images" / f"c{i}.npy", image[0])
        Image.fromarray(mask.astype(np.uint8)).save(data / "masks" / f"c{i}.png")
    out = tmp_path / "run"
    done = run("train", "--data", data, *TINY[2:], "--epochs", "1", "--out", out)
    assert "on 4 training and 1 validation images" in done.stdout
    # The real-data defaults: flips and turns, an ensemble.
    assert "augmentation: flips and turns only" in done.stdout
    members = REAL_DATA_DEFAULTS["members"]
    assert members > 1 and f"member {members} of {members} of the ensemble" in done.stdout
    assert [(out / f"member{i}" / "best.npz").is_file() for i in range(1, members + 2)] == \
        [True] * members + [False]


def test_user_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a checkpoint")
    done = run("predict", "--checkpoint", bad, "--out", tmp_path, tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("tinyunet: error:") and "bad.npz" in done.stderr
    assert "Traceback" not in done.stderr

    done = run("train", "--data", tmp_path / "nothing", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "nothing" in done.stderr and "Traceback" not in done.stderr

    done = run("train", "--backend", "tpu", check=False)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_unavailable_backend_is_named(monkeypatch, capsys):
    def refuse(name):
        raise ImportError(f"no module for {name}")

    monkeypatch.setattr(tinyunet, "set_backend", refuse)
    monkeypatch.setattr(tinyunet, "available_backends", lambda: ["numpy"])
    assert cli.main(["train", "--backend", "cuda"]) == 2
    error = capsys.readouterr().err
    assert "--backend cuda: not available" in error and "Available: numpy" in error


def test_diverged_training_exits_1_with_a_message(tmp_path):
    done = run("train", *TINY, "--optimizer", "sgd", "--lr", "1e30", "--schedule", "none",
               "--out", tmp_path / "run", check=False)
    assert done.returncode == 1
    assert "training stopped" in done.stderr and "Traceback" not in done.stderr


def _cell_folder(root, count, size, seed):
    from tinyunet.data import SyntheticCells

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    cells = SyntheticCells(count, size, seed=seed)
    for i in range(count):
        image, mask = cells[i]
        np.save(root / "images" / f"c{i}.npy", image[0])
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"c{i}.png")
    return root


def test_val_data_samples_per_epoch_tile_and_tta(tmp_path):
    data = _cell_folder(tmp_path / "data", 2, (40, 40), seed=1)
    val = _cell_folder(tmp_path / "val", 1, (40, 48), seed=2)
    out = tmp_path / "run"
    too_small = run("train", "--data", data, "--tile", "64", *TINY[2:], check=False)
    assert too_small.returncode == 2 and "--tile: Expect: more than 2 * halo = 64" in \
        too_small.stderr and "epoch" not in too_small.stderr  # refused before training
    done = run("train", "--data", data, "--val-data", val, "--samples-per-epoch", "6",
               "--members", "1", "--tile", "80", "--foreground-fraction", "0.5", *TINY[2:],
               "--epochs", "1", "--out", out)
    assert "validation: the 1 images of" in done.stdout and "all 2 training images train" \
        in done.stdout
    assert "an epoch is 6 crops of 32x32 (2 steps of 4), 50% of them centred" in done.stdout
    assert "] 2/2 loss" in done.stderr  # two steps
    clash = run("train", "--resume", "--foreground-fraction", "0.2", "--out", out,
                check=False)
    assert clash.returncode == 2 and "--foreground-fraction is 0.5, not 0.2" in clash.stderr

    masks = tmp_path / "masks"
    run("predict", "--checkpoint", out / "last.npz", "--out", masks, "--probabilities",
        "--tta", val / "images")
    probabilities = np.load(masks / "c0_prob.npy")
    assert probabilities.shape == (1, 40, 48)
    plain = tmp_path / "plain"
    run("predict", "--checkpoint", out / "last.npz", "--out", plain, "--probabilities",
        val / "images")
    assert not np.allclose(np.load(plain / "c0_prob.npy"), probabilities)  # TTA differs
    scores = run("evaluate", "--checkpoint", out / "last.npz", "--data", val, "--tta")
    assert scores.stdout.splitlines()[-1].startswith("mean")
    assert "--tta" in run("evaluate", "--help").stdout
