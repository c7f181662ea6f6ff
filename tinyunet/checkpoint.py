"""Checkpoints: one ``.npz`` file per save, with no pickled objects.

Every array is its own entry (loaded with ``allow_pickle=False``) and one JSON entry
``meta`` holds the rest: the epoch, the run's config, the model's constructor
arguments, the optimizer's and the schedule's state, the training generator's state
and the history. Each save writes a temporary file in the same folder and renames it
over the old one, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import zipfile
from pathlib import Path

import numpy as np

from .backends import get_backend
from .errors import ShapeError

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


def save_checkpoint(path, model, meta: dict, optimizer=None, scheduler=None):
    """Write ``path`` atomically: weights, optimizer/schedule state and ``meta`` (JSON)."""
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
    # A unique name in the same folder, so the rename is atomic; opened with the user's
    # usual permissions (mkstemp would make it private).
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "xb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def read_checkpoint(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, or a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as error:
        raise CheckpointError(
            f"{path}: not a tinyunet checkpoint, or a damaged one "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a tinyunet checkpoint (no '{CHECKPOINT_FORMAT}' "
                              "marker in its metadata)")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: Expect: checkpoint format version "
                              f"{CHECKPOINT_VERSION}. Actual: {meta.get('version')}.")
    return meta, arrays


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
