"""The command line: ``tinyunet train | predict | evaluate | export`` (also ``python -m tinyunet``).

Progress bars go to stderr, results to stdout. Errors a user can fix (a bad option, a bad
data folder, a damaged checkpoint, a missing backend, a diverged run) end with one
``tinyunet: error: ...`` line and exit status 2 (1 for a diverged run, 130 for Ctrl-C).

Under an MPI launcher (``mpiexec -n P tinyunet train ...``) train runs on the P
processes (tinyunet/distributed.py): rank 0 prints, the others' stdout and stderr are
silenced. An error met by every rank at the same point (the setup, a step, the
validation) is agreed on and printed once by rank 0; any other ends the job with the
failing rank's line and MPI_Abort.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, read_checkpoint
from .data.folder import FolderDataset
from .data.images import (
    EXTENSIONS,
    DataError,
    match_channels,
    parse_channels,
    read_image,
    require_pillow,
    require_tifffile,
)
from .data.masks import MASK_KINDS
from .distributed import DistributedError, from_launcher, launcher_processes, launcher_rank
from .ensemble import load_ensemble
from .files import (
    OutputError,
    atomic_write,
    check_writable_file,
    plan_outputs,
    prepare_output_folder,
    regular_files,
)
from .memory import keep_freed_memory
from .train import (
    AUGMENTATION_WORDS,
    AUGMENTATIONS,
    LOSSES,
    OPTIMIZERS,
    REAL_DATA_DEFAULTS,
    RUN_DEFINING,
    SCHEDULES,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    claim_run_folder,
    config_from_checkpoint,
    member_configs,
    member_folder,
    one_class_warning,
    run_checkpoints,
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


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"Expect: an integer >= 0. Actual: {value}.")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where there is none to show (None: "not given",
    or an off switch)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _both(name: str) -> str:
    """A train option's default for the synthetic demo and for the user's data."""
    return f"synthetic: {getattr(DEFAULTS, name)}; your data: {REAL_DATA_DEFAULTS[name]}"


def _add_train(commands):
    parser = commands.add_parser(
        "train",
        help="train a U-Net (default: the built-in synthetic cells)",
        description="Train a U-Net. Without --data it trains on the built-in synthetic "
        "microscopy cells, sized to finish in about 5 minutes on 2 CPU cores. Writes "
        "last.npz and best.npz checkpoints, history.json/.csv, curves.png and "
        "samples.png to --out.",
        formatter_class=_HelpFormatter,
    )
    d = DEFAULTS
    # Defaults of None mean "not given": --resume then takes the checkpoint's value.
    add = parser.add_argument
    add("--data", metavar="DIR", help="folder with images/ and masks/ (matching stems); "
        "default: synthetic cells")
    _add_reading_options(parser)
    add("--border-weight", type=float, metavar="W0",
        help="instance masks: w0 of the paper's loss weight map, which weighs the gaps "
        f"and borders between touching cells (the paper: 10); 0: no map [{d.border_weight:g}]")
    add("--border-sigma", type=float, metavar="PX",
        help=f"instance masks: sigma of the weight map, in pixels [{d.border_sigma}]")
    add("--class-balance", action="store_const", const=True,
        help="instance masks: add the weight map's w_c (the paper's), which weighs cells "
        "and background alike in the cross-entropy term; it makes masks larger [off]")
    add("--classes", choices=("binary", "multiclass"),
        help=f"synthetic masks: cell/background or background/cell/border [{d.classes}]")
    add("--epochs", type=_positive_int,
        help=f"epochs to train (in all) [{_both('epochs')}]")
    add("--batch-size", type=_positive_int, help=f"crops per step [{_both('batch_size')}]")
    add("--lr", type=float, help=f"learning rate [{_both('lr')}]")
    add("--optimizer", choices=OPTIMIZERS, help=f"[{d.optimizer}]")
    add("--weight-decay", type=float, help=f"[{d.weight_decay}]")
    add("--schedule", choices=SCHEDULES, help=f"learning-rate schedule [{d.schedule}]")
    add("--loss", choices=LOSSES, help=f"[{d.loss}]")
    add("--depth", type=_positive_int,
        help=f"U-Net levels (pooling steps) [{_both('depth')}]")
    add("--base-channels", type=_positive_int,
        help=f"channels of the first level, doubled per level [{d.base_channels}]")
    add("--padding", choices=("same", "valid"),
        help=f"'same' keeps the size; 'valid' is the paper's unpadded net [{d.padding}]")
    add("--up", choices=("transpose", "upsample"),
        help=f"upsampling: transposed conv or bilinear upsample+conv [{d.up}]")
    add("--crop", type=_positive_int, help="side of the training crops' masks; in 'valid' "
        f"mode the image crops are larger by the network's margins [{_both('crop')}]")
    add("--augment", choices=AUGMENTATIONS,
        help="; ".join(f"'{name}': {words}" for name, words in AUGMENTATION_WORDS.items())
        + f" [{_both('augment')}]")
    add("--val-fraction", type=float,
        help="share of a --data folder kept for validation: of its images with 5 or more, "
        f"of each image's rows (a strip at the bottom) with fewer [{d.val_fraction}]")
    add("--val-data", metavar="DIR", help="a separate validation folder (images/, masks/); "
        "then every --data image trains")
    add("--samples-per-epoch", type=_positive_int, metavar="N",
        help="training crops per epoch [synthetic: one per image; your data: "
        f"{REAL_DATA_DEFAULTS['samples_per_epoch']}]")
    add("--foreground-fraction", type=float, metavar="F",
        help="share of the crops centred on a foreground pixel [1/3; 0 for the synthetic "
        "cells]")
    add("--tile", type=_positive_int, help="tile side of the validation's overlap-tile "
        "prediction [from the network's halo: 1024 up to depth 4, 1152 at depth 5]")
    add("--synthetic-train", type=_positive_int,
        help=f"synthetic training images [{d.synthetic_train}]")
    add("--synthetic-val", type=_positive_int,
        help=f"synthetic validation images [{d.synthetic_val}]")
    add("--synthetic-size", type=_positive_int,
        help=f"side of the synthetic images [{d.synthetic_size}]")
    add("--backend", choices=BACKENDS, help="compute backend [tinyunet's default]")
    add("--seed", type=_non_negative_int, help="seed of initialisation, split, order, "
        f"augmentation [{d.seed}]")
    add("--members", type=_positive_int, metavar="K",
        help="train an ensemble of K models, one after another, with seeds seed..seed+K-1 "
        "into OUT/member1..K; predict and evaluate --checkpoint OUT average them "
        f"[{_both('members')}]")
    add("--out", metavar="DIR", help=f"output folder; one that holds another run is "
        f"refused [{d.out}]")
    add("--resume", nargs="?", const="", metavar="CKPT",
        help="continue an interrupted run from CKPT (default: OUT/last.npz); --epochs may "
        "be raised, a new --lr or --weight-decay applies from the next epoch")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out: its files are deleted first")
    parser.set_defaults(run=_train)


CHECKPOINT_HELP = ("a tinyunet checkpoint (.npz), or a run folder (its best.npz; an "
                   "ensemble's, its members'); several: an ensemble, which averages the "
                   "models' probabilities")


def _add_predict(commands):
    parser = commands.add_parser(
        "predict",
        help="write mask PNGs for images of any size",
        description="Predict masks for images (PNG, TIFF, NPY; files or folders) of any "
        "size with overlap-tile prediction. Writes OUT/<name>_mask.png: 0/255 for binary "
        "models, class labels 0..K-1 otherwise.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", action="append", metavar="CKPT",
                       help=CHECKPOINT_HELP)
    model.add_argument("--model", metavar="ONNX", help="a U-Net exported by `tinyunet export "
                       "--format onnx`, run by ONNX Runtime (needs tinyunet[export]; "
                       "--backend does not apply)")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write <name>_prob.npy (K, H, W) and, for binary models, "
                        "<name>_prob.png")
    parser.add_argument("--instances", action="store_true",
                        help="also write <name>_instances.tif: one id per object (uint16, "
                        "uint32 beyond 65535 objects), touching cells split by the border "
                        "class of a model trained on instance masks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (without it they stop the run "
                        "before anything is written)")
    _add_reading_options(parser, masks=False)
    _add_inference_options(parser)
    parser.set_defaults(run=_predict)


def _add_evaluate(commands):
    parser = commands.add_parser(
        "evaluate",
        help="Dice and IoU per image and their mean",
        description="Score a checkpoint on every image/mask pair of a data folder (or, "
        "without --data, on the checkpoint's held-out synthetic images).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                        help=CHECKPOINT_HELP)
    parser.add_argument("--data", metavar="DIR", help="folder with images/ and masks/")
    parser.add_argument("--csv", metavar="FILE", help="also write the scores to FILE")
    _add_reading_options(parser)
    _add_inference_options(parser)
    parser.set_defaults(run=_evaluate)


def _add_export(commands):
    from .export import DEFAULT_OPSET, EXPORT_FORMATS

    parser = commands.add_parser(
        "export",
        help="write a checkpoint's U-Net as ONNX or safetensors",
        description="Export the U-Net of a checkpoint: ONNX (the whole network, for ONNX "
        "Runtime and the programs built on it; needs tinyunet[export]) or safetensors "
        "(the weights with PyTorch's names and layouts, and the config in its metadata). "
        "Both record the input normalisation and the output activation in their metadata.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a tinyunet checkpoint (.npz), or a run folder (its best.npz)")
    parser.add_argument("--out", required=True, metavar="FILE")
    parser.add_argument("--format", choices=EXPORT_FORMATS,
                        help="default: from the --out suffix (.onnx, .safetensors)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    parser.set_defaults(run=_export)


def _add_reading_options(parser, masks: bool = True):
    """--masks, --channels and --page: how image and mask files are read."""
    if masks:
        parser.add_argument("--masks", choices=MASK_KINDS,
                            help="what the mask files hold; 'auto' decides for the folder "
                            "and prints why [auto]")
    parser.add_argument("--channels", metavar="LIST",
                        help="image channels to keep, such as 0,2 [all]")
    parser.add_argument("--page", type=_non_negative_int, metavar="N",
                        help="the page of multi-page TIFFs to read "
                        "[single-page files only]")


def _parse_channels_option(args) -> None:
    """--channels text -> a tuple of indices (after argparse, so that a bad value is one
    clear line)."""
    if getattr(args, "channels", None) is not None:
        args.channels = parse_channels(args.channels)


def _add_inference_options(parser):
    parser.add_argument("--backend", choices=BACKENDS, help="compute backend")
    parser.add_argument("--tile", type=_positive_int,
                        help="tile side for overlap-tile prediction [from the network's "
                        "halo: 1024 up to depth 4, 1152 at depth 5]")
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
    _add_export(commands)
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


def _start_training(args) -> Trainer:
    """The Trainer of a new run, or of the resumed one (restored), announced on stdout."""
    given = _given(args)
    _select_backend(args.backend)
    if args.resume is None:
        config = TrainConfig(**{**(REAL_DATA_DEFAULTS if "data" in given else {}), **given})
        config.validate()
        # The Trainer first: it checks the data (and, on several ranks, that they agree)
        # before anything is written to --out.
        trainer = Trainer(config, comm=args.comm)
        if args.comm is None or args.comm.rank == 0:
            if getattr(args, "ensemble_out", None):  # the first member of an ensemble
                claim_run_folder(args.ensemble_out, args.overwrite)
            claim_run_folder(config.out, args.overwrite)
    else:
        if args.resume:
            path = Path(args.resume)
            out = Path(given.get("out", path.parent))
        else:
            out = Path(given.get("out", DEFAULTS.out))
            path = out / "last.npz"
        meta, _ = read_checkpoint(path)
        _refuse_array_run(meta, path, "resume it from Python (Trainer.restore)")
        saved = dataclasses.asdict(config_from_checkpoint(path, meta.get("config")))
        for name, value in given.items():
            if name in RUN_DEFINING and value != saved.get(name):
                raise UserError(
                    f"--resume continues the run saved in {path}, whose --"
                    f"{name.replace('_', '-')} is {saved.get(name)!r}, not {value!r}. Drop "
                    "the option, or start a new run with another --out."
                )
        config = TrainConfig(**{**saved, **given, "out": str(out)})
        config.validate()
        trainer = Trainer(config, comm=args.comm)
        if args.comm is None or args.comm.rank == 0:
            claim_run_folder(config.out, args.overwrite, resuming=path)
        trainer.restore(path)
        print(f"resuming {path} after epoch {trainer.epoch} of {config.epochs}")
    source = "synthetic" if config.data is None else config.data
    print(f"training a U-Net (depth {config.depth}, {config.base_channels} base channels, "
          f"{config.padding} padding, {trainer.model.num_parameters()} parameters) on "
          f"{len(trainer.train_set)} training and {len(trainer.val_set)} validation images "
          f"({source}); backend {trainer.backend.name}, "
          f"{trainer.input_hw[0]}x{trainer.input_hw[1]} crops, batch {config.batch_size}"
          + (f" per process on {trainer.ranks} processes (global batch "
             f"{config.batch_size * trainer.ranks})" if trainer.ranks > 1 else ""))
    print(trainer.data_description)
    for line in trainer.data_warnings:
        print(line, file=sys.stderr)
    return trainer


def _train(args):
    _parse_channels_option(args)
    runs = _member_runs(args)
    if runs is None:
        return _train_run(args)
    out = Path(runs[0][0].out).parent
    for index, (member, member_args) in enumerate(runs):
        print(f"member {index + 1} of {len(runs)} of the ensemble in {out}: "
              f"--seed {member.seed}, --out {member.out}")
        code = _train_run(member_args)
        if code:
            return code
    print(f"an ensemble of {len(runs)} models: `tinyunet evaluate|predict --checkpoint "
          f"{out}` averages their probabilities")
    return 0


def _member_runs(args):
    """With --members K > 1 (given, the real-data default, or a resumed ensemble's), for
    each member of the ensemble its TrainConfig (train.member_configs) and the train
    options that start or resume it; None for one run."""
    given = _given(args)
    out = Path(given.get("out", DEFAULTS.out))
    if args.resume is None:
        defaults = REAL_DATA_DEFAULTS if "data" in given else {}
        members = given.get("members", defaults.get("members", 1))
        if members == 1:
            return None
        config = TrainConfig(**{**defaults, **given, "members": members})
        config.validate()
        runs = [(member, _options(args, dataclasses.asdict(member), resume=None))
                for member in member_configs(config)]
        runs[0][1].ensemble_out = str(out)
        return runs
    first = out / member_folder(0) / "last.npz"
    if args.resume or (out / "last.npz").exists() or not first.exists():
        return None  # one run, or an error about it
    meta, _ = read_checkpoint(first)
    _refuse_array_run(meta, first, "resume it from Python (Trainer.restore)")
    saved = config_from_checkpoint(first, meta.get("config"), out=str(out))
    for name, value in given.items():
        if name in RUN_DEFINING and value != getattr(saved, name):
            raise UserError(
                f"--resume continues the ensemble in {out}, whose --"
                f"{name.replace('_', '-')} is {getattr(saved, name)!r}, not {value!r}. "
                "Drop the option, or start a new run with another --out.")
    changes = {name: value for name, value in given.items()
               if name not in RUN_DEFINING and name != "out"}
    runs = []
    for member in member_configs(saved):
        if (Path(member.out) / "last.npz").exists():
            options = _options(args, {**changes, "out": member.out}, resume="")
        else:  # not started when the ensemble stopped
            options = _options(args, {**dataclasses.asdict(member), **changes}, resume=None)
        runs.append((member, options))
    return runs


def _options(args, values: dict, resume):
    """A copy of the train options ``args`` with the TrainConfig fields ``values`` (the
    others not given) and ``resume``."""
    options = argparse.Namespace(**vars(args))
    for field in dataclasses.fields(TrainConfig):
        setattr(options, field.name, values.get(field.name))
    options.resume = resume
    return options


def _train_run(args):
    comm = args.comm
    trainer = _start_training(args) if comm is None else comm.together(_start_training, args)
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        message = f"\n{trainer.interrupted_message()}"
        if comm is None:
            print(message, file=sys.stderr)
            return 130
        # mpiexec passes Ctrl-C to every rank, but a rank inside a collective sees it only
        # when the collective ends, which it may never do: the first rank to see it ends
        # the job. Rank 0 gets a second's head start, so that its line is the one shown.
        if comm.rank != 0:
            time.sleep(1.0)
        print(message, file=sys.__stderr__, flush=True)
        comm.abort(code=130)
    if result["warning"]:
        print(result["warning"], file=sys.stderr)
    print(f"final validation Dice {result['val_dice']:.4f}  IoU {result['val_iou']:.4f}; "
          f"best Dice {result['best_dice']:.4f} at epoch {result['best_epoch']}")
    if result["wrote"]:
        print(f"wrote {trainer.out}/{', '.join(result['wrote'])}")
    else:
        print(f"nothing to do: the run had reached epoch {trainer.epoch} of "
              f"{trainer.config.epochs} (raise --epochs to train on)")
    return 0


# ---- predict and evaluate ----------------------------------------------------------------

def _input_files(inputs) -> list[Path]:
    files = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = regular_files(path, EXTENSIONS)  # no FIFOs, no folders named x.png
            if not found:
                raise UserError(f"{path}: no images ({', '.join(EXTENSIONS)}) in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise UserError(f"{path}: Expect: an image file or a folder. Actual: not a "
                            "regular file.")
        else:
            raise UserError(f"{path}: no such file or folder")
    # A file named twice (alone and in its folder) is predicted once.
    unique: dict[str, Path] = {}
    for path in files:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def checkpoint_paths(texts) -> list[Path]:
    """The checkpoint files of the --checkpoint options: a file itself, a run folder its
    best.npz (an ensemble's folder, its members')."""
    paths = []
    for text in texts:
        path = Path(text)
        paths.extend(run_checkpoints(path) if path.is_dir() else [path])
    return paths


def _load(args):
    """(model, metas, mask kind) of the --checkpoint(s): one U-Net, or an Ensemble of
    several trained on the same kind of masks."""
    _select_backend(args.backend)
    paths = checkpoint_paths(args.checkpoint)
    try:
        model, metas = load_ensemble(paths)
    except CheckpointError:
        raise
    except ValueError as error:  # the Ensemble's: members that disagree
        raise UserError(f"--checkpoint: {error}") from error
    members = getattr(model, "members", [model])
    kinds = [model_mask_kind(member, meta)
             for member, meta in zip(members, metas, strict=True)]
    for path, kind in zip(paths[1:], kinds[1:], strict=True):
        if kind != kinds[0]:
            raise UserError(f"--checkpoint: Expect: models trained on the same kind of "
                            f"masks. Actual: {paths[0]} on {kinds[0]}, {path} on {kind}.")
    if len(paths) > 1:
        print(f"ensemble of {len(paths)} models: the mean of their probabilities")
    return model, metas, kinds[0]


def _predictor(args):
    """(model, mask kind) that ``predict`` runs: a checkpoint's U-Net and the kind of masks
    it trained on, or an ONNX file's (--model), whose kind is not recorded (None)."""
    if args.model is None:
        model, _, mask_kind = _load(args)
        return model, mask_kind
    if args.backend is not None:
        raise UserError(f"--backend {args.backend}: applies to --checkpoint; --model "
                        f"{args.model} runs on ONNX Runtime's CPU provider")
    from .onnx_runtime import OnnxModel

    return OnnxModel(args.model), None


def model_mask_kind(model, meta: dict) -> str:
    """The kind of masks a checkpoint's model trained on: recorded since instance masks
    came; older checkpoints are 'binary' (one channel) or 'classes'."""
    kind = meta.get("mask_kind")
    if kind in MASK_KINDS:
        return kind
    return "binary" if model.config["num_classes"] == 1 else "classes"


def predicted_instances(labels: np.ndarray, mask_kind: str | None) -> np.ndarray:
    """Object ids (H, W) uint16 (uint32 beyond 65535 objects) from a label map: a model
    trained on instances splits touching cells by its border class; any other model's
    objects are the 8-connected components of its foreground (labels > 0)."""
    from .data.instances import instances_from_foreground, instances_from_labels

    if mask_kind == "instances":
        return instances_from_labels(labels)
    return instances_from_foreground(labels > 0)


def _predict(args):
    from .data.tiling import logits_to_labels, logits_to_probabilities, predict_logits

    _parse_channels_option(args)
    model, mask_kind = _predictor(args)
    Image = require_pillow("writing mask PNGs")
    tifffile = require_tifffile("predict --instances") if args.instances else None
    out = prepare_output_folder(args.out, "--out")
    channels = model.config["in_channels"]
    binary = model.config["num_classes"] == 1
    suffixes = (["_mask.png"] + (["_prob.npy"] + (["_prob.png"] if binary else [])
                                 if args.probabilities else [])
                + (["_instances.tif"] if args.instances else []))
    # Every input and output is known, and checked, before the first prediction.
    inputs = _input_files(args.inputs)
    plans = plan_outputs(inputs, out, suffixes, args.overwrite)
    for path, outputs in zip(inputs, plans, strict=True):
        image = match_channels(read_image(path, args.channels, args.page), channels, path)
        logits = predict_logits(model, image, tile=args.tile, batch_size=args.batch_size,
                                tta=args.tta)
        labels = logits_to_labels(logits)
        pixels = labels * 255 if binary else labels
        contents = [lambda file, pixels=pixels: Image.fromarray(pixels.astype(np.uint8)).save(
            file, format="PNG")]
        if args.probabilities:
            probabilities = logits_to_probabilities(logits).astype(np.float32)
            contents.append(lambda file, p=probabilities: np.save(file, p))
            if binary:
                grey = (probabilities[0] * 255).round().astype(np.uint8)
                contents.append(lambda file, grey=grey: Image.fromarray(grey).save(
                    file, format="PNG"))
        objects = ""
        if args.instances:
            ids = predicted_instances(labels, mask_kind)
            contents.append(lambda file, ids=ids: file.write(_tiff_bytes(tifffile, ids)))
            objects = f", {int(ids.max()) if ids.size else 0} objects"
        for output, write in zip(outputs, contents, strict=True):
            atomic_write(output, write, overwrite=args.overwrite)
        share = float((labels > 0).mean())
        print(f"{path}: {image.shape[2]}x{image.shape[1]}, foreground {share:.1%}{objects} "
              f"-> {', '.join(output.name for output in outputs)}")
    return 0


def _tiff_bytes(tifffile, array: np.ndarray) -> bytes:
    """``array`` as a TIFF file's bytes (tifffile wants a named file or a buffer, and
    atomic_write's file has no name)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


OBJECT_COLUMNS = ("precision", "recall", "f1", "ap50", "mean_ap")


def _object_columns(scores: dict) -> dict:
    """The evaluate table's object columns from ``object_scores``' dict: precision,
    recall, F1 and AP at IoU 0.5, and AP's mean over 0.5:0.05:0.95."""
    return {"precision": float(scores["precision"][0]), "recall": float(scores["recall"][0]),
            "f1": float(scores["f1"][0]), "ap50": float(scores["ap"][0]),
            "mean_ap": float(scores["mean_ap"])}


def _check_evaluable(dataset, model_kind: str, num_classes: int, where) -> None:
    """Refuse masks that the model's classes cannot be scored against."""
    kind = getattr(dataset, "mask_kind", None)
    if model_kind == "instances" and kind not in (None, "instances", "binary"):
        raise UserError(f"{where}: Expect: instance ids or binary masks for this model, "
                        f"trained on instance masks (--masks instances reads label ids as "
                        f"objects). Actual: masks read as {kind}.")
    if kind == "instances":
        if model_kind == "classes" and num_classes > 1:
            raise UserError(f"{where}: Expect: class labels 0..{num_classes - 1} for this "
                            f"model, trained on {num_classes} classes. Actual: instance ids.")
        return  # scored on the foreground and as objects
    # A binary model (one channel) tells 2 labels apart.
    if max(dataset.num_classes, 2) > max(num_classes, 2):
        raise UserError(f"{where}: Expect: masks with at most {max(num_classes, 2)} "
                        f"classes for this model. Actual: {dataset.num_classes}.")


def _evaluate(args):
    from .data.instances import instances_from_foreground, instances_from_labels
    from .data.tiling import logits_to_labels, predict_logits
    from .metrics import object_scores, summarize_object_scores
    from .train import build_datasets, pixel_scores

    _parse_channels_option(args)
    model, metas, model_kind = _load(args)
    if args.csv:
        check_writable_file(args.csv, "--csv")  # before the work, not after it
    if args.data is not None:
        dataset = FolderDataset(args.data, masks=args.masks or "auto",
                                channels=args.channels, page=args.page)
        for line in dataset.notes:
            print(line)
        for line in dataset.warnings:
            print(line, file=sys.stderr)
    elif len(metas) > 1:
        raise UserError("evaluate: Expect: --data DIR for several checkpoints (each run "
                        "held out other synthetic images). Actual: no --data.")
    else:
        path = checkpoint_paths(args.checkpoint)[0]
        _refuse_array_run(metas[0], path, "give --data DIR")
        _, dataset = build_datasets(config_from_checkpoint(path, metas[0].get("config")))
    num_classes = model.config["num_classes"]
    _check_evaluable(dataset, model_kind, num_classes, args.data or args.checkpoint[0])
    truth_kind = getattr(dataset, "mask_kind", None)
    # Pixel scores of the foreground where either side is instances; objects where the
    # truth has them (instance ids, or a binary mask's connected components).
    foreground = "instances" if "instances" in (model_kind, truth_kind) else model_kind
    objects = truth_kind in ("instances", "binary")
    if truth_kind == "binary":
        print("objects: the truth's objects are the connected components (8-neighbour) of "
              "its binary masks")
    rows, predictions, truths, per_image = [], [], [], []
    columns = ("dice", "iou") + (OBJECT_COLUMNS if objects else ())
    print(f"{'image':<32} " + " ".join(f"{name:>9}" for name in columns))
    for index in range(len(dataset)):
        image, mask = dataset[index]
        image = match_channels(image, model.config["in_channels"], dataset.names[index])
        labels = logits_to_labels(predict_logits(model, image, tile=args.tile,
                                                 batch_size=args.batch_size, tta=args.tta))
        dice, iou = pixel_scores(labels, mask, num_classes, foreground)
        row = {"image": dataset.names[index], "dice": dice, "iou": iou}
        if objects:
            instances = getattr(dataset, "instances", None)
            if truth_kind == "binary":
                true_ids = instances_from_foreground(mask > 0)
            elif instances is not None:
                true_ids = instances[index]
            else:  # a split's part keeps the 3-class target, from which the ids follow
                true_ids = instances_from_labels(mask)
            scores = object_scores(predicted_instances(labels, model_kind), true_ids)
            per_image.append(scores)
            row.update(_object_columns(scores))
        rows.append(row)
        predictions.append(labels)
        truths.append(mask)
        print(f"{row['image']:<32} " + " ".join(f"{row[name]:9.4f}" for name in columns))
    summary = {"image": "mean", "dice": float(np.mean([r["dice"] for r in rows])),
               "iou": float(np.mean([r["iou"] for r in rows]))}
    if objects:
        summary.update(_object_columns(summarize_object_scores(per_image)))
    print(f"{'mean':<32} " + " ".join(f"{summary[name]:9.4f}" for name in columns))
    if objects:
        print("mean: Dice and IoU averaged over the images; the object scores from the "
              "matches (IoU > 0.5; mean_ap over 0.5:0.05:0.95) summed over all images")
    warning = one_class_warning(predictions, truths)
    if warning:
        print(warning, file=sys.stderr)
    if args.csv:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=["image", *columns])
        writer.writeheader()
        writer.writerows(rows + [summary])
        atomic_write(args.csv, lambda file: file.write(table.getvalue().encode()))
    return 0


