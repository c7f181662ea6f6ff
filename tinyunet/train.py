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
``samples_per_epoch`` random crops drawn over the whole area of the images: 300 for
folder and array data (``REAL_DATA_DEFAULTS``, also what a TrainConfig left at None
gives them) and one crop per image for the synthetic cells (the demo's epoch is its 96
images). A third of the crops of folder and array data are centred on foreground
(``foreground_fraction``); the synthetic cells cover about a third of every image, so
uniform crops already see plenty of them, and there centred crops lowered the demo's
final Dice: their default share is 0. ``Trainer.data_description`` says what was
decided; the command line prints it.

Determinism: the model is initialised after ``tinyunet.manual_seed(seed)``; the data
split, the batch order and every augmentation draw from numpy generators seeded by
``seed``. The same seed on the same backend gives the same loss curve.

Several processes (``mpiexec -n P``, ``Trainer(config, comm=Communicator())``): every
rank draws the same global batch of ``batch_size * P`` samples, augments all of it
(so the generator's draws stay the same on every rank and each sample is augmented
as in one process with that batch) and trains on its shard; one allreduce per step
sums the gradients (tinyunet/distributed.py). So P ranks with batch B follow one
process with batch P*B, to float32 rounding of the summed gradients. Validation is
shared out by image; only rank 0 writes files and prints.

Checkpoints (tinyunet/checkpoint.py) hold the weights, the optimizer's and the
schedule's state, the training generator's state and the history, so a resumed run
continues exactly as it would have without the interruption. The progress bar, the
history files and the PNG reports are in tinyunet/reports.py.

Ensembles: a config with ``members`` K > 1 stands for K runs (``member_configs``), which
the command line trains one after another; a Trainer trains one model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from .data.folder import DataError, FolderDataset
from .data.instances import weight_map
from .data.masks import MASK_KINDS
from .data.sampling import CropSampler, split_for_validation
from .data.synthetic import SyntheticCells
from .data.tiling import default_tile, logits_to_labels, predict_logits, receptive_halo
from .distributed import Communicator, RankMismatch, dataset_digest, digest, file_digest
from .errors import ShapeError
from .files import OutputError, atomic_write, prepare_output_folder, remove_stale_temporaries
from .reports import ProgressBar, save_curves, save_sample_grid, write_history

