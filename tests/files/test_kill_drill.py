"""The kill drill of issue 19 as a test: a child process that does nothing but save
checkpoints, the way training does at the end of each epoch, is killed (SIGKILL or
SIGINT) at random moments, over and over, each time resuming where the last one left.

After every kill: every .npz file left loads, and last.npz and best.npz agree
(run_state.check_run_folder). After every resume: no temporary file is left, and the
two agree exactly. The delays come from a fixed seed, so the drill is repeatable (where
they land in a save still depends on the machine's speed).
"""

import random
import signal
import subprocess
import sys

import pytest
from run_state import check_run_folder

KILLS = 24
SEED = 19

# Resumes from OUT/last.npz when there is one, says "ready EPOCH BEST_EPOCH", waits for a
# line on stdin, then ends epoch after epoch without training: the weights move a little,
# the validation Dice goes up or down by a hair, and the checkpoints are saved.
CHILD = """
import sys
from pathlib import Path

import numpy as np

from tinyunet.train import TrainConfig, Trainer

out, seed = Path(sys.argv[1]), int(sys.argv[2])
config = TrainConfig(epochs=10**6, depth=2, base_channels=16, crop=32, synthetic_train=1,
                     synthetic_val=1, synthetic_size=32, backend="numpy", out=str(out))
trainer = Trainer(config, log=lambda line: None, progress_stream=False)
if (out / "last.npz").exists():
    trainer.restore(out / "last.npz")
print("ready", trainer.epoch, trainer.best_epoch, flush=True)
sys.stdin.readline()
rng = np.random.default_rng(seed)
while True:
    for parameter in trainer.model.parameters():
        parameter.data += np.float32(1e-3)
    best = trainer.best_dice
    dice = 0.5 if best < 0 else best + (1e-6 if rng.random() < 0.5 else -1e-6)
    trainer.epoch += 1
    trainer.finish_epoch({"epoch": trainer.epoch, "val_dice": dice})
"""


def wait_for_exit(child, errors, seconds=30):
    """Wait for a killed or interrupted child to end. CPython ignores an exception raised
    in a finalizer (``__del__``), a KeyboardInterrupt too, and says so on stderr: such an
    interrupt is sent again; any other child still running after ``seconds`` fails the
    drill with its stderr."""
    for _ in range(3):
        try:
            child.wait(timeout=seconds)
            return
        except subprocess.TimeoutExpired:
            said = errors.read_text()
            if "Exception ignored" not in said or "KeyboardInterrupt" not in said:
                raise AssertionError(f"the child ran on {seconds} s after the signal; its "
                                     f"stderr:\n{said[-3000:]}") from None
            child.send_signal(signal.SIGINT)
    raise AssertionError(f"the child ignored 3 interrupts; its stderr:\n{errors.read_text()}")


@pytest.mark.slow
def test_checkpoints_survive_kills_at_random_moments_of_a_save(tmp_path):
    out = tmp_path / "run"
    timing = random.Random(SEED)
    left_temporaries = 0
    for kill in range(KILLS):
        errors = tmp_path / f"stderr{kill}.txt"
        with errors.open("w") as stderr:
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(kill)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=stderr, text=True)
        try:
            ready = child.stdout.readline().split()
            assert ready[:1] == ["ready"], f"the child did not start: {ready}"
            # The resume removed what earlier kills left and settled the best.
            assert not list(out.glob(".*.tmp")), list(out.glob(".*.tmp"))
            last, best = check_run_folder(out)
            epoch, best_epoch = int(ready[1]), int(ready[2])
            if last is not None:
                assert last["epoch"] == epoch
                assert last["best_epoch"] == best_epoch == best["epoch"]
            child.stdin.write("go\n")
            child.stdin.flush()
            try:
                child.wait(timeout=timing.uniform(0.05, 0.5))
                raise AssertionError("the child stopped saving by itself")
            except subprocess.TimeoutExpired:
                pass
            child.send_signal(signal.SIGKILL if kill % 2 == 0 else signal.SIGINT)
            wait_for_exit(child, errors)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        left_temporaries += bool(list(out.glob(".*.tmp")))
        check_run_folder(out)
    assert left_temporaries >= 1  # some kills did land inside a write
