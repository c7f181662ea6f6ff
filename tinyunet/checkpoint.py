"""Checkpoints: one ``.npz`` file per save, with no pickled objects.

Every array is its own entry (loaded with ``allow_pickle=False``) and one JSON entry
``meta`` holds the rest: the epoch, the run's config, the model's constructor
arguments, the optimizer's and the schedule's state, the training generator's state
and the history. Each save writes a temporary file in the same folder and renames it
over the old one (tinyunet/files.py), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import tokenize
import zipfile
from pathlib import Path

import numpy as np

from .backends import get_backend
from .errors import ShapeError
from .files import atomic_write

CHECKPOINT_FORMAT = "tinyunet-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, or does not fit the model asked for."""


def encode_tree(value, arrays: dict, prefix: str):
    """A JSON-able tree for ``value``; arrays (and numpy scalars) go into ``arrays``."""
    if isinstance(value, (np.ndarray, np.generic)):
        key = f"{prefix}{len(arrays)}"
        arrays[key] = np.asarray(value)
        return {"__array__": key}
    if hasattr(value, "numpy") and callable(value.numpy):  # a Tensor
        return encode_tree(value.numpy(), arrays, prefix)
    if isinstance(value, dict):
        return {"__dict__": [[encode_tree(k, arrays, prefix), encode_tree(v, arrays, prefix)]
                             for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_tree(v, arrays, prefix) for v in value]}
    if isinstance(value, list):
        return [encode_tree(v, arrays, prefix) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    raise TypeError(f"checkpoint: cannot store a value of type {type(value).__name__}")


def decode_tree(tree, arrays):
    if isinstance(tree, list):
        return [decode_tree(v, arrays) for v in tree]
    if isinstance(tree, dict):
        if "__array__" in tree:
            array = arrays[tree["__array__"]]
            return array[()] if array.ndim == 0 else array
        if "__dict__" in tree:
            return {decode_tree(k, arrays): decode_tree(v, arrays) for k, v in tree["__dict__"]}
        if "__tuple__" in tree:
            return tuple(decode_tree(v, arrays) for v in tree["__tuple__"])
        if "__float__" in tree:
            return float(tree["__float__"])
    return tree


def save_checkpoint(path, model, meta: dict, optimizer=None, scheduler=None, copies=()):
    """Write ``path`` atomically: weights, optimizer/schedule state and ``meta`` (JSON).

    ``copies``: more paths that get the same file, each in place before ``path``. An
    OSError (a full disk) is an OutputError naming ``path``; the old file is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"model/{name}": np.asarray(value)
              for name, value in model.state_dict().items()}
    record = dict(meta)
    record["format"] = CHECKPOINT_FORMAT
    record["version"] = CHECKPOINT_VERSION
    record["model_config"] = dict(model.config)
    if optimizer is not None:
        record["optimizer"] = encode_tree(optimizer.state_dict(), arrays, "optim/")
    if scheduler is not None:
        record["scheduler"] = encode_tree(scheduler.state_dict(), arrays, "sched/")
    arrays["meta"] = np.array(json.dumps(record))
    # numpy's stubs let **arrays fill savez's allow_pickle: bool; no key here is that.
    atomic_write(path, lambda file: np.savez(file, **arrays), copies=copies)  # type: ignore[arg-type]


# What a checkpoint may declare; everything is checked before any array is read, so a
# crafted file fails without taking more memory than its own size.
MODEL_SIZES = ("in_channels", "num_classes", "depth", "base_channels")
MODEL_CHOICES = {"padding": ("same", "valid"), "up": ("transpose", "upsample")}
MAX_DEPTH = 32                  # U-Net levels (2**32-fold downsampling: far past any image)
MAX_META_BYTES = 64 << 20       # the metadata member (JSON as numpy text, 4 bytes a char)
MAX_JSON_NESTING = 32           # tinyunet's own metadata nests about 8 deep
# The arrays read may declare at most this many times the file's size: np.savez stores
# them uncompressed; a deflated copy of real weights shrinks by little; zeros by 1000x.
MAX_EXPANSION = 16
WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def read_checkpoint(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, or a CheckpointError naming it.

    The metadata is checked first (format, version, epoch, the U-Net's description),
    then the headers of the members it names: every weight must have the shape that
    description gives it and a float dtype, and no member may be larger than its
    header says. Only then are those members read (members nothing names are never
    decompressed); weights must be finite. No pickle is ever loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {info.filename: info for info in archive.infolist()}
            meta = _read_meta(path, archive, entries)
            arrays = _read_arrays(path, archive, entries, meta)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, RecursionError,
            NotImplementedError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: not a tinyunet checkpoint, or a damaged one "
            f"({type(error).__name__}: {error})"
        ) from error
    return meta, arrays


def _header(path, archive, entries, name):
    """(shape, dtype, fortran_order, header bytes) of member ``name`` (an .npy file),
    read from its first bytes only; its declared size must be exactly header + data."""
    info = entries.get(f"{name}.npy")
    if info is None:
        raise CheckpointError(f"{path}: Expect: a member '{name}'. Actual: none.")
    with archive.open(info) as file:
        # numpy reports a garbled header as ValueError, or as the parser's SyntaxError or
        # tokenize.TokenError (an unclosed bracket); all of them are one damaged member.
        try:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        except (ValueError, SyntaxError, tokenize.TokenError) as error:
            raise CheckpointError(f"{path}: Expect: an .npy header in '{name}'. "
                                  f"Actual: {type(error).__name__}: {error}") from None
        offset = file.tell()
    if dtype.hasobject:
        raise CheckpointError(f"{path}: Expect: plain arrays (no pickled objects). "
                              f"Actual: '{name}' of dtype {dtype}.")
    size = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != size:
        raise CheckpointError(f"{path}: Expect: '{name}' of {size} bytes for shape {shape} "
                              f"{dtype}. Actual: {info.file_size} bytes.")
    return shape, dtype, fortran, size


def _read_member(path, archive, entries, name):
    with archive.open(entries[f"{name}.npy"]) as file:
        array = np.lib.format.read_array(file, allow_pickle=False)
        if file.read(1):  # also where zipfile compares the member's CRC
            raise CheckpointError(f"{path}: '{name}' holds more bytes than its shape")
    return array


def _nesting(tree) -> int:
    """How deep lists and dicts nest in ``tree`` (without recursion)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, level)
            if deepest > MAX_JSON_NESTING:
                break
            stack.extend((child, level + 1)
                         for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _read_meta(path, archive, entries) -> dict:
    shape, dtype, _, size = _header(path, archive, entries, "meta")
    if shape != () or dtype.kind != "U" or size > MAX_META_BYTES:
        raise CheckpointError(f"{path}: Expect: metadata as one text of at most "
                              f"{MAX_META_BYTES} bytes. Actual: shape {shape}, dtype {dtype}, "
                              f"{size} bytes.")
    text = str(_read_member(path, archive, entries, "meta"))
    try:
        meta = json.loads(text)
    except RecursionError as error:
        raise CheckpointError(f"{path}: Expect: metadata nested at most {MAX_JSON_NESTING} "
                              "deep. Actual: deeper than Python can parse.") from error
    except ValueError as error:
        raise CheckpointError(f"{path}: its metadata is not JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a tinyunet checkpoint (no '{CHECKPOINT_FORMAT}' "
                              "marker in its metadata)")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: Expect: checkpoint format version "
                              f"{CHECKPOINT_VERSION}. Actual: {meta.get('version')}.")
    if _nesting(meta) > MAX_JSON_NESTING:
        raise CheckpointError(f"{path}: Expect: metadata nested at most {MAX_JSON_NESTING} "
                              "deep. Actual: deeper.")
    _check_model_config(path, meta.get("model_config"))
    if "epoch" in meta:
        _check_count(path, "epoch", meta["epoch"])
    if not isinstance(meta.get("config", {}), dict):
        raise CheckpointError(f"{path}: Expect: the run's config as a dict. "
                              f"Actual: {type(meta['config']).__name__}.")
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_count(path, name, value):
    if not _is_count(value):
        raise CheckpointError(f"{path}: Expect: '{name}' an integer >= 0. Actual: {value!r}.")