LOSSES = ("dice", "iou", "bce", "ce", "dice+bce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "step")
# --augment: 'full' deforms half the crops elastically (the paper's deformation).
AUGMENTATION_WORDS = {"full": "flips, turns, elastic deformation, intensity jitter",
                      "flips": "flips and turns only", "none": "none"}
AUGMENTATIONS = tuple(AUGMENTATION_WORDS)
# TrainConfig's defaults are the built-in demo's (96 small synthetic images, about a
# minute). Real images (a --data folder, or arrays through tinyunet.fit) start from these
# instead: the paper's depth and 128-pixel crops for context around cells of 10-50 px,
# Adam at 1e-3 with the cosine schedule, flips and turns only, and a fixed budget of 8
# epochs of 300 crops (600 steps), so that the run takes minutes on 2 cores whatever
# the number and size of the images; more data gives more varied crops, not more steps.
# The paper's deformation with 1600 steps scored lower on two of three real sets
# (docs/real-data.md). The command line trains 2 such models (an ensemble, averaged
# by predict and evaluate): every ensemble measured on the real sets scored above the
# mean of its models, and 3 averaged no better than 2 over 13 confocal seeds.
# tinyunet.fit trains one model per call.
REAL_DATA_DEFAULTS: dict[str, Any] = {"depth": 4, "crop": 128, "batch_size": 4, "lr": 1e-3,
                                      "epochs": 8, "samples_per_epoch": 300, "augment": "flips",
                                      "members": 2}
# Options that fix the model or the data; a resumed run must keep them.
RUN_DEFINING = ("data", "classes", "depth", "base_channels", "padding", "up", "seed",
                "crop", "loss", "optimizer", "synthetic_train", "synthetic_val",
                "synthetic_size", "val_fraction", "val_data", "foreground_fraction",
                "masks", "channels", "page", "border_weight", "border_sigma",
                "class_balance", "members")
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
    masks: str = "auto"              # how to read mask files: see tinyunet.data.masks
    channels: tuple[int, ...] | None = None  # image channels to keep; None: all
    page: int | None = None          # the page of multi-page files; None: single-page only
    border_weight: float = 0.0       # w0 of the paper's weight map (instances); 0: off
    border_sigma: float = 5.0        # sigma of the weight map, in pixels
    class_balance: bool = False      # the weight map's w_c: background against cells
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
    augment: str = "full"            # one of AUGMENTATIONS
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
    members: int = 1                 # >1: an ensemble, see member_configs

    def validate(self):
        def need(condition, option, expect, actual):
            if not condition:
                raise ValueError(f"{option}: Expect: {expect}. Actual: {actual}.")

        need(self.loss in LOSSES, "--loss", f"one of {LOSSES}", repr(self.loss))
        need(self.optimizer in OPTIMIZERS, "--optimizer", f"one of {OPTIMIZERS}",
             repr(self.optimizer))
        need(self.schedule in SCHEDULES, "--schedule", f"one of {SCHEDULES}",
             repr(self.schedule))
        need(self.augment in AUGMENTATIONS, "--augment", f"one of {AUGMENTATIONS}",
             repr(self.augment))
        need(self.classes in ("binary", "multiclass"), "--classes",
             "'binary' or 'multiclass'", repr(self.classes))
        need(self.padding in ("same", "valid"), "--padding", "'same' or 'valid'",
             repr(self.padding))
        need(self.up in ("transpose", "upsample"), "--up", "'transpose' or 'upsample'",
             repr(self.up))
        for name in ("epochs", "batch_size", "depth", "base_channels", "crop",
                     "synthetic_train", "synthetic_val", "synthetic_size", "members"):
            value = getattr(self, name)
            need(value >= 1, f"--{name.replace('_', '-')}", ">= 1", value)
        need(self.lr > 0 and math.isfinite(self.lr), "--lr", "a positive number", self.lr)
        need(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "--weight-decay",
             "a number >= 0", self.weight_decay)
        need(self.seed >= 0, "--seed", "an integer >= 0", self.seed)
        need(0 < self.val_fraction < 1, "--val-fraction", "a number in (0, 1)",
             self.val_fraction)
        need(self.foreground_fraction is None or 0 <= self.foreground_fraction <= 1,
             "--foreground-fraction", "a number in [0, 1]", self.foreground_fraction)
        for name in ("samples_per_epoch", "tile"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"--{name.replace('_', '-')}", ">= 1", value)
        need(self.masks in MASK_KINDS, "--masks", f"one of {MASK_KINDS}", repr(self.masks))
        need(self.channels is None or (len(self.channels) > 0 and all(
            isinstance(c, int) and c >= 0 for c in self.channels)), "--channels",
             "channel indices >= 0, such as 0,2", self.channels)
        need(self.page is None or self.page >= 0, "--page", "an integer >= 0", self.page)
        need(self.border_weight >= 0 and math.isfinite(self.border_weight),
             "--border-weight", "a number >= 0", self.border_weight)
        need(self.border_sigma > 0 and math.isfinite(self.border_sigma), "--border-sigma",
             "a positive number", self.border_sigma)
        need(self.val_data is None or self.data is not None, "--val-data",
             "--data too (the synthetic cells have their own validation images)",
             "--val-data without --data")


def member_configs(config: TrainConfig) -> list[TrainConfig]:
    """The runs of ``config``: itself, or with ``members`` K > 1 the K members of an
    ensemble, trained one after another: member i (1..K) has seed ``seed + i - 1`` (its
    own initialisation, crops and held-out images) and the folder ``out/member<i>``.
    ``predict`` and ``evaluate --checkpoint out`` average their probabilities
    (``tinyunet.ensemble``)."""
    if config.members == 1:
        return [config]
    return [dataclasses.replace(config, seed=config.seed + index,
                                out=str(Path(config.out) / member_folder(index)))
            for index in range(config.members)]


def member_folder(index: int) -> str:
    """The folder name of an ensemble's member ``index`` (from 0)."""
    return f"member{index + 1}"


MEMBER_FOLDER = re.compile(r"member[1-9][0-9]*")


def run_checkpoints(folder) -> list[Path]:
    """The checkpoints a run folder stands for: its best.npz, or an ensemble's, the
    best.npz of each member folder (member1, member2, ... in order) that has one."""
    folder = Path(folder)
    if (folder / "best.npz").exists():
        return [folder / "best.npz"]
    names = [name for name in os.listdir(folder) if MEMBER_FOLDER.fullmatch(name)]
    members = [folder / name / "best.npz" for name in sorted(names, key=lambda n: int(n[6:]))]
    found = [path for path in members if path.exists()]
    if not found:
        raise CheckpointError(f"{folder}: Expect: a run folder (best.npz, or member folders "
                          "with one). Actual: none there.")
    return found


def claim_run_folder(out, overwrite: bool = False, resuming=None) -> Path:
    """The output folder of a new run, or of one resumed from checkpoint ``resuming``:
    created if missing and known to be writable (else an OutputError naming --out).

    A new run never destroys an old one: a folder that holds another run's files
    (RUN_FILES, in it or in an ensemble's member folders) is refused, unless
    ``overwrite``, which deletes them first so that no file of the old run is mistaken
    for one of the new. A resume may write into the folder of the checkpoint it continues.
    """
    out = prepare_output_folder(out, "--out")
    if resuming is not None and Path(resuming).resolve().parent == out.resolve():
        return out
    members = [name for name in sorted(os.listdir(out))
               if MEMBER_FOLDER.fullmatch(name) and (out / name).is_dir()]
    found = [name for name in RUN_FILES if os.path.lexists(out / name)]
    found_members = [(name, [file for file in RUN_FILES if os.path.lexists(out / name / file)])
                     for name in members]
    found_members = [(name, files) for name, files in found_members if files]
    if (found or found_members) and not overwrite:
        held = found + [f"{name}/ (an ensemble's member)" for name, _ in found_members]
        raise OutputError(
            f"--out {out}: Expect: a folder without a previous run. Actual: it holds "
            f"{', '.join(held)}. Continue that run with --resume --out {out}, choose "
            "another --out, or pass --overwrite to replace it.")
    for name in found:
        (out / name).unlink()
    for name, files in found_members:
        for file in files:
            (out / name / file).unlink()
        if not os.listdir(out / name):
            (out / name).rmdir()
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
    if isinstance(saved.get("augment"), bool):  # written before the choice of three
        saved = {**saved, "augment": "full" if saved["augment"] else "none"}
    for name, value in saved.items():
        if not _fits_annotation(fields[name].type, value):
            raise CheckpointError(f"{path}: Expect: config {name} of type "
                                  f"{fields[name].type}. Actual: {value!r}.")
    if isinstance(saved.get("channels"), list):  # JSON has no tuples
        saved = {**saved, "channels": tuple(saved["channels"])}
    try:
        TrainConfig(**saved).validate()
    except ValueError as error:
        raise CheckpointError(f"{path}: its run config is unusable: {error}") from error
    return TrainConfig(**{**saved, **changes})


def _fits_annotation(annotation: object, value) -> bool:
    """Whether ``value`` (from JSON) has a type the annotation ("int", "str | None", ...)
    allows; an annotation of other types is not checked here (validate() still runs)."""
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "None": lambda v: v is None,
              "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(
                  isinstance(c, int) and not isinstance(c, bool) for c in v)}
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
        train_set = FolderDataset(config.data, masks=config.masks, channels=config.channels,
                                  page=config.page)
    add_border_weights(train_set, config)
    if val_set is None and config.val_data is not None:
        # The training folder's decision, so that 'auto' cannot read the two differently.
        val_set = FolderDataset(config.val_data,
                                masks=getattr(train_set, "mask_kind", config.masks),
                                channels=config.channels, page=config.page)
    notes = list(getattr(train_set, "notes", []))
    warnings = list(getattr(train_set, "warnings", []))
    if val_set is not None:
        notes += [f"validation {line}" for line in getattr(val_set, "notes", [])]
        warnings += list(getattr(val_set, "warnings", []))
    train, val, description = _split_or_check(config, train_set, val_set)
    train.warnings = warnings
    return train, val, "\n".join([*notes, description])


