"""Training: the loop, metrics, resume and the choice of loss, optimizer and schedule.

    from tinyunet.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(epochs=5, out="runs/demo")).fit()

Shapes: images (N, C, H, W) float32; masks (N, H, W) int64 class labels; logits
(N, K, h, w) with K = 1 (binary, sigmoid) or the number of classes (softmax).

Determinism: the model is initialised after ``tinyunet.manual_seed(seed)``; the data
split, the batch order and every augmentation draw from numpy generators seeded by
``seed``. The same seed on the same backend gives the same loss curve.

Checkpoints (tinyunet/checkpoint.py) hold the weights, the optimizer's and the
schedule's state, the training generator's state and the history, so a resumed run
continues exactly as it would have without the interruption. The progress bar, the
history files and the PNG reports are in tinyunet/reports.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import functional as F
from .autograd import no_grad, tensor
from .backends import get_backend, set_backend
from .checkpoint import (
    CheckpointError,
    check_resumable,
    decode_tree,
    describe_config,
    read_checkpoint,
    restore_weights,
    save_checkpoint,
)
from .data.augment import Augmenter
from .data.folder import FolderDataset, train_val_split
from .data.synthetic import SyntheticCells
from .data.tiling import logits_to_labels, predict_logits
from .errors import ShapeError
from .files import OutputError, atomic_write, prepare_output_folder, remove_stale_temporaries
from .reports import ProgressBar, save_curves, save_sample_grid, write_history

LOSSES = ("dice", "iou", "bce", "ce", "dice+bce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
# Options that fix the model or the data; a resumed run must keep them.
RUN_DEFINING = ("data", "classes", "depth", "base_channels", "padding", "up", "seed",
                "crop", "loss", "optimizer", "synthetic_train", "synthetic_val",
                "synthetic_size", "val_fraction")
# What a run writes to its output folder.
RUN_FILES = ("last.npz", "best.npz", "history.json", "history.csv", "curves.png",
             "samples.png")


class TrainingDiverged(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the message says what was kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. The defaults are the built-in demo:
    synthetic cells, a depth-3 U-Net with 16 base channels, about 5 minutes on 2 cores.
    """

    data: str | None = None          # folder with images/ and masks/; None: synthetic cells
    classes: str = "binary"          # synthetic masks: 'binary' or 'multiclass' (with borders)
    epochs: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9            # SGD only
    schedule: str = "cosine"
    loss: str = "dice+bce"
    depth: int = 3
    base_channels: int = 16
    padding: str = "same"
    up: str = "transpose"
    crop: int = 64                   # side of the training crops' masks (see _crop_sizes)
    augment: bool = True
    elastic_sigma: float = 4.0
    val_fraction: float = 0.2        # folder data only
    synthetic_train: int = 96
    synthetic_val: int = 16
    synthetic_size: int = 96
    backend: str | None = None       # None: tinyunet's default backend
    seed: int = 0
    out: str = "runs/tinyunet"
    samples: int = 4                 # validation samples drawn in samples.png

    def validate(self):
        def need(condition, option, expect, actual):
            if not condition:
                raise ValueError(f"{option}: Expect: {expect}. Actual: {actual}.")

        need(self.loss in LOSSES, "--loss", f"one of {LOSSES}", repr(self.loss))
        need(self.optimizer in OPTIMIZERS, "--optimizer", f"one of {OPTIMIZERS}",
             repr(self.optimizer))
        need(self.schedule in SCHEDULES, "--schedule", f"one of {SCHEDULES}",
             repr(self.schedule))
        need(self.classes in ("binary", "multiclass"), "--classes",
             "'binary' or 'multiclass'", repr(self.classes))
        need(self.padding in ("same", "valid"), "--padding", "'same' or 'valid'",
             repr(self.padding))
        need(self.up in ("transpose", "upsample"), "--up", "'transpose' or 'upsample'",
             repr(self.up))
        for name in ("epochs", "batch_size", "depth", "base_channels", "crop",
                     "synthetic_train", "synthetic_val", "synthetic_size"):
            value = getattr(self, name)
            need(value >= 1, f"--{name.replace('_', '-')}", ">= 1", value)
        need(self.lr > 0 and math.isfinite(self.lr), "--lr", "a positive number", self.lr)
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "--weight-decay",
             "a number >= 0", self.weight_decay)
        need(self.seed >= 0, "--seed", "an integer >= 0", self.seed)
        need(0 < self.val_fraction < 1, "--val-fraction", "a number in (0, 1)",
             self.val_fraction)