def _check_model_config(path, config):
    keys = (*MODEL_SIZES, *MODEL_CHOICES)
    if not isinstance(config, dict) or set(config) != set(keys):
        actual = sorted(config) if isinstance(config, dict) else repr(config)
        raise CheckpointError(f"{path}: Expect: a model_config with the keys {list(keys)}. "
                              f"Actual: {actual}.")
    for key in MODEL_SIZES:
        limit = MAX_DEPTH if key == "depth" else None
        value = config[key]
        if not (_is_count(value) and value >= 1 and (limit is None or value <= limit)):
            bound = f"in [1, {limit}]" if limit else ">= 1"
            raise CheckpointError(f"{path}: Expect: model_config {key} an integer {bound}. "
                                  f"Actual: {value!r}.")
    for key, choices in MODEL_CHOICES.items():
        if config[key] not in choices:
            raise CheckpointError(f"{path}: Expect: model_config {key} one of {choices}. "
                                  f"Actual: {config[key]!r}.")


def _array_names(tree) -> list[str]:
    """The members an encoded tree (encode_tree) names, without recursion."""
    names, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("__array__"), str):
                names.append(node["__array__"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


def _read_arrays(path, archive, entries, meta) -> dict:
    from .nn.unet import parameter_shapes

    config = meta["model_config"]
    weights = {f"model/{name}": shape for name, shape in parameter_shapes(config).items()}
    stray = sorted(name[:-4] for name in entries
                   if name.startswith("model/") and name[:-4] not in weights)
    if stray:
        raise CheckpointError(f"{path}: its weights do not fit this U-Net "
                              f"({describe_config(config)}): unexpected members {stray[:5]}")
    # the optimizer's and schedule's arrays, each named in their state tree
    state: dict[str, None] = {}
    for key, prefix in (("optimizer", "optim/"), ("scheduler", "sched/")):
        for name in _array_names(meta.get(key)):
            if not name.startswith(prefix):
                raise CheckpointError(f"{path}: Expect: {key} arrays named {prefix}*. "
                                      f"Actual: {name!r}.")
            state[name] = None
    if len(state) > 2 * len(weights) + 8:
        raise CheckpointError(f"{path}: Expect: optimizer state for {len(weights)} "
                              f"parameters. Actual: {len(state)} arrays.")

    declared = 0
    for name, expected in {**weights, **state}.items():
        shape, dtype, _, size = _header(path, archive, entries, name)
        declared += size
        if name in weights:
            if shape != expected:
                raise CheckpointError(
                    f"{path}: its weights do not fit this U-Net ({describe_config(config)}): "
                    f"Expect: '{name[6:]}' of shape {expected}. Actual: {shape}.")
            if dtype not in WEIGHT_DTYPES:
                raise CheckpointError(f"{path}: Expect: float32 or float64 weights. "
                                      f"Actual: '{name[6:]}' of dtype {dtype}.")
        elif dtype.kind not in "biuf":
            raise CheckpointError(f"{path}: Expect: numeric optimizer state. "
                                  f"Actual: '{name}' of dtype {dtype}.")
    budget = MAX_EXPANSION * path.stat().st_size
    if declared > budget:
        raise CheckpointError(f"{path}: Expect: arrays of at most {budget} bytes "
                              f"({MAX_EXPANSION}x the file's size). Actual: {declared} bytes.")

    arrays = {}
    for name in {**weights, **state}:
        arrays[name] = _read_member(path, archive, entries, name)
        if name in weights and not np.isfinite(arrays[name]).all():
            raise CheckpointError(f"{path}: Expect: finite weights. "
                                  f"Actual: NaN or infinite values in '{name[6:]}'.")
    return arrays


def check_resumable(path, meta: dict) -> None:
    """A CheckpointError naming ``path`` unless ``meta`` holds a training run's state
    (epoch, best epoch and Dice, history, generator and optimizer state) that fits
    together."""
    missing = [key for key in ("epoch", "best_epoch", "best_dice", "history", "rng_state",
                               "optimizer", "config") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: cannot be resumed: Expect: a training run's state. "
                              f"Actual: no {', '.join(missing)}.")
    epoch, best_epoch, best_dice = meta["epoch"], meta["best_epoch"], meta["best_dice"]
    _check_count(path, "best_epoch", best_epoch)
    if best_epoch > epoch:
        raise CheckpointError(f"{path}: Expect: best_epoch <= epoch {epoch}. "
                              f"Actual: {best_epoch}.")
    if isinstance(best_dice, bool) or not isinstance(best_dice, (int, float)) or not (
            best_dice == -1 or 0 <= best_dice <= 1):
        raise CheckpointError(f"{path}: Expect: best_dice in [0, 1] (or -1: none yet). "
                              f"Actual: {best_dice!r}.")
    history = meta["history"]
    if not (isinstance(history, list) and len(history) == epoch
            and all(isinstance(row, dict) for row in history)):
        raise CheckpointError(f"{path}: Expect: a history of {epoch} rows (one per epoch). "
                              f"Actual: {type(history).__name__} of "
                              f"{len(history) if isinstance(history, list) else '?'}.")
    if not isinstance(meta["rng_state"], dict):
        raise CheckpointError(f"{path}: Expect: a generator state (a dict). "
                              f"Actual: {type(meta['rng_state']).__name__}.")


def restore_weights(path, model, meta, arrays):
    state = {key[len("model/"):]: value for key, value in arrays.items()
             if key.startswith("model/")}
    try:
        model.load_state_dict(state)
    except (ShapeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{path}: its weights do not fit this U-Net ({describe_config(model.config)}); "
            f"the checkpoint was saved from {describe_config(meta['model_config'])}. {error}"
        ) from error


def describe_config(config: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in config.items())


def load_model(path, backend=None):
    """(model, meta): the U-Net saved in checkpoint ``path``, ready for prediction."""
    from .nn import UNet

    meta, arrays = read_checkpoint(path)
    try:
        model = UNet(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its model description is unusable "
                              f"({type(error).__name__}: {error})") from error
    restore_weights(path, model, meta, arrays)
    if backend is not None:
        model.to(get_backend(backend))
    model.eval()
    return model, meta