def _split_or_check(config: TrainConfig, train_set, val_set):
    """prepare_datasets' (train, validation, description) once the data is read."""
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


def add_border_weights(dataset, config: TrainConfig) -> None:
    """Give an instance dataset (one with ``instances``) the paper's per-pixel loss
    weights, ``weight_map(ids, config.border_weight, config.border_sigma,
    config.class_balance)`` per image (H, W) float32, computed on whole images so that
    crops cut them like the masks. Other datasets, and ``border_weight`` 0 without
    ``class_balance``, keep ``weights`` None.

    The map is off by default (``border_weight`` 0, ``class_balance`` False): on real
    nuclei it cost pixel Dice, and w_c made masks larger (docs/real-data.md has the
    figures); the border class alone keeps touching cells apart."""
    instances = getattr(dataset, "instances", None)
    if getattr(dataset, "weights", None) is not None:
        return
    dataset.weights = None
    if instances is not None and (config.border_weight > 0 or config.class_balance):
        dataset.weights = [weight_map(ids, config.border_weight, config.border_sigma,
                                      class_balance=config.class_balance)
                           for ids in instances]


def pixel_scores(prediction: np.ndarray, truth: np.ndarray, num_classes: int,
                 mask_kind: str | None) -> tuple[float, float]:
    """Hard Dice and IoU of a label map (H, W) against the truth (H, W): ``dice_iou``,
    except for a model trained on instances, whose score is the foreground's: classes
    1 and 2 (interior and border) together against truth > 0 (ids, the 3-class target
    or a binary mask alike)."""
    if mask_kind == "instances":
        return dice_iou(prediction > 0, truth > 0, 1)
    return dice_iou(prediction, truth, num_classes)


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
    ``data_description`` says what the masks were read as (the datasets' notes), how the
    data was split and how long an epoch is; ``data_warnings`` lists suspicious data
    (an all-empty mask set), one line each, for the caller to show.
    ``comm``: a ``tinyunet.distributed.Communicator`` to train on all its ranks (each
    rank builds its Trainer with the same config); only rank 0 logs and writes files.
    """

    def __init__(self, config: TrainConfig, log=print, progress_stream=None,
                 train_set=None, val_set=None, comm: Communicator | None = None):
        from .nn import UNet

        config.validate()
        self.config = config
        self.comm = comm
        self.ranks = 1 if comm is None else comm.size
        self.writes = comm is None or comm.rank == 0  # logs, progress bar and files
        self.log = log if self.writes else _quiet
        self.progress_stream = progress_stream if self.writes else False
        if config.backend is not None:
            set_backend(config.backend)
        self.backend = get_backend()
        if comm is not None and self.backend.name == "cuda":
            from .backends.cuda_backend import SIMULATED

            comm.bind_gpu(simulated=SIMULATED)
        self.out = Path(config.out)

        self.train_set, self.val_set, split = prepare_datasets(config, train_set, val_set)
        # Kept in checkpoints: a run trained on arrays cannot be rebuilt from its config.
        if train_set is not None:
            self.data_source = "arrays"
        else:
            self.data_source = "synthetic" if config.data is None else "folder"
        self.num_classes = self.train_set.num_classes
        self.mask_kind = _mask_kind(self.train_set, config)
        self.data_warnings = list(getattr(self.train_set, "warnings", []))
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
               if foreground_fraction > 0 else "placed uniformly")
            + f"; augmentation: {AUGMENTATION_WORDS[config.augment]}")
        if getattr(self.train_set, "weights", None) is not None and config.loss in ("dice",
                                                                                    "iou"):
            self.data_description += (f"\nnote: --loss {config.loss} has no cross-entropy "
                                      "term, so the per-pixel weights are not used")
        self.augment = Augmenter(
            crop=None,  # the sampler cuts the crops
            flip=config.augment != "none",
            elastic_p=0.5 if config.augment == "full" else 0.0,
            elastic_sigma=config.elastic_sigma,
            jitter=config.augment == "full",
        )
        # One generator for batch order and augmentation; its state is checkpointed.
        self.rng = np.random.default_rng([config.seed, 1])
        self.epoch = 0
        self.history: list[dict] = []
        self.best_dice = -1.0
        self.best_epoch = 0
        # The epoch that out/last.npz holds, once this trainer wrote it (or resumed it).
        self.saved_epoch: int | None = None
        if comm is not None:
            comm.check_same(
                digest(dataclasses.asdict(config), self.backend.name,
                       dataset_digest(self.train_set), dataset_digest(self.val_set)),
                "options, backend and data")

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
            "ranks": self.ranks,
            "data_source": self.data_source,
            "mask_kind": self.mask_kind,
        }

    def save(self, path, copies=()):
        """Write a checkpoint (on rank 0 only when training on several ranks)."""
        if self.writes:
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
                if self.writes:
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
        # An ensemble's member goes on with the ensemble, which then trains the rest.
        out = self.out.parent if self.config.members > 1 else self.out
        return (f"interrupted during epoch {self.saved_epoch + 1}; {self.out / 'last.npz'} "
                f"holds epoch {self.saved_epoch}. Continue with: tinyunet train --resume "
                f"--out {out}")

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
        saved_ranks = int(meta.get("ranks", 1))
        if saved_ranks != self.ranks:
            self.log(_ranks_changed_note(path, saved_ranks, meta["config"]["batch_size"],
                                         self.ranks, self.config.batch_size))
        if self.comm is not None:
            self.comm.check_same(file_digest(path), f"checkpoint {path}")

        self._apply_hyperparameters()
        last = self.out / "last.npz"
        self.saved_epoch = (self.epoch if last.exists() and os.path.samefile(path, last)
                            else None)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)
        self._settle_best(path)

    def _samples_per_epoch(self) -> int:
        if self.config.samples_per_epoch is not None:
            return self.config.samples_per_epoch
        synthetic = isinstance(self.train_set, SyntheticCells)
        samples = len(self.train_set) if synthetic else REAL_DATA_DEFAULTS["samples_per_epoch"]
        return max(samples, self.config.batch_size)

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
        if self.saved_epoch is not None:
            kept = (f"The last good checkpoint, {last} (epoch {self.saved_epoch}), was kept "
                    "as it was.")
        else:
            kept = f"No checkpoint had been written yet to {self.out}."
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDiverged(f"{what} at {where}: training stopped. {kept} "
                                f"Try a lower --lr (it was {lr:g}).")

    def train_epoch(self) -> tuple[float, float]:
        """One epoch of ``samples_per_epoch`` crops; (mean loss, crops per second)."""
        self.model.train()
        n = self.samples_per_epoch
        order = self.sampler.epoch_order(n, self.rng)
        batch = self.config.batch_size * self.ranks  # the global batch
        steps = math.ceil(n / batch)
        bar = None
        if self.progress_stream is not False:
            bar = ProgressBar(steps, f"epoch {self.epoch + 1}/{self.config.epochs}",
                              self.progress_stream)
        total, loss_value = 0.0, float("nan")
        started = time.perf_counter()
        for step in range(steps):
            chunk = order[step * batch : (step + 1) * batch]
            images, masks, weights = self._batch(chunk)
            # Overflow is caught below as a non-finite loss, with a clearer message than
            # numpy's warnings.
            with np.errstate(over="ignore", invalid="ignore"):
                if self.comm is None:
                    logits = self.model(tensor(images, backend=self.backend))
                    loss = self.loss_fn(logits, masks, weights)
                    loss_value = float(loss.item())
                else:
                    loss_value = self._shard_step(images, masks, weights)
                if not math.isfinite(loss_value):
                    if bar is not None:
                        bar.close(loss_value)
                    raise self._diverged(f"the loss became {loss_value}", step + 1)
                if self.comm is None:
                    self.optimizer.zero_grad()
                    loss.backward()
                self.optimizer.step()
            total += loss_value * len(chunk)
            if bar is not None:
                bar.update(len(chunk), loss_value)
        if bar is not None:
            bar.close(total / n)
        return total / n, n / max(time.perf_counter() - started, 1e-9)

    def _shard_step(self, images, masks, weights) -> float:
        """Forward and backward on this rank's shard of the global batch, then the sum of
        every rank's gradients; returns the global batch's mean loss. An error here
        reaches every rank through the sum, and each raises RankFailure."""
        assert self.comm is not None  # called only in a distributed run
        shard = self.comm.shard(len(images))
        loss, error = None, None
        self.optimizer.zero_grad()
        try:
            if len(shard):
                logits = self.model(tensor(images[shard.start : shard.stop],
                                           backend=self.backend))
                loss = self.loss_fn(logits, masks[shard.start : shard.stop],
                                    None if weights is None else
                                    weights[shard.start : shard.stop])
                loss.backward()
        except Exception as caught:  # noqa: BLE001 - every rank must learn of it
            error = caught
        return self.comm.reduce_gradients(self.optimizer.params, loss,
                                          len(shard) / len(images), error)

    def evaluate(self, dataset=None):
        """Validation loss and per-image Dice/IoU; also the label maps for plots.

        On several ranks each scores every P-th image and the scores are gathered, so
        every rank returns the same result. There ``predictions`` and ``truths`` hold
        the label maps of the first ``config.samples`` images (the ones drawn) and,
        after those, only each map's distinct labels (enough for one_class_warning).
        """
        dataset = self.val_set if dataset is None else dataset
        self.model.eval()
        indices = range(len(dataset))
        if self.comm is not None:
            indices = indices[self.comm.rank :: self.comm.size]
        scores, error = {}, None
        try:
            for index in indices:
                image, mask = dataset[index]
                logits = predict_logits(self.model, image, tile=self.config.tile)
                with no_grad():
                    loss = self.loss_fn(tensor(logits[None], backend=self.backend), mask[None])
                labels = logits_to_labels(logits)
                dice, iou = pixel_scores(labels, mask, self.num_classes, self.mask_kind)
                scores[index] = (float(loss.item()), dice, iou, labels, mask)
        except Exception as caught:
            if self.comm is None:
                raise
            error = caught
        if self.comm is not None:
            scores = self._gather_scores(scores, error)
        losses, dices, ious, predictions, truths = (
            [scores[index][field] for index in range(len(dataset))] for field in range(5))
        return {
            "loss": float(np.mean(losses)),
            "dice": float(np.mean(dices)),
            "iou": float(np.mean(ious)),
            "dices": dices,
            "ious": ious,
            "predictions": predictions,
            "truths": truths,
        }

    def _gather_scores(self, scores: dict, error) -> dict:
        """Every rank's validation scores, merged; also checks that the ranks' weights
        are still equal (they get the same sums, so they must be)."""
        shown = self.config.samples
        sent = {index: (loss, dice, iou, *(
                    (labels, mask) if index < shown else (np.unique(labels), np.unique(mask))))
                for index, (loss, dice, iou, labels, mask) in scores.items()}
        weights = digest(*(p.numpy() for p in self.model.parameters()))
        assert self.comm is not None  # called only in a distributed run
        gathered = self.comm.gather((weights, sent), error, "the validation")
        differ = [rank for rank, (w, _) in enumerate(gathered) if w != gathered[0][0]]
        if differ:
            raise RankMismatch(
                f"Expect: equal weights on every rank after epoch {self.epoch + 1}. Actual: "
                f"rank(s) {', '.join(map(str, differ))} of {self.ranks} differ from rank 0.")
        merged = {}
        for _, part in gathered:
            merged.update(part)
        return merged

    def _check_weights(self):
        for name, parameter in self.model.named_parameters():
            if not np.isfinite(parameter.numpy()).all():
                raise self._diverged(f"the weight {name} became NaN or infinite")

    # -- the run --
    def fit(self, stop_after: int | None = None) -> dict:
        """Train up to ``config.epochs`` (or ``stop_after`` more epochs, which simulates an
        interruption); save last/best checkpoints, history and PNGs after every epoch.
        """
        if self.writes:
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
        if not self.writes:
            return
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


def _mask_kind(dataset, config: TrainConfig) -> str:
    """What the training masks are: a folder's (or arrays') decided kind; the synthetic
    cells are 'binary' or, with borders, 'classes'."""
    kind = getattr(dataset, "mask_kind", None)
    if kind is not None:
        return kind
    if isinstance(dataset, SyntheticCells):
        return "binary" if config.classes == "binary" else "classes"
    return "binary" if dataset.num_classes == 1 else "classes"


def _quiet(*_):
    """The log of ranks other than 0: rank 0 prints for the job."""


def _ranks_changed_note(path, saved_ranks: int, saved_batch: int, ranks: int,
                        batch: int) -> str:
    before, now = saved_ranks * saved_batch, ranks * batch
    same = (f"the global batch is the same ({now}), so the run follows the one it "
            "continues to float32 rounding, not bit for bit" if before == now else
            f"the global batch changes from {before} to {now}, so the steps group the "
            "samples differently")
    return (f"note: {path} was written by {saved_ranks} process(es), this run has {ranks}. "
            f"The sample order and the augmentation go on unchanged; {same}.")


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