def claim_run_folder(out, overwrite: bool = False, resuming=None) -> Path:
    """The output folder of a new run, or of one resumed from checkpoint ``resuming``:
    created if missing and known to be writable (else an OutputError naming --out).

    A new run never destroys an old one: a folder that holds another run's files
    (RUN_FILES) is refused, unless ``overwrite``, which deletes them first so that no file
    of the old run is mistaken for one of the new. A resume may write into the folder
    of the checkpoint it continues.
    """
    out = prepare_output_folder(out, "--out")
    if resuming is not None and Path(resuming).resolve().parent == out.resolve():
        return out
    found = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if found and not overwrite:
        raise OutputError(
            f"--out {out}: Expect: a folder without a previous run. Actual: it holds "
            f"{', '.join(found)}. Continue that run with --resume --out {out}, choose "
            "another --out, or pass --overwrite to replace it.")
    for name in found:
        (out / name).unlink()
    return out


def config_from_checkpoint(path, saved, **changes) -> TrainConfig:
    """The TrainConfig of the run saved in checkpoint ``path`` (``saved``, its "config"),
    with ``changes`` applied; a CheckpointError naming the file for an option this
    version does not know, a value of the wrong type or out of range. An option the
    checkpoint lacks (one added to tinyunet after it was written) takes its default.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: Expect: the run's config (a dict). "
                              f"Actual: {type(saved).__name__}.")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: Expect: a run config of known options. "
                              f"Actual: unknown {unknown}.")
    for name, value in saved.items():
        if not _fits_annotation(fields[name].type, value):
            raise CheckpointError(f"{path}: Expect: config {name} of type "
                                  f"{fields[name].type}. Actual: {value!r}.")
    try:
        TrainConfig(**saved).validate()
    except ValueError as error:
        raise CheckpointError(f"{path}: its run config is unusable: {error}") from error
    return TrainConfig(**{**saved, **changes})


def _fits_annotation(annotation: str, value) -> bool:
    """Whether ``value`` (from JSON) has a type the annotation ("int", "str | None", ...)
    allows; an annotation of other types is not checked here (validate() still runs)."""
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "None": lambda v: v is None}
    names = [name.strip() for name in str(annotation).split("|")]
    if not all(name in checks for name in names):
        return True
    return any(checks[name](value) for name in names)


# ---- metrics --------------------------------------------------------------------------

def dice_iou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[float, float]:
    """Hard Dice and IoU of one label map (H, W) against the truth (H, W).

    Binary problems (``num_classes`` 1 or 2) score the foreground; multi-class problems
    average over the foreground classes 1..K-1 that occur in the truth or the prediction.
    A class absent from both scores 1 (nothing to find, nothing found).
    """
    classes = [1] if num_classes <= 2 else range(1, num_classes)
    dices, ious = [], []
    for k in classes:
        p, t = prediction == k, truth == k
        both, either = np.count_nonzero(p & t), np.count_nonzero(p | t)
        if either == 0:
            if num_classes <= 2:
                return 1.0, 1.0
            continue
        dices.append(2 * both / (np.count_nonzero(p) + np.count_nonzero(t)))
        ious.append(both / either)
    if not dices:
        return 1.0, 1.0
    return float(np.mean(dices)), float(np.mean(ious))


def one_class_warning(predictions, truths) -> str | None:
    """A warning when every prediction is one single class but the truth has several."""
    predicted = set()
    for p in predictions:
        predicted.update(np.unique(p).tolist())
    true = set()
    for t in truths:
        true.update(np.unique(t).tolist())
    if len(predicted) == 1 and len(true) > 1:
        (label,) = predicted
        kind = "all-black masks" if label == 0 else "every pixel foreground"
        return (
            f"warning: the model predicts class {label} everywhere on the validation images "
            f"({kind}). Train longer, change --lr, or use --loss dice+bce, which copes with "
            "rare foreground better."
        )
    return None


def loss_function(name: str, num_classes: int):
    """loss(logits (N, K, h, w), masks (N, h, w) int64) -> scalar Tensor."""
    if name in ("bce",) and num_classes > 1:
        raise ValueError(f"--loss: 'bce' needs binary masks, but there are {num_classes} "
                         "classes; use 'ce', 'dice' or 'dice+bce'.")
    if name == "ce" and num_classes == 1:
        raise ValueError("--loss: 'ce' needs more than two classes, but the masks are binary; "
                         "use 'bce', 'dice' or 'dice+bce'.")

    def target(logits, masks):
        if num_classes == 1:
            return tensor(masks[:, None].astype(np.float32), backend=logits.backend)
        return tensor(masks, backend=logits.backend)

    def loss(logits, masks):
        t = target(logits, masks)
        if name == "dice":
            return F.dice_loss(logits, t)
        if name == "iou":
            return F.iou_loss(logits, t)
        if name == "bce":
            return F.binary_cross_entropy_with_logits(logits, t)
        if name == "ce":
            return F.cross_entropy(logits, t)
        return F.bce_dice_loss(logits, t)

    return loss


# ---- the trainer ------------------------------------------------------------------------

def build_datasets(config: TrainConfig):
    """(train, validation) datasets for ``config``: a folder split by seed, or synthetic."""
    if config.data is not None:
        return train_val_split(FolderDataset(config.data), config.val_fraction, config.seed)
    size = (config.synthetic_size, config.synthetic_size)
    # Separate seeds streams: the validation images are never training images.
    train = SyntheticCells(config.synthetic_train, size, seed=2 * config.seed,
                           kind=config.classes)
    val = SyntheticCells(config.synthetic_val, size, seed=2 * config.seed + 1,
                         kind=config.classes)
    return train, val


def _seed_model_init(seed: int):
    import tinyunet

    tinyunet.manual_seed(seed)


def _make_optimizer(config: TrainConfig, parameters):
    from . import optim

    if config.optimizer == "sgd":
        return optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(config: TrainConfig, optimizer):
    from . import optim

    if config.schedule == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=config.epochs,
                                       eta_min=config.lr * 0.01)
    if config.schedule == "step":
        return optim.StepLR(optimizer, step_size=max(1, config.epochs // 3), gamma=0.3)
    return None


class Trainer:
    """Trains a U-Net as ``config`` says; ``fit()`` runs the epochs.

    ``log`` receives the per-epoch summary lines (default: print to stdout); the progress
    bar goes to ``progress_stream`` (default stderr), or nowhere when it is False.
    """

    def __init__(self, config: TrainConfig, log=print, progress_stream=None):
        from .nn import UNet

        config.validate()
        self.config = config
        self.log = log
        self.progress_stream = progress_stream
        if config.backend is not None:
            set_backend(config.backend)
        self.backend = get_backend()
        self.out = Path(config.out)

        self.train_set, self.val_set = build_datasets(config)
        self.num_classes = self.train_set.num_classes
        _seed_model_init(config.seed)
        self.model = UNet(in_channels=self.train_set.in_channels,
                          num_classes=self.num_classes, depth=config.depth,
                          base_channels=config.base_channels, padding=config.padding,
                          up=config.up)
        self.optimizer = _make_optimizer(config, list(self.model.parameters()))
        self.scheduler = _make_scheduler(config, self.optimizer)
        self.loss_fn = loss_function(config.loss, self.num_classes)

        self.input_hw, self.output_hw = _crop_sizes(self.model, config.crop)
        self.augment = Augmenter(
            crop=self.input_hw,
            flip=config.augment,
            elastic_p=0.5 if config.augment else 0.0,
            elastic_sigma=config.elastic_sigma,
            jitter=config.augment,
        )
        # One generator for batch order and augmentation; its state is checkpointed.
        self.rng = np.random.default_rng([config.seed, 1])
        self.epoch = 0
        self.history: list[dict] = []
        self.best_dice = -1.0
        self.best_epoch = 0
        # The epoch that out/last.npz holds, once this trainer wrote it (or resumed it).
        self.saved_epoch: int | None = None

    # -- checkpoints --
    def _meta(self) -> dict:
        return {
            "epoch": self.epoch,
            "config": dataclasses.asdict(self.config),
            "history": self.history,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "rng_state": self.rng.bit_generator.state,
            "num_classes": self.num_classes,
            "in_channels": self.train_set.in_channels,
            "backend": self.backend.name,
        }

    def save(self, path, copies=()):
        save_checkpoint(path, self.model, self._meta(), self.optimizer, self.scheduler,
                        copies=copies)

    def finish_epoch(self, row: dict) -> bool:
        """Record epoch ``self.epoch`` as done: its history ``row`` (with "val_dice"), the
        best Dice, and the checkpoints. Whether it improved on the best."""
        self.history.append(row)
        improved = row["val_dice"] > self.best_dice
        previous_best = (self.best_dice, self.best_epoch)
        if improved:
            self.best_dice, self.best_epoch = row["val_dice"], self.epoch
        self._save_checkpoints(improved, previous_best)
        return improved

    def _save_checkpoints(self, improved: bool, previous_best: tuple[float, int]):
        """last.npz every epoch, best.npz when it improved, in an order that leaves the
        two agreeing whatever the moment of an interrupt: best.npz is never ahead of
        last.npz, and last.npz never records a best that best.npz does not hold. On an
        improvement last.npz is written first still recording ``previous_best``, then one
        file recording this epoch as the best becomes best.npz and then last.npz. Between
        the two, last.npz's history shows the improvement it does not record yet;
        restore() settles that (_settle_best).
        """
        last = self.out / "last.npz"
        if improved:
            current = (self.best_dice, self.best_epoch)
            self.best_dice, self.best_epoch = previous_best
            try:
                self.save(last)
            finally:
                self.best_dice, self.best_epoch = current
            self.saved_epoch = self.epoch
        self.save(last, copies=[self.out / "best.npz"] if improved else ())
        self.saved_epoch = self.epoch

    def _settle_best(self, path):
        """After restore(): make the best epoch, out/best.npz and out/last.npz agree again.

        An improvement that last.npz's history shows but does not record (an interrupt
        between the two writes of _save_checkpoints) is recorded, as the second write
        would have: best.npz from the restored state where it lacks it, then last.npz.
        A best.npz that is missing or holds another epoch is copied from the resumed
        checkpoint's folder when that one holds the recorded best; otherwise the loss is
        said, and the epochs from here on start a new best.
        """
        best = self.out / "best.npz"
        pending = bool(self.history) and self.history[-1]["val_dice"] > self.best_dice
        if pending:
            self.best_dice, self.best_epoch = self.history[-1]["val_dice"], self.epoch
        if self.best_epoch == 0:
            return
        held = _best_epoch_in(best) == self.best_epoch
        if not held and self.best_epoch != self.epoch:
            source = Path(path).parent / "best.npz"
            if _best_epoch_in(source) == self.best_epoch:
                data = source.read_bytes()
                atomic_write(best, lambda file: file.write(data))
                return
            self.log(f"note: {best} does not hold epoch {self.best_epoch}, the best so far "
                     f"(val Dice {self.best_dice:.4f}); it is missing or from another run, "
                     "so best.npz will hold the best of the epochs from here on")
            self.best_dice, self.best_epoch = -1.0, 0
            return
        # The best is the restored state itself (or already in best.npz).
        if pending and self.saved_epoch == self.epoch:
            self.save(self.out / "last.npz", copies=() if held else [best])
        elif not held:
            self.save(best)

    def _apply_hyperparameters(self):
        """The options that may change on resume take effect after restore(): --lr (the
        schedule goes on from this epoch with the new base rate; for 'cosine' its floor
        stays 1% of the base), --weight-decay and the momentum. Left as they were, they
        change nothing, and the run continues bit for bit."""
        group = self.optimizer.param_groups[0]
        group["weight_decay"] = self.config.weight_decay
        if "momentum" in group:
            group["momentum"] = self.config.momentum
        if self.scheduler is None:
            group["lr"] = self.config.lr
        else:
            self.scheduler.base_lr = float(self.config.lr)
            group["lr"] = self.scheduler.lr_at(self.scheduler.last_epoch)

    def interrupted_message(self) -> str:
        """What to tell the user after Ctrl-C: the epoch last.npz holds, how to go on."""
        if self.saved_epoch is None:
            return (f"interrupted during epoch {self.epoch + 1}; no checkpoint had been "
                    f"written to {self.out} yet")
        return (f"interrupted during epoch {self.saved_epoch + 1}; {self.out / 'last.npz'} "
                f"holds epoch {self.saved_epoch}. Continue with: tinyunet train --resume "
                f"--out {self.out}")

    def restore(self, path):
        """Continue from checkpoint ``path``: weights, optimizer, schedule, RNG, history."""
        meta, arrays = read_checkpoint(path)
        check_resumable(path, meta)
        if meta["model_config"] != dict(self.model.config):
            raise CheckpointError(
                f"{path}: it holds a U-Net with {describe_config(meta['model_config'])}, "
                f"but this run builds one with {describe_config(self.model.config)}"
            )
        restore_weights(path, self.model, meta, arrays)
        self.model.to(self.backend)
        try:
            self.optimizer.load_state_dict(decode_tree(meta["optimizer"], arrays))
            if self.scheduler is not None and "scheduler" in meta:
                self.scheduler.load_state_dict(decode_tree(meta["scheduler"], arrays))
            self.rng.bit_generator.state = meta["rng_state"]
        except (KeyError, ValueError, TypeError, ShapeError) as error:
            raise CheckpointError(f"{path}: its optimizer or generator state does not fit "
                                  f"this run ({type(error).__name__}: {error})") from error
        self.epoch = int(meta["epoch"])
        self.history = list(meta["history"])
        self.best_dice = float(meta["best_dice"])
        self.best_epoch = int(meta["best_epoch"])
        self._apply_hyperparameters()
        last = self.out / "last.npz"
        self.saved_epoch = (self.epoch if last.exists() and os.path.samefile(path, last)
                            else None)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        self._settle_best(path)

    # -- one epoch --
    def _batch(self, indices):
        images, masks = [], []
        for index in indices:
            image, mask = self.train_set[int(index)]
            image, mask = self.augment(image, mask, self.rng)
            images.append(image)
            masks.append(_center_crop(mask, self.output_hw))
        return np.stack(images), np.stack(masks)

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        where = f"epoch {self.epoch + 1}" + (f", step {step}" if step is not None else "")
        last = self.out / "last.npz"
        if self.saved_epoch is not None:
            kept = (f"The last good checkpoint, {last} (epoch {self.saved_epoch}), was kept "
                    "as it was.")
        else:
            kept = f"No checkpoint had been written yet to {self.out}."
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDiverged(f"{what} at {where}: training stopped. {kept} "
                                f"Try a lower --lr (it was {lr:g}).")

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the training set; (mean loss, images per second)."""
        self.model.train()
        n = len(self.train_set)
        order = self.rng.permutation(n)
        steps = math.ceil(n / self.config.batch_size)
        bar = None
        if self.progress_stream is not False:
            bar = ProgressBar(steps, f"epoch {self.epoch + 1}/{self.config.epochs}",
                              self.progress_stream)
        total, loss_value = 0.0, float("nan")
        started = time.perf_counter()
        for step in range(steps):
            chunk = order[step * self.config.batch_size : (step + 1) * self.config.batch_size]
            images, masks = self._batch(chunk)
            # Overflow is caught below as a non-finite loss, with a clearer message than
            # numpy's warnings.
            with np.errstate(over="ignore", invalid="ignore"):
                logits = self.model(tensor(images, backend=self.backend))
                loss = self.loss_fn(logits, masks)
                loss_value = float(loss.item())
                if not math.isfinite(loss_value):
                    if bar is not None:
                        bar.close(loss_value)
                    raise self._diverged(f"the loss became {loss_value}", step + 1)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            total += loss_value * len(chunk)
            if bar is not None:
                bar.update(len(chunk), loss_value)
        if bar is not None:
            bar.close(total / n)
        return total / n, n / max(time.perf_counter() - started, 1e-9)

    def evaluate(self, dataset=None):
        """Validation loss and per-image Dice/IoU; also the label maps for plots."""
        dataset = self.val_set if dataset is None else dataset
        self.model.eval()
        losses, dices, ious, predictions, truths = [], [], [], [], []
        for index in range(len(dataset)):
            image, mask = dataset[index]
            logits = predict_logits(self.model, image)
            with no_grad():
                loss = self.loss_fn(tensor(logits[None], backend=self.backend), mask[None])
            losses.append(float(loss.item()))
            labels = logits_to_labels(logits)
            dice, iou = dice_iou(labels, mask, self.num_classes)
            dices.append(dice)
            ious.append(iou)
            predictions.append(labels)
            truths.append(mask)
        return {
            "loss": float(np.mean(losses)),
            "dice": float(np.mean(dices)),
            "iou": float(np.mean(ious)),
            "dices": dices,
            "ious": ious,
            "predictions": predictions,
            "truths": truths,
        }

    def _check_weights(self):
        for name, parameter in self.model.named_parameters():
            if not np.isfinite(parameter.numpy()).all():
                raise self._diverged(f"the weight {name} became NaN or infinite")

    # -- the run --
    def fit(self, stop_after: int | None = None) -> dict:
        """Train up to ``config.epochs`` (or ``stop_after`` more epochs, which simulates an
        interruption); save last/best checkpoints, history and PNGs after every epoch.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        first = self.epoch
        result = None
        wrote_best = False
        while self.epoch < self.config.epochs:
            if stop_after is not None and self.epoch - first >= stop_after:
                break
            started = time.perf_counter()
            train_loss, rate = self.train_epoch()
            self._check_weights()
            result = self.evaluate()
            if not math.isfinite(result["loss"]):
                raise self._diverged(f"the validation loss became {result['loss']}")
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scheduler is not None:
                self.scheduler.step()
            self.epoch += 1
            improved = self.finish_epoch({
                "epoch": self.epoch,
                "train_loss": train_loss,
                "val_loss": result["loss"],
                "val_dice": result["dice"],
                "val_iou": result["iou"],
                "lr": lr,
                "images_per_s": rate,
                "seconds": time.perf_counter() - started,
            })
            wrote_best = wrote_best or improved
            self._write_reports(result)
            self.log(
                f"epoch {self.epoch}/{self.config.epochs}  train loss {train_loss:.4f}  "
                f"val loss {result['loss']:.4f}  val Dice {result['dice']:.4f}  "
                f"IoU {result['iou']:.4f}  ({self.history[-1]['seconds']:.1f} s)"
            )
        # The files this call wrote (none when there was no epoch left to run).
        wrote = [] if result is None else [
            name for name in RUN_FILES if (name != "best.npz" or wrote_best)
            and (self.out / name).exists()]
        if result is None:
            result = self.evaluate()
        warning = one_class_warning(result["predictions"], result["truths"])
        return {
            "wrote": wrote,
            "epoch": self.epoch,
            "val_dice": result["dice"],
            "val_iou": result["iou"],
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "warning": warning,
            "out": str(self.out),
        }

    def _write_reports(self, result):
        write_history(self.out, self.history)
        try:
            save_curves(self.out / "curves.png", self.history)
            rows = [(self.val_set[i][0], result["truths"][i], result["predictions"][i])
                    for i in range(min(self.config.samples, len(self.val_set)))]
            save_sample_grid(self.out / "samples.png", rows)
        except ImportError as error:
            if not getattr(self, "_warned_pillow", False):
                self.log(f"note: {error}; skipping the PNG plots")
                self._warned_pillow = True


def _best_epoch_in(path) -> int | None:
    """The epoch of best checkpoint ``path``, None when it is missing or unusable."""
    try:
        meta = read_checkpoint(path)[0] if os.path.lexists(path) else None
    except CheckpointError:
        return None
    return meta.get("epoch") if meta and meta.get("best_epoch") == meta.get("epoch") else None


def _crop_sizes(model, side: int):
    """(input (H, W), output (h, w)): the smallest input whose output is at least
    ``side`` x ``side``. In 'same' mode both are ``side`` (rounded up to a usable size).
    """
    input_hw = model.valid_input_hw((side, side))
    output_hw = model.output_hw(input_hw)
    while min(output_hw) < side:
        input_hw = model.valid_input_hw((input_hw[0] + 1, input_hw[1] + 1))
        output_hw = model.output_hw(input_hw)
    return input_hw, output_hw


def _center_crop(mask: np.ndarray, hw) -> np.ndarray:
    """The central (h, w) part of ``mask`` (H, W), cut as the 'valid' U-Net cuts."""
    h, w = hw
    top, left = (mask.shape[0] - h) // 2, (mask.shape[1] - w) // 2
    return mask[top : top + h, left : left + w]
