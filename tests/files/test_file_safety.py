"""Nothing lost, nothing overwritten (issue 19): the command line's outputs, checkpoint
ordering and resume, OS errors as one line, and the messages the drill found wrong.

Runs the CLI in-process on the numpy backend (no kernels to compile); the tests that
could hang (a FIFO) run it in a subprocess with a time limit.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from run_state import check_run_folder

import tinyunet
import tinyunet.backends
from tinyunet import cli, files
from tinyunet.checkpoint import read_checkpoint
from tinyunet.train import TrainConfig, Trainer

Image = pytest.importorskip("PIL.Image")

TINY = ["--epochs", "1", "--batch-size", "4", "--depth", "2", "--base-channels", "4",
        "--crop", "32", "--synthetic-train", "8", "--synthetic-val", "2",
        "--synthetic-size", "32", "--backend", "numpy"]


@pytest.fixture(autouse=True)
def keep_default_backend():
    """cli.main sets the default backend for the process; put it back afterwards."""
    default = tinyunet.backends._default
    yield
    tinyunet.backends._default = default


def train(*args):
    return cli.main(["train", *TINY, *map(str, args)])


def resume(out, *args):
    return cli.main(["train", "--resume", "--out", str(out), "--backend", "numpy",
                     *map(str, args)])


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("tinyunet: error:"), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def tiny_config(out, **changes):
    settings = dict(epochs=1, batch_size=4, depth=2, base_channels=4, crop=32,
                    synthetic_train=8, synthetic_val=2, synthetic_size=32, backend="numpy",
                    out=str(out))
    return TrainConfig(**{**settings, **changes})


def quiet(config):
    return Trainer(config, log=lambda line: None, progress_stream=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    quiet(tiny_config(out)).fit()
    return out / "best.npz"


def predict(checkpoint, *args):
    return cli.main(["predict", "--checkpoint", str(checkpoint), "--backend", "numpy",
                     *map(str, args)])


def image(path, seed=0, shape=(20, 24)):
    pixels = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix == ".png" else "TIFF")
    return path


def snapshot(folder):
    """Every file under ``folder`` (links as links) and its bytes."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[path] = (os.readlink(path) if os.path.islink(path)
                           else open(path, "rb").read())
    return found


# ---- 1. a new run never destroys an old one ----------------------------------------------

def test_train_refuses_an_out_folder_holding_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train("--out", out, "--seed", "1") == 2
    error = one_line_error(capsys)
    assert "--resume" in error and "--overwrite" in error and "last.npz" in error
    assert snapshot(out) == before

    assert train("--out", out, "--seed", "1", "--overwrite") == 0
    assert read_checkpoint(out / "last.npz")[0]["config"]["seed"] == 1
    assert read_checkpoint(out / "best.npz")[0]["config"]["seed"] == 1


def test_the_default_out_folder_is_protected_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train() == 0
    before = snapshot(tmp_path / "runs")
    capsys.readouterr()
    assert train() == 2
    assert "runs/tinyunet" in one_line_error(capsys)
    assert snapshot(tmp_path / "runs") == before


# ---- 2-4. predictions never overwrite, never read their outputs, never follow links --------

def test_predict_never_overwrites_a_file_nor_reads_its_outputs(checkpoint, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    image(folder / "a.png")
    image(folder / "a_mask.png", seed=1)  # say, the ground truth of a.png
    before = snapshot(folder)
    assert predict(checkpoint, "--out", folder, folder) == 2
    assert "a_mask.png" in one_line_error(capsys)
    assert predict(checkpoint, "--out", folder, "--overwrite", folder) == 2
    assert "is an input" in one_line_error(capsys)
    assert snapshot(folder) == before

    out = tmp_path / "masks"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"an older prediction")
    assert predict(checkpoint, "--out", out, folder / "a.png") == 2
    assert "--overwrite" in one_line_error(capsys)
    assert snapshot(out) == {str(out / "a_mask.png"): b"an older prediction"}
    assert predict(checkpoint, "--out", out, "--overwrite", folder / "a.png") == 0
    with Image.open(out / "a_mask.png") as mask:
        assert mask.size == (24, 20)