# ---- export ----------------------------------------------------------------------------

def _export(args):
    from .export import export_checkpoint

    paths = checkpoint_paths([args.checkpoint])
    if len(paths) > 1:
        raise UserError(f"--checkpoint {args.checkpoint}: Expect: one model. Actual: an "
                        f"ensemble of {len(paths)}; export each member's, such as "
                        f"{paths[0]}.")
    format = export_checkpoint(paths[0], args.out, args.format, args.opset, args.overwrite)
    print(f"wrote {args.out} ({format}) from {paths[0]}")
    return 0


def _silence_other_ranks():
    """Under an MPI launcher, rank 0 alone prints: the others' output would repeat it."""
    if launcher_rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def main(argv=None) -> int:
    keep_freed_memory()  # training reuses the same memory every step (tinyunet.memory)
    _silence_other_ranks()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.comm = None
    try:
        if launcher_processes() > 1:
            if args.command != "train":
                raise UserError(f"{args.command}: Expect: one process (only train runs on "
                                f"several). Actual: {launcher_processes()} started by an "
                                "MPI launcher.")
            args.comm = from_launcher()
        return args.run(args)
    except TrainingDiverged as error:
        # On several ranks every rank sees the same summed loss, so all stop here.
        print(f"tinyunet: error: {error}", file=sys.stderr)
        return 1
    except DistributedError as error:
        print(f"tinyunet: error: {error}", file=sys.stderr)
        return 2
    except (UserError, DataError, CheckpointError, OutputError, ValueError,
            ImportError) as error:
        if args.comm is not None:  # met by this rank alone, whose peers wait for it
            args.comm.abort(str(error), 2)
        print(f"tinyunet: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that could not be read or written
        where = f"{error.filename}: " if error.filename else ""
        print(f"tinyunet: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
