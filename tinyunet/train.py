"""Training: the loop, metrics, resume and the choice of loss, optimizer and schedule.

    from tinyunet.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(epochs=5, out="runs/demo")).fit()

Shapes: images (N, C, H, W) float32; masks (N, H, W) class labels (datasets may hold
any integer dtype; each batch becomes int64); optional per-pixel loss weights
(N, H, W) float32; logits (N, K, h, w) with K = 1 (binary, sigmoid) or the number of
classes (softmax).

Data: a folder (``data``), the built-in synthetic cells, or datasets passed to
``Trainer`` (``tinyunet.fit`` passes arrays). Validation is a separate folder
(``val_data``), held-out images, or, with fewer than 5 images, a strip of each image
that training never sees (``tinyunet.data.sampling``). An epoch is
``samples_per_epoch`` random crops drawn over the whole area of the images; by
default one crop per image for the synthetic cells (the demo's epoch is its 96
images), and enough crops to cover the training pixels about once, 256 to 1024, for
other data. A third of the crops of folder and array data are centred on foreground
(``foreground_fraction``); the synthetic cells cover about a third of every image, so
uniform crops already see plenty of them, and there centred crops lowered the demo's
final Dice: their default share is 0. ``Trainer.data_description`` says what was
decided; the command line prints it.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import functional as F
from .autograd import no_grad, tensor
from .backends import get_backend, set_backend
from .checkpoint import (
    CheckpointError,
    decode_tree,
    describe_config,
    read_checkpoint,
    restore_weights,
    save_checkpoint,
)
from .data.augment import Augmenter
from .data.folder import DataError, FolderDataset
from .data.sampling import CropSampler, default_samples_per_epoch, split_for_validation
from .data.synthetic import SyntheticCells
from .data.tiling import default_tile, logits_to_labels, predict_logits, receptive_halo
from .errors import ShapeError
from .reports import ProgressBar, save_curves, save_sample_grid, write_history

LOSSES = ("dice", "iou", "bce", "ce", "dice+bce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
# Options that fix the model or the data; a resumed run must keep them.
RUN_DEFINING = ("data", "classes", "depth", "base_channels", "padding", "up", "seed",
                "crop", "loss", "optimizer", "synthetic_train", "synthetic_val",
                "synthetic_size", "val_fraction", "val_data", "foreground_fraction")


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
    val_fraction: float = 0.2        # folder data without val_data only
    val_data: str | None = None      # a separate validation folder
    samples_per_epoch: int | None = None  # crops per epoch; None: see the module docstring
    foreground_fraction: float | None = None  # share of crops centred on foreground;
    # None: 1/3 for folder and array data, 0 for the synthetic cells (see the docstring)
    tile: int | None = None          # validation tile side; None: the default tile
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
        need(0 < self.val_fraction < 1, "--val-fraction", "a number in (0, 1)",
             self.val_fraction)
        need(self.foreground_fraction is None or 0 <= self.foreground_fraction <= 1,
             "--foreground-fraction", "a number in [0, 1]", self.foreground_fraction)
        for name in ("samples_per_epoch", "tile"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')}", ">= 1", value)
        need(self.val_data is None or self.data is not None, "--val-data",
             "--data too (the synthetic cells have their own validation images)",
             "--val-data without --data")


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
    """loss(logits (N, K, h, w), masks (N, h, w) integers, weights=None) -> scalar Tensor.

    ``weights`` (N, h, w): per-pixel weights of the cross-entropy term (BCE for one
    channel, cross-entropy for K), which becomes the mean of weight * pixel loss (all-ones
    weights give the unweighted loss); the Dice and IoU terms stay unweighted, so
    'dice' and 'iou' ignore them.
    """
    if name in ("bce",) and num_classes > 1:
        raise ValueError(f"--loss: 'bce' needs binary masks, but there are {num_classes} "
                         "classes; use 'ce', 'dice' or 'dice+bce'.")
    if name == "ce" and num_classes == 1:
        raise ValueError("--loss: 'ce' needs more than two classes, but the masks are binary; "
                         "use 'bce', 'dice' or 'dice+bce'.")

    def target(logits, masks):
        masks = np.asarray(masks).astype(np.int64, copy=False)
        if num_classes == 1:
            return tensor(masks[:, None], dtype=logits.dtype, backend=logits.backend)
        return tensor(masks, backend=logits.backend)

    def weighted_pixel_loss(logits, t, weights):
        weights = np.asarray(weights)
        if num_classes == 1:
            return F.binary_cross_entropy_with_logits(logits, t, weight=weights[:, None])
        w = tensor(weights, dtype=logits.dtype, backend=logits.backend)
        return (F.cross_entropy(logits, t, reduction="none") * w).mean()

    def loss(logits, masks, weights=None):
        t = target(logits, masks)
        if weights is not None and name not in ("dice", "iou"):
            pixel = weighted_pixel_loss(logits, t, weights)
            if name in ("bce", "ce"):
                return pixel
            return pixel * 0.5 + F.dice_loss(logits, t) * 0.5
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

def prepare_datasets(config: TrainConfig, train_set=None, val_set=None):
    """(train, validation, description) for ``config``.

    ``train_set`` (and optionally ``val_set``) given: those (as ``tinyunet.fit`` passes
    arrays). Otherwise the folder ``config.data`` with ``config.val_data`` or a split of
    it (``split_for_validation``), or the synthetic cells.
    """
    if train_set is None and config.data is None:
        size = (config.synthetic_size, config.synthetic_size)
        # Separate seeds streams: the validation images are never training images.
        train = SyntheticCells(config.synthetic_train, size, seed=2 * config.seed,
                               kind=config.classes)
        val = SyntheticCells(config.synthetic_val, size, seed=2 * config.seed + 1,
                             kind=config.classes)
        return train, val, f"validation: {len(val)} separate synthetic images"
    if train_set is None:
        train_set = FolderDataset(config.data)
    if val_set is None and config.val_data is not None:
        val_set = FolderDataset(config.val_data)
    if val_set is None:
        return split_for_validation(train_set, config.val_fraction, config.seed, config.crop)
    source = config.val_data or "validation images"
    if val_set.in_channels != train_set.in_channels:
        raise DataError(f"{source}: Expect: validation images with the training images' "
                        f"{train_set.in_channels} channel(s). Actual: {val_set.in_channels}.")
    if max(val_set.num_classes, 2) > max(train_set.num_classes, 2):
        raise DataError(f"{source}: Expect: validation masks with at most "
                        f"{max(train_set.num_classes, 2)} classes, as the training masks. "
                        f"Actual: {val_set.num_classes}.")
    where = "given separately" if config.val_data is None else f"of {config.val_data}"
    return train_set, val_set, (f"validation: the {len(val_set)} images {where}; all "
                                f"{len(train_set)} training images train")


def build_datasets(config: TrainConfig):
    """(train, validation) datasets for ``config``; see ``prepare_datasets``."""
    train, val, _ = prepare_datasets(config)
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
    ``train_set`` / ``val_set``: datasets to use instead of ``config.data`` (e.g.
    ``ArrayDataset``s); without ``val_set`` the training set is split as a folder is.
    ``data_description`` says how the data was split and how long an epoch is.
    """

    def __init__(self, config: TrainConfig, log=print, progress_stream=None,
                 train_set=None, val_set=None):
        from .nn import UNet

        config.validate()
        self.config = config
        self.log = log
        self.progress_stream = progress_stream
        if config.backend is not None:
            set_backend(config.backend)
        self.backend = get_backend()
        self.out = Path(config.out)

        self.train_set, self.val_set, split = prepare_datasets(config, train_set, val_set)
        # Kept in checkpoints: a run trained on arrays cannot be rebuilt from its config.
        if train_set is not None:
            self.data_source = "arrays"
        else:
            self.data_source = "synthetic" if config.data is None else "folder"
        self.num_classes = self.train_set.num_classes
        _seed_model_init(config.seed)
        self.model = UNet(in_channels=self.train_set.in_channels,
                          num_classes=self.num_classes, depth=config.depth,
                          base_channels=config.base_channels, padding=config.padding,
                          up=config.up)
        self.optimizer = _make_optimizer(config, list(self.model.parameters()))
        self.scheduler = _make_scheduler(config, self.optimizer)
        self.loss_fn = loss_function(config.loss, self.num_classes)

        halo = receptive_halo(config.depth)
        if config.tile is not None and config.padding == "same" and config.tile <= 2 * halo:
            raise ValueError(f"--tile: Expect: more than 2 * halo = {2 * halo} pixels for a "
                             f"depth-{config.depth} U-Net (or leave it out: "
                             f"{default_tile(config.depth)}). Actual: {config.tile}.")
        self.input_hw, self.output_hw = _crop_sizes(self.model, config.crop)
        foreground_fraction = config.foreground_fraction
        if foreground_fraction is None:
            foreground_fraction = 0.0 if self.data_source == "synthetic" else 1 / 3
        self.sampler = CropSampler(self.train_set, self.input_hw, self.output_hw,
                                   foreground_fraction, config.seed)
        self.samples_per_epoch = self._samples_per_epoch()
        steps = math.ceil(self.samples_per_epoch / config.batch_size)
        self.data_description = (
            f"{split}\nan epoch is {self.samples_per_epoch} crops of "
            f"{self.input_hw[0]}x{self.input_hw[1]} ({steps} steps of {config.batch_size}), "
            + (f"{foreground_fraction:.0%} of them centred on foreground"
               if foreground_fraction > 0 else "placed uniformly"))
        if getattr(self.train_set, "weights", None) is not None and config.loss in ("dice",
                                                                                    "iou"):
            self.data_description += (f"\nnote: --loss {config.loss} has no cross-entropy "
                                      "term, so the per-pixel weights are not used")
        self.augment = Augmenter(
            crop=None,  # the sampler cuts the crops
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
            "data_source": self.data_source,
        }

    def save(self, path):
        save_checkpoint(path, self.model, self._meta(), self.optimizer, self.scheduler)

    def restore(self, path):
        """Continue from checkpoint ``path``: weights, optimizer, schedule, RNG, history."""
        meta, arrays = read_checkpoint(path)
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

    def _samples_per_epoch(self) -> int:
        if self.config.samples_per_epoch is not None:
            return self.config.samples_per_epoch
        if isinstance(self.train_set, SyntheticCells):
            return max(len(self.train_set), self.config.batch_size)
        return default_samples_per_epoch(self.train_set, self.output_hw,
                                         self.config.batch_size)

    # -- one epoch --
    def _batch(self, indices):
        """Augmented crops: images (N, C, H, W), masks (N, h, w) int64, weights or None."""
        images, masks, weights = [], [], []
        for index in indices:
            image, mask, weight = self.sampler.crop(int(index), self.rng)
            if weight is None:
                image, mask = self.augment(image, mask, self.rng)
            else:
                image, mask, weight = self.augment(image, mask, self.rng, weight=weight)
                weights.append(_center_crop(weight, self.output_hw))
            images.append(image)
            masks.append(_center_crop(mask, self.output_hw))
        return (np.stack(images), np.stack(masks).astype(np.int64),
                np.stack(weights) if weights else None)

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        where = f"epoch {self.epoch + 1}" + (f", step {step}" if step is not None else "")
        last = self.out / "last.npz"
        if last.is_file():
            kept = (f"The last good checkpoint, {last} (epoch {self.epoch}), was kept "
                    "as it was.")
        else:
            kept = "No checkpoint had been written yet (it diverged in the first epoch)."
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDiverged(f"{what} at {where}: training stopped. {kept} "
                                f"Try a lower --lr (it was {lr:g}).")

    def train_epoch(self) -> tuple[float, float]:
        """One epoch of ``samples_per_epoch`` crops; (mean loss, crops per second)."""
        self.model.train()
        n = self.samples_per_epoch
        order = self.sampler.epoch_order(n, self.rng)
        steps = math.ceil(n / self.config.batch_size)
        bar = None
        if self.progress_stream is not False:
            bar = ProgressBar(steps, f"epoch {self.epoch + 1}/{self.config.epochs}",
                              self.progress_stream)
        total, loss_value = 0.0, float("nan")
        started = time.perf_counter()
        for step in range(steps):
            chunk = order[step * self.config.batch_size : (step + 1) * self.config.batch_size]
            images, masks, weights = self._batch(chunk)
            # Overflow is caught below as a non-finite loss, with a clearer message than
            # numpy's warnings.
            with np.errstate(over="ignore", invalid="ignore"):
                logits = self.model(tensor(images, backend=self.backend))
                loss = self.loss_fn(logits, masks, weights)
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
            logits = predict_logits(self.model, image, tile=self.config.tile)
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
        first = self.epoch
        result = None
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
            self.history.append({
                "epoch": self.epoch,
                "train_loss": train_loss,
                "val_loss": result["loss"],
                "val_dice": result["dice"],
                "val_iou": result["iou"],
                "lr": lr,
                "images_per_s": rate,
                "seconds": time.perf_counter() - started,
            })
            improved = result["dice"] > self.best_dice
            if improved:
                self.best_dice, self.best_epoch = result["dice"], self.epoch
            self.save(self.out / "last.npz")
            if improved:
                self.save(self.out / "best.npz")
            self._write_reports(result)
            self.log(
                f"epoch {self.epoch}/{self.config.epochs}  train loss {train_loss:.4f}  "
                f"val loss {result['loss']:.4f}  val Dice {result['dice']:.4f}  "
                f"IoU {result['iou']:.4f}  ({self.history[-1]['seconds']:.1f} s)"
            )
        if result is None:
            result = self.evaluate()
        warning = one_class_warning(result["predictions"], result["truths"])
        return {
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