@pytest.mark.parametrize("layout", [("x.png", "x.tif"), ("dirA/x.png", "dirB/x.png")])
def test_inputs_that_would_write_one_file_are_refused(checkpoint, tmp_path, capsys, layout):
    inputs = tmp_path / "inputs"
    for name in layout:
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        image(inputs / name)
    arguments = ([inputs, inputs / layout[0]] if "/" not in layout[0]  # named twice: once
                 else [inputs / "dirA", inputs / "dirB"])
    out = tmp_path / "out"
    assert predict(checkpoint, "--out", out, *arguments) == 2
    error = one_line_error(capsys)
    assert all(str(inputs / name) in error for name in layout), error
    assert not out.exists() or not any(out.iterdir())


def test_a_link_at_an_output_path_is_never_followed(checkpoint, tmp_path, capsys):
    source = image(tmp_path / "a.png")
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").symlink_to(precious)
    assert predict(checkpoint, "--out", out, source) == 2
    one_line_error(capsys)
    assert predict(checkpoint, "--out", out, "--overwrite", source) == 0
    assert precious.read_bytes() == b"keep me"
    assert not (out / "a_mask.png").is_symlink()
    with Image.open(out / "a_mask.png") as mask:
        assert mask.size == (24, 20)

    nowhere = tmp_path / "nowhere.png"  # a dangling link: following it would create this
    other = tmp_path / "other"
    other.mkdir()
    (other / "a_mask.png").symlink_to(nowhere)
    assert predict(checkpoint, "--out", other, source) == 2
    one_line_error(capsys)
    assert not nowhere.exists()


