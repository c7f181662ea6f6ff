"""What a training run's folder must look like after any interruption (issue 19, item 5):
shared by tests/files/test_file_safety.py and the kill drill in tests/files/test_kill_drill.py."""

from pathlib import Path

from tinyunet.checkpoint import read_checkpoint


def check_run_folder(out: Path):
    """Assert that every checkpoint in ``out`` loads and that last.npz and best.npz agree;
    return (last's meta, best's meta), None for a file that is not there.

    Agree: best.npz is never ahead of last.npz; it holds the best epoch last.npz
    records, except while an improvement is being saved: then last.npz's own epoch beat
    its recorded best (its history says so) and best.npz holds that epoch or the
    recorded one. A resume settles that case (Trainer.restore).
    """
    for path in sorted(out.glob("*.npz")):
        read_checkpoint(path)
    last = read_checkpoint(out / "last.npz")[0] if (out / "last.npz").exists() else None
    best = read_checkpoint(out / "best.npz")[0] if (out / "best.npz").exists() else None
    if last is None:
        assert best is None, "best.npz without last.npz"
        return last, best
    recorded = last["best_epoch"]
    pending = bool(last["history"]) and last["history"][-1]["val_dice"] > last["best_dice"]
    allowed = {recorded, last["epoch"]} if pending else {recorded}
    if best is None:
        assert recorded == 0, f"last.npz records best epoch {recorded}; no best.npz"
    else:
        assert best["epoch"] <= last["epoch"], (best["epoch"], last["epoch"])
        assert best["epoch"] in allowed, (best["epoch"], allowed)
        assert best["best_epoch"] == best["epoch"]
    return last, best
