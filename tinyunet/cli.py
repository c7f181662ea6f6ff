"""The command line: ``tinyunet train | predict | evaluate`` (also ``python -m tinyunet``).

Progress bars go to stderr, results to stdout. Errors a user can fix (a bad option, a bad
data folder, a damaged checkpoint, a missing backend, a diverged run) end with one
``tinyunet: error: ...`` line and exit status 2 (1 for a diverged run, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, load_model, read_checkpoint
from .data.folder import EXTENSIONS, DataError, FolderDataset, read_image, require_pillow
from .memory import keep_freed_memory
from .train import (
    LOSSES,
    OPTIMIZERS,
    RUN_DEFINING,
    SCHEDULES,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    dice_iou,
    one_class_warning,
)

BACKENDS = ("numpy", "numba", "cuda")
DEFAULTS = TrainConfig()


class UserError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"Expect: an integer >= 1. Actual: {value}.")
    return value


def _add_train(commands):
    parser = commands.add_parser(
        "train",
        help="train a U-Net (default: the built-in synthetic cells)",
        description="Train a U-Net. Without --data it trains on the built-in synthetic "
        "microscopy cells, sized to finish in about 5 minutes on 2 CPU cores. Writes "
        "last.npz and best.npz checkpoints, history.json/.csv, curves.png and "
        "samples.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = DEFAULTS
    # Defaults of None mean "not given": --resume then takes the checkpoint's value.
    add = parser.add_argument
    add("--data", metavar="DIR", help="folder with images/ and masks/ (matching stems); "
        "default: synthetic cells")
    add("--classes", choices=("binary", "multiclass"),
        help=f"synthetic masks: cell/background or background/cell/border [{d.classes}]")
    add("--epochs", type=_positive_int, help=f"epochs to train (in all) [{d.epochs}]")
    add("--batch-size", type=_positive_int, help=f"images per step [{d.batch_size}]")
    add("--lr", type=float, help=f"learning rate [{d.lr}]")
    add("--optimizer", choices=OPTIMIZERS, help=f"[{d.optimizer}]")
    add("--weight-decay", type=float, help=f"[{d.weight_decay}]")
    add("--schedule", choices=SCHEDULES, help=f"learning-rate schedule [{d.schedule}]")
    add("--loss", choices=LOSSES, help=f"[{d.loss}]")
    add("--depth", type=_positive_int, help=f"U-Net levels (pooling steps) [{d.depth}]")
    add("--base-channels", type=_positive_int,
        help=f"channels of the first level, doubled per level [{d.base_channels}]")
    add("--padding", choices=("same", "valid"),
        help=f"'same' keeps the size; 'valid' is the paper's unpadded net [{d.padding}]")
    add("--up", choices=("transpose", "upsample"),
        help=f"upsampling: transposed conv or bilinear upsample+conv [{d.up}]")
    add("--crop", type=_positive_int, help="side of the training crops' masks; in 'valid' "
        f"mode the image crops are larger by the network's margins [{d.crop}]")
    add("--no-augment", dest="augment", action="store_const", const=False,
        help="turn off flips, rotations, elastic deformation and intensity jitter")
    add("--val-fraction", type=float,
        help="share of a --data folder kept for validation: of its images with 5 or more, "
        f"of each image's rows (a strip at the bottom) with fewer [{d.val_fraction}]")
    add("--val-data", metavar="DIR", help="a separate validation folder (images/, masks/); "
        "then every --data image trains")
    add("--samples-per-epoch", type=_positive_int, metavar="N",
        help="training crops per epoch [synthetic: one per image; folders: enough to "
        "cover the training pixels about once, 256-1024]")
    add("--foreground-fraction", type=float, metavar="F",
        help="share of the crops centred on a foreground pixel [1/3; 0 for the synthetic "
        "cells]")
    add("--tile", type=_positive_int, help="tile side of the validation's overlap-tile "
        "prediction [from the network's halo: 512 up to depth 3, 576 at depth 4]")
    add("--synthetic-train", type=_positive_int,
        help=f"synthetic training images [{d.synthetic_train}]")
    add("--synthetic-val", type=_positive_int,
        help=f"synthetic validation images [{d.synthetic_val}]")
    add("--synthetic-size", type=_positive_int,
        help=f"side of the synthetic images [{d.synthetic_size}]")
    add("--backend", choices=BACKENDS, help="compute backend [tinyunet's default]")
    add("--seed", type=int, help=f"seed of initialisation, split, order, augmentation "
        f"[{d.seed}]")
    add("--out", metavar="DIR", help=f"output folder [{d.out}]")
    add("--resume", nargs="?", const="", metavar="CKPT",
        help="continue an interrupted run from CKPT (default: OUT/last.npz); --epochs may "
        "be raised")
    parser.set_defaults(run=_train)


def _add_predict(commands):
    parser = commands.add_parser(
        "predict",
        help="write mask PNGs for images of any size",
        description="Predict masks for images (PNG, TIFF, NPY; files or folders) of any "
        "size with overlap-tile prediction. Writes OUT/<name>_mask.png: 0/255 for binary "
        "models, class labels 0..K-1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <name>_prob.npy (K, H, W) and, for binary models, "
                        "<name>_prob.png")
    _add_inference_options(parser)
    parser.set_defaults(run=_predict)


def _add_evaluate(commands):
    parser = commands.add_parser(
        "evaluate",
        help="Dice and IoU per image and their mean",
        description="Score a checkpoint on every image/mask pair of a data folder (or, "
        "without --data, on the checkpoint's held-out synthetic images).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT")
    parser.add_argument("--data", metavar="DIR", help="folder with images/ and masks/")
    parser.add_argument("--csv", metavar="FILE", help="also write the scores to FILE")
    _add_inference_options(parser)
    parser.set_defaults(run=_evaluate)


def _add_inference_options(parser):
    parser.add_argument("--backend", choices=BACKENDS, help="compute backend")
    parser.add_argument("--tile", type=_positive_int,
                        help="tile side for overlap-tile prediction [from the network's "
                        "halo: 512 up to depth 3, 576 at depth 4]")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities of the 8 "
                        "flips and rotations (8 times slower)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="tiles per batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyunet",
        description="Train U-Nets for segmentation, predict masks, evaluate checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(commands)
    _add_predict(commands)
    _add_evaluate(commands)
    return parser


def _select_backend(name):
    """Make ``name`` the default backend, or a UserError saying what is available."""
    if name is None:
        return
    import tinyunet

    try:
        tinyunet.set_backend(name)
    except (ImportError, RuntimeError, ValueError) as error:
        available = ", ".join(tinyunet.available_backends())
        raise UserError(f"--backend {name}: not available on this machine ({error}). "
                        f"Available: {available}.") from error


# ---- train ------------------------------------------------------------------------------

def _given(args) -> dict:
    """The train options the user gave on the command line (not left at None)."""
    names = [field.name for field in dataclasses.fields(TrainConfig)]
    return {name: getattr(args, name) for name in names
            if getattr(args, name, None) is not None}


def _refuse_array_run(meta: dict, path, remedy: str):
    """A UserError for a checkpoint of ``tinyunet.fit``, whose data no option can name."""
    if meta.get("data_source") == "arrays":
        raise UserError(f"{path}: this run was trained on arrays (tinyunet.fit), which the "
                        f"command line cannot reload; {remedy}")


def _train(args):
    given = _given(args)
    _select_backend(args.backend)
    if args.resume is None:
        config = TrainConfig(**given)
        trainer = Trainer(config)
    else:
        if args.resume:
            path = Path(args.resume)
            out = Path(given.get("out", path.parent))
        else:
            out = Path(given.get("out", DEFAULTS.out))
            path = out / "last.npz"
        meta, _ = read_checkpoint(path)
        _refuse_array_run(meta, path, "resume it from Python (Trainer.restore)")
        saved = meta["config"]
        for name, value in given.items():
            if name in RUN_DEFINING and value != saved.get(name):
                raise UserError(
                    f"--resume continues the run saved in {path}, whose --"
                    f"{name.replace('_', '-')} is {saved.get(name)!r}, not {value!r}. Drop "
                    "the option, or start a new run with another --out."
                )
        config = TrainConfig(**{**saved, **given, "out": str(out)})
        trainer = Trainer(config)
        trainer.restore(path)
        print(f"resuming {path} after epoch {trainer.epoch} of {config.epochs}")
    source = "synthetic" if config.data is None else config.data
    print(f"training a U-Net (depth {config.depth}, {config.base_channels} base channels, "
          f"{config.padding} padding, {trainer.model.num_parameters()} parameters) on "
          f"{len(trainer.train_set)} training and {len(trainer.val_set)} validation images "
          f"({source}); backend {trainer.backend.name}, "
          f"{trainer.input_hw[0]}x{trainer.input_hw[1]} crops, batch {config.batch_size}")
    print(trainer.data_description)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        print(f"\ninterrupted during epoch {trainer.epoch + 1}; the checkpoint of epoch "
              f"{trainer.epoch} is in {trainer.out}. Continue with: tinyunet train --resume "
              f"--out {trainer.out}", file=sys.stderr)
        return 130
    if result["warning"]:
        print(result["warning"], file=sys.stderr)
    print(f"final validation Dice {result['val_dice']:.4f}  IoU {result['val_iou']:.4f}; "
          f"best Dice {result['best_dice']:.4f} at epoch {result['best_epoch']}")
    # The PNGs are missing when Pillow is not installed, so list what is really there.
    written = [name for name in ("last.npz", "best.npz", "history.json", "history.csv",
                                 "curves.png", "samples.png") if (trainer.out / name).exists()]
    print(f"wrote {trainer.out}/{', '.join(written)}")
    return 0


# ---- predict and evaluate ----------------------------------------------------------------

def match_channels(image: np.ndarray, channels: int, name) -> np.ndarray:
    """``image`` (C, H, W) with the model's channel count: grey is repeated to RGB, RGB is
    averaged to grey; anything else is an error naming the file.
    """
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    if channels == 1:
        return image.mean(axis=0, keepdims=True)
    raise UserError(f"{name}: Expect: {channels} channel(s) for this model. "
                    f"Actual: {image.shape[0]}.")


def _input_files(inputs) -> list[Path]:
    files = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
            if not found:
                raise UserError(f"{path}: no images ({', '.join(EXTENSIONS)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def _load(args):
    _select_backend(args.backend)
    return load_model(args.checkpoint)


def _predict(args):
    from .data.tiling import logits_to_labels, logits_to_probabilities, predict_logits

    model, meta = _load(args)
    Image = require_pillow("writing mask PNGs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    channels = model.config["in_channels"]
    for path in _input_files(args.inputs):
        image = match_channels(read_image(path), channels, path)
        logits = predict_logits(model, image, tile=args.tile, batch_size=args.batch_size,
                                tta=args.tta)
        labels = logits_to_labels(logits)
        pixels = labels * 255 if logits.shape[0] == 1 else labels
        Image.fromarray(pixels.astype(np.uint8)).save(out / f"{path.stem}_mask.png")
        written = [f"{path.stem}_mask.png"]
        if args.probabilities:
            probabilities = logits_to_probabilities(logits).astype(np.float32)
            np.save(out / f"{path.stem}_prob.npy", probabilities)
            written.append(f"{path.stem}_prob.npy")
            if logits.shape[0] == 1:
                grey = (probabilities[0] * 255).round().astype(np.uint8)
                Image.fromarray(grey).save(out / f"{path.stem}_prob.png")
                written.append(f"{path.stem}_prob.png")
        share = float((labels > 0).mean())
        print(f"{path}: {image.shape[2]}x{image.shape[1]}, foreground {share:.1%} -> "
              f"{', '.join(written)}")
    return 0


def _evaluate(args):
    from .data.tiling import logits_to_labels, predict_logits
    from .train import build_datasets

    model, meta = _load(args)
    if args.data is not None:
        dataset = FolderDataset(args.data)
    else:
        _refuse_array_run(meta, args.checkpoint, "give --data DIR")
        _, dataset = build_datasets(TrainConfig(**meta["config"]))
    num_classes = model.config["num_classes"]
    # A binary model (one channel) tells 2 labels apart.
    if max(dataset.num_classes, 2) > max(num_classes, 2):
        raise UserError(f"{args.data}: Expect: masks with at most {max(num_classes, 2)} "
                        f"classes for this model. Actual: {dataset.num_classes}.")
    rows, predictions, truths = [], [], []
    print(f"{'image':<32} {'dice':>7} {'iou':>7}")
    for index in range(len(dataset)):
        image, mask = dataset[index]
        image = match_channels(image, model.config["in_channels"], dataset.names[index])
        labels = logits_to_labels(predict_logits(model, image, tile=args.tile,
                                                 batch_size=args.batch_size, tta=args.tta))
        dice, iou = dice_iou(labels, mask, num_classes)
        rows.append({"image": dataset.names[index], "dice": dice, "iou": iou})
        predictions.append(labels)
        truths.append(mask)
        print(f"{dataset.names[index]:<32} {dice:7.4f} {iou:7.4f}")
    mean_dice = float(np.mean([r["dice"] for r in rows]))
    mean_iou = float(np.mean([r["iou"] for r in rows]))
    print(f"{'mean':<32} {mean_dice:7.4f} {mean_iou:7.4f}")
    warning = one_class_warning(predictions, truths)
    if warning:
        print(warning, file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["image", "dice", "iou"])
            writer.writeheader()
            writer.writerows(rows + [{"image": "mean", "dice": mean_dice, "iou": mean_iou}])
    return 0


def main(argv=None) -> int:
    keep_freed_memory()  # training reuses the same memory every step (tinyunet.memory)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TrainingDiverged as error:
        print(f"tinyunet: error: {error}", file=sys.stderr)
        return 1
    except (UserError, DataError, CheckpointError, ValueError, ImportError) as error:
        print(f"tinyunet: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