def test_output_names_never_leave_the_out_folder(checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("..png", "-a.png", "a b.png"):
        image(inputs / name)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    assert predict(checkpoint, "--out", out, "--probabilities", inputs) == 0
    new = set(snapshot(tmp_path)) - set(before)
    assert len(new) == 9 and all(os.path.dirname(path) == str(out) for path in new), new


# ---- 5-7. checkpoint order, stale temporary files, messages ---------------------------------

class Interrupt:
    """Raise KeyboardInterrupt in place of the n-th placement of a checkpoint file."""

    def __init__(self, monkeypatch, n):
        self.n, self.calls, self.place = n, 0, files._place
        monkeypatch.setattr(files, "_place", self)

    def __call__(self, temporary, path, *args, **kwargs):
        if path.suffix == ".npz":
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return self.place(temporary, path, *args, **kwargs)


# Validation Dice of epochs 1-4 in the interrupted runs: improvements at 1, 3 and 4.
SCRIPTED_DICE = (0.2, 0.1, 0.3, 0.35)


def test_every_interrupted_save_leaves_checkpoints_that_agree(tmp_path, monkeypatch):
    """Interrupt each placement of a 4-epoch run's checkpoints in turn: every state left
    agrees (run_state.check_run_folder), and a resume settles it and finishes."""
    evaluate = Trainer.evaluate

    def scripted(self, dataset=None):
        result = evaluate(self, dataset)
        if self.epoch < len(SCRIPTED_DICE):  # self.epoch: the epochs done so far
            result["dice"] = SCRIPTED_DICE[self.epoch]
        return result

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    small = dict(epochs=4, depth=1, base_channels=2, crop=16, synthetic_train=4,
                 synthetic_val=1, synthetic_size=16, samples=1)
    n = 1
    while True:
        out = tmp_path / f"run{n}"
        interrupt = Interrupt(monkeypatch, n)
        try:
            quiet(tiny_config(out, **small)).fit()
            break  # fewer placements than n: every one was interrupted once
        except KeyboardInterrupt:
            pass
        finally:
            monkeypatch.setattr(files, "_place", interrupt.place)
        assert not list(out.glob(".*.tmp"))
        last, _ = check_run_folder(out)
        if last is None:
            n += 1
            continue
        resumed = quiet(tiny_config(out, **small))
        resumed.restore(out / "last.npz")
        last, best = check_run_folder(out)  # settled: they agree exactly
        assert last["best_epoch"] == resumed.best_epoch == (best["epoch"] if best else 0)
        resumed.fit()
        last, best = check_run_folder(out)
        assert last["epoch"] == 4 and last["best_epoch"] == best["epoch"] == 4
        n += 1
    assert n == 11  # 3 placements for each of the 3 improving epochs, 1 for the other


def test_resume_repairs_a_best_checkpoint_it_can_and_says_when_it_cannot(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", out, "--epochs", "2") == 0
    meta, _ = read_checkpoint(out / "last.npz")
    (out / "best.npz").unlink()
    capsys.readouterr()
    assert resume(out, "--epochs", "2") == 0
    captured = capsys.readouterr()
    if meta["best_epoch"] == 2:  # last.npz is the best: copied back
        assert read_checkpoint(out / "best.npz")[0]["epoch"] == 2
    else:  # lost: said so, and the next epoch that improves writes it again
        assert "best.npz" in captured.out + captured.err
    assert resume(out, "--epochs", "3") == 0
    check_run_folder(out)
    assert (out / "best.npz").exists()


def test_stale_temporary_files_are_removed_on_start_and_resume(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = int(ended.stdout)
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".last.npz.{dead}.0123abcd.tmp", out / f".history.json.{dead}.89abcdef.tmp"]
    running = out / ".best.npz.1.0123abcd.tmp"  # pid 1 is running
    other = out / "notes.tmp"
    for path in (*stale, running, other):
        path.write_bytes(b"x" * 100)
    quiet(tiny_config(out)).fit()
    assert not any(path.exists() for path in stale)
    assert running.exists() and other.exists()

    stale[0].write_bytes(b"x")
    quiet(tiny_config(out, epochs=2)).restore(out / "last.npz")
    assert not stale[0].exists()


def test_ctrl_c_during_a_save_names_the_epoch_on_disk(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    Interrupt(monkeypatch, 99)  # counts placements: find those of the first epoch
    assert train("--out", out, "--epochs", "2") == 0
    per_run = files._place.calls
    capsys.readouterr()
    out2 = tmp_path / "run2"
    # The last placement of the run: epoch 2's last.npz (after its best.npz, if any).
    Interrupt(monkeypatch, per_run)
    assert train("--out", out2, "--epochs", "2") == 130
    error = capsys.readouterr().err
    held = read_checkpoint(out2 / "last.npz")[0]["epoch"]
    assert held == 1 or read_checkpoint(out2 / "last.npz")[0]["best_epoch"] < 2
    assert f"holds epoch {held}" in error, error
    assert f"--resume --out {out2}" in error


def test_divergence_in_a_replaced_run_keeps_no_stale_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", out) == 0
    capsys.readouterr()
    code = train("--out", out, "--overwrite", "--optimizer", "sgd", "--lr", "1e30",
                 "--schedule", "none")
    assert code == 1
    error = capsys.readouterr().err
    assert "No checkpoint had been written" in error and "kept" not in error, error
    assert not (out / "last.npz").exists() and not (out / "best.npz").exists()


# ---- 11-12. OS errors are one line, found before the work; regular files only -----------------

def test_train_out_that_cannot_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "under"):
        assert train("--out", out) == 2
        assert str(out) in one_line_error(capsys)


def test_predict_out_that_cannot_be_a_folder(checkpoint, tmp_path, capsys):
    source = image(tmp_path / "a.png")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "under"):
        assert predict(checkpoint, "--out", out, source) == 2
        assert str(out) in one_line_error(capsys)


def test_a_read_only_out_folder_is_one_line_before_the_work(checkpoint, tmp_path,
                                                            monkeypatch, capsys):
    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(files, "_create", read_only)
    source = image(tmp_path / "a.png")
    assert predict(checkpoint, "--out", tmp_path / "masks", source) == 2
    assert "Read-only file system" in one_line_error(capsys)
    assert train("--out", tmp_path / "run") == 2
    captured = capsys.readouterr()
    assert "Read-only file system" in captured.err and "epoch" not in captured.out


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    savez, calls = np.savez, []

    def full_disk(file, **arrays):
        calls.append(1)
        if len(calls) > 2:  # epoch 1 saves last.npz, then best.npz with last.npz
            raise OSError(28, "No space left on device")
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", full_disk)
    assert train("--out", out, "--epochs", "2") == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert error.startswith("tinyunet: error:") and "Traceback" not in error
    assert "No space left on device" in error and "last.npz" in error
    assert read_checkpoint(out / "last.npz")[0]["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


def test_evaluate_checks_its_csv_before_the_work(checkpoint, tmp_path, capsys):
    for csv_path in (tmp_path, tmp_path / "missing" / "scores.csv"):
        assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--backend", "numpy",
                         "--csv", str(csv_path)]) == 2
        captured = capsys.readouterr()
        assert "mean" not in captured.out  # refused before scoring any image
        assert captured.err.startswith("tinyunet: error: --csv")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyunet", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_predict_takes_regular_files_only(checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image(inputs / "a.png")
    os.mkfifo(inputs / "pipe.png")  # reading it would block forever
    (inputs / "folder.png").mkdir()
    out = tmp_path / "out"
    done = run_cli("predict", "--checkpoint", checkpoint, "--backend", "numpy", "--out", out,
                   inputs)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["a_mask.png"]
    done = run_cli("predict", "--checkpoint", checkpoint, "--backend", "numpy", "--out", out,
                   inputs / "pipe.png")
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr


# ---- 13. --lr on --resume is applied ------------------------------------------------------

@pytest.mark.parametrize("schedule", ["none", "cosine"])
def test_lr_given_on_resume_is_applied(tmp_path, schedule):
    out = tmp_path / "run"
    assert train("--out", out, "--schedule", schedule, "--lr", "3e-3") == 0
    assert resume(out, "--epochs", "2", "--lr", "1e-4") == 0
    history = json.loads((out / "history.json").read_text())
    base, low = 1e-4, 1e-4 * 0.01
    expected = base if schedule == "none" else low + (base - low) * (1 + math.cos(math.pi / 2)) / 2
    assert history[1]["lr"] == pytest.approx(expected, rel=1e-12)
    assert read_checkpoint(out / "last.npz")[0]["config"]["lr"] == 1e-4


# ---- 17. messages -------------------------------------------------------------------------

@pytest.mark.parametrize("option,value", [("--seed", "-1"), ("--weight-decay", "-1")])
def test_bad_values_name_their_option(tmp_path, capsys, option, value):
    try:
        code = train("--out", tmp_path / "run", option, value)
    except SystemExit as exit:  # argparse's own check
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err
    assert option in error and "Traceback" not in error, error
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_help_lines_show_no_none_defaults(capsys):
    for command in ("train", "predict", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text
        if command != "evaluate":
            assert "--overwrite" in text


def test_the_tile_error_suggests_what_the_command_line_offers(checkpoint, tmp_path, capsys):
    source = image(tmp_path / "a.png", shape=(64, 64))
    assert predict(checkpoint, "--out", tmp_path / "out", "--tile", "8", source) == 2
    error = one_line_error(capsys)
    assert "smaller halo" not in error and "use a tile of at least" in error, error


def test_a_resume_with_nothing_left_to_do_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert resume(out) == 0
    text = capsys.readouterr().out
    assert "nothing to do" in text and "wrote" not in text, text
    assert snapshot(out) == before


# ---- what held in the drill, kept ---------------------------------------------------------

def test_the_same_seed_gives_bit_identical_weights(tmp_path):
    runs = [quiet(tiny_config(tmp_path / f"r{i}", epochs=2)) for i in range(2)]
    for run in runs:
        run.fit()
    first, second = (run.model.state_dict() for run in runs)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
