"""benchmarks/real_data.py: its Otsu threshold against a brute-force search, its Dice on
hand-counted cases, and the script end to end on a tiny set it makes (Otsu, tinyunet with
tiny settings, and the line that skips PyTorch where it is missing)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import real_data

ROOT = Path(__file__).resolve().parents[2]


def brute_force_otsu_split(image: np.ndarray) -> np.ndarray:
    """The bright class of the split between pixel values that maximises w0 w1 (m0 - m1)^2,
    trying every value as the last one of the dark class."""
    values = image.ravel().astype(np.float64)
    best, best_cut = -1.0, None
    for cut in np.unique(values)[:-1]:
        dark, bright = values[values <= cut], values[values > cut]
        w0, w1 = dark.size / values.size, bright.size / values.size
        between = w0 * w1 * (dark.mean() - bright.mean()) ** 2
        if between > best:
            best, best_cut = between, cut
    return image > best_cut


@pytest.mark.parametrize("seed", range(8))
def test_otsu_matches_a_brute_force_search_on_small_images(seed):
    # Integer levels 0..L-1 with L bins: one level per bin, and bin centres an affine
    # function of the level, so the histogram search and the brute force agree exactly.
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(3, 12))
    image = rng.integers(0, levels, size=(int(rng.integers(2, 9)), int(rng.integers(2, 9))))
    image[0, 0], image[-1, -1] = 0, levels - 1  # both ends present: bins align with levels
    threshold = real_data.otsu_threshold(image, bins=levels)
    np.testing.assert_array_equal(image > threshold, brute_force_otsu_split(image))


def test_otsu_separates_two_populations_and_leaves_a_flat_image_empty():
    rng = np.random.default_rng(0)
    bright = rng.random((64, 64)) < 0.3
    image = np.where(bright, 1000.0, 200.0) + rng.normal(0, 20, (64, 64))
    np.testing.assert_array_equal(image > real_data.otsu_threshold(image), bright)
    flat = np.full((8, 8), 7.0)
    assert not (flat > real_data.otsu_threshold(flat)).any()


def test_dice_on_hand_counted_cases():
    empty = np.zeros((4, 4), bool)
    a = empty.copy()
    a[:2] = True  # 8 pixels
    b = empty.copy()
    b[1:3] = True  # 8 pixels, 4 shared with a
    assert real_data.dice(empty, empty) == 1.0
    assert real_data.dice(a, empty) == 0.0
    assert real_data.dice(a, b) == pytest.approx(2 * 4 / 16)
    assert real_data.dice(a, a) == 1.0


def test_results_section_lists_every_stored_result():
    stored = {"cells": {
        "otsu": {"status": "ok", "dice": 0.8123, "train_seconds": 0.0, "date": "D",
                 "machine": "M", "command": "C", "data": "/d", "train_images": 3,
                 "test_images": 2},
        "tinyunet": {"status": "train failed: tinyunet: error: x", "train_seconds": 4.2,
                     "date": "D", "machine": "M", "command": "C", "data": "/d",
                     "train_images": 3, "test_images": 2}}}
    text = real_data.results_section(stored)
    assert "| cells | tinyunet | - | - | 4 | train failed: tinyunet: error: x |" in text
    assert "| cells | otsu | 0.8123 | - | 0 | ok |" in text
    assert "- cells / otsu: ended D; M; 3 train and 2 test images (/d); `C`" in text


def make_set(root: Path) -> Path:
    """A tiny set: bright discs on a dark 16-bit background, 0/255 PNG masks."""
    from PIL import Image

    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :48]
    for split, count in (("train", 2), ("test", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((48, 48), bool)
            for cy, cx in rng.integers(8, 40, size=(3, 2)):
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 36
            image = (300 + 2000 * mask + rng.normal(0, 50, mask.shape)).astype(np.uint16)
            tifffile.imwrite(root / split / "images" / f"im{i}.tif", image)
            Image.fromarray((mask * 255).astype(np.uint8)).save(
                root / split / "masks" / f"im{i}.png")
    return root


def run_script(*args):
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_data", *args, "--no-write"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_script_scores_otsu_and_skips_pytorch_where_it_is_missing(tmp_path):
    data = make_set(tmp_path / "tiny")
    have_torch = importlib.util.find_spec("torch") is not None
    out = run_script("--data", str(data), "--set", "tiny", "--methods", "otsu,torch",
                     "--torch-steps", "2", "--work", str(tmp_path / "work"))
    otsu_row = next(line for line in out.splitlines() if line.startswith("| tiny | otsu |"))
    assert float(otsu_row.split("|")[3]) > 0.9  # bright discs on a dark background
    if have_torch:
        assert "| tiny | torch |" in out and "(2 steps, not the recipe's 600)" in out
    else:
        assert "PyTorch is not installed" in out and "| tiny | torch |" not in out


def test_script_runs_tinyunet_train_evaluate_and_predict(tmp_path):
    pytest.importorskip("numba")
    data = make_set(tmp_path / "tiny")
    out = run_script("--data", str(data), "--set", "tiny", "--methods", "tinyunet",
                     "--work", str(tmp_path / "work"), "--train-args",
                     "--epochs 1 --depth 1 --base-channels 4 --crop 32 --batch-size 1")
    row = next(line for line in out.splitlines() if line.startswith("| tiny | tinyunet |"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[-1] == "ok", row
    assert 0.0 <= float(cells[2]) <= 1.0 and 0.0 <= float(cells[3]) <= 1.0
    assert (tmp_path / "work" / "tiny" / "tinyunet" / "test.csv").exists()


def test_script_writes_and_scores_a_synthetic_nuclei_set(tmp_path):
    pytest.importorskip("tifffile")
    out = run_script("--synthetic", "3x64", "--methods", "otsu", "--work", str(tmp_path))
    set_dir = tmp_path / "synthetic-3x64"
    assert real_data.count_images(set_dir) == (3, 2)
    image = real_data.read_pixels(next((set_dir / "train" / "images").iterdir()))
    assert image.dtype == np.uint16 and image.shape == (64, 64)
    row = next(line for line in out.splitlines() if line.startswith("| synthetic-3x64 | otsu |"))
    assert float(row.split("|")[3]) > 0.5  # bright nuclei on a dark background


def test_script_refuses_a_malformed_synthetic_set():
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_data", "--synthetic", "20",
                           "--no-write"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Expect: COUNTxSIZE" in done.stderr


def test_real_sets_are_built_from_their_sources_as_stored(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from benchmarks import real_data_sets

    rng = np.random.default_rng(0)
    time_lapse = rng.integers(0, 4000, size=(4, 10, 5, 7), dtype=np.uint16)
    confocal = rng.integers(0, 4000, size=(48, 6, 4), dtype=np.uint16)
    confocal_ids = rng.integers(0, 21, size=(48, 6, 4), dtype=np.uint32)
    real_data_sets.build_sets(time_lapse, confocal, confocal_ids, tmp_path)

    def read(set_name, split, sub, stem):
        return tifffile.imread(tmp_path / set_name / split / sub / f"{stem}.tif")

    for set_name, image_channel, id_channel in (("ndev_nuclei", 0, 2),
                                                ("ndev_oblique_cells", 1, 3)):
        assert [stem for stem, _, _ in real_data.pairs(tmp_path / set_name / "test")] == [
            "t07", "t08", "t09"]
        assert len(real_data.pairs(tmp_path / set_name / "train")) == 7
        for t in (0, 6, 9):
            split = "train" if t < 7 else "test"
            assert np.array_equal(read(set_name, split, "images", f"t{t:02d}"),
                                  time_lapse[image_channel, t])
            ids = read(set_name, split, "masks", f"t{t:02d}")
            assert ids.dtype == np.uint16 and np.array_equal(ids, time_lapse[id_channel, t])
    train = [stem for stem, _, _ in real_data.pairs(tmp_path / "cells3d_nuclei" / "train")]
    test = [stem for stem, _, _ in real_data.pairs(tmp_path / "cells3d_nuclei" / "test")]
    assert train == [f"z{z}" for z in range(22, 39, 2)] and test == ["z40", "z42", "z44", "z46"]
    ids = read("cells3d_nuclei", "test", "masks", "z46")
    assert ids.dtype == np.uint32 and np.array_equal(ids, confocal_ids[46])
    with pytest.raises(ValueError, match=r"Expect: \(C=4, T, Y, X\)"):
        real_data_sets.build_sets(time_lapse[:2], confocal, confocal_ids, tmp_path / "x")
