"""Training and prediction on numpy arrays: ``tinyunet.fit`` and ``tinyunet.predict``.

    import numpy as np
    import tinyunet as tu

    images = [np.load("a.npy"), np.load("b.npy")]          # (H, W) or (H, W, C), any dtype
    masks = [np.load("a_mask.npy"), np.load("b_mask.npy")] # (H, W): 0/1, 0..K-1 or object ids
    trainer = tu.fit(images, masks, mask_kind="auto", epochs=20, depth=3, out="runs/arrays")
    print(trainer.data_description, trainer.history[-1]["val_dice"])
    probabilities, labels = tu.predict(trainer, np.load("c.npy"), tta=True)
    model = trainer.model                                   # a tu.nn.UNet
    probabilities, labels = tu.predict("runs/arrays/best.npz", np.load("c.npy"))
    members = [tu.fit(images, masks, seed=seed, out=f"runs/member{seed}") for seed in (1, 2)]
    probabilities, labels = tu.predict([trainer, *members], np.load("c.npy"))  # an ensemble

Shapes: ``images`` as ``tinyunet.data.arrays.ArrayDataset`` takes them (a list of (H, W),
(H, W, C) or (C, H, W) arrays, or an (N, H, W) / (N, C, H, W) stack), masks (H, W)
labels; ``predict`` returns probabilities (K, H, W) float32 and labels (H, W) int64.
Images are normalised as folder images are, in ``fit`` and in ``predict`` alike.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np


def fit(images, masks, val_images=None, val_masks=None, weights=None, verbose: bool = True,
        mask_kind: str = "auto", **options):
    """Train a U-Net on arrays and return the ``Trainer`` (``.model``, ``.history``).

    ``options`` are ``TrainConfig`` fields (epochs, depth, lr, out, ...); those not given
    come from ``train.REAL_DATA_DEFAULTS``, then TrainConfig's defaults, but ``fit``
    trains one model: an ensemble is several calls with other seeds (module docstring).
    Without ``val_images`` the images are split as a folder is (``tinyunet.data.sampling``).
    ``mask_kind``: 'auto', 'binary', 'classes' or 'instances', read by the rule a folder's
    masks follow (``tinyunet.data.masks``); instance ids train as 3 classes, with the
    paper's weight map when ``border_weight`` > 0 (``border_sigma``, ``class_balance``)
    and ``weights`` is not given.
    ``weights``: optional per-pixel loss weight maps, one (H, W) per image. ``verbose``:
    print what was decided, the epoch lines and the progress bar.
    """
    from .data.arrays import ArrayDataset
    from .train import REAL_DATA_DEFAULTS, TrainConfig, Trainer

    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"fit: Expect: options among TrainConfig's fields. "
                         f"Actual: {', '.join(map(repr, unknown))}.")
    if options.get("members", 1) != 1:
        raise ValueError("fit: Expect: one model per call (members=1); for an ensemble, fit "
                         "with other seeds and pass the trainers to tinyunet.predict as a "
                         f"list. Actual: members={options['members']}.")
    if options.get("data") is not None or options.get("val_data") is not None:
        raise ValueError("fit: Expect: arrays, not data= or val_data= folders (use "
                         "Trainer(TrainConfig(data=...)) for folders). Actual: a folder.")
    if (val_images is None) != (val_masks is None):
        raise ValueError("fit: Expect: val_images and val_masks together. Actual: only one.")
    train_set = ArrayDataset(images, masks, weights=weights, mask_kind=mask_kind)
    val_set = None if val_images is None else ArrayDataset(val_images, val_masks,
                                                           mask_kind=train_set.mask_kind)
    trainer = Trainer(TrainConfig(**{**REAL_DATA_DEFAULTS, **options, "members": 1}),
                      log=print if verbose else _quiet,
                      progress_stream=None if verbose else False,
                      train_set=train_set, val_set=val_set)
    if verbose:
        print(trainer.data_description)
    for line in trainer.data_warnings:
        print(line, file=sys.stderr)
    trainer.fit()
    return trainer


def _quiet(line: str) -> None:
    del line


def _model_of(model):
    """The U-Net of a U-Net, a Trainer or a checkpoint path."""
    if isinstance(model, (str, Path)):
        from .checkpoint import load_model

        model, _ = load_model(model)
    return getattr(model, "model", model)  # a Trainer's model


def _image_for(model, image) -> np.ndarray:
    """``image`` as the normalised (C, H, W) float32 input of ``model``."""
    from .data.arrays import image_to_chw
    from .data.images import match_channels, normalize_percentile

    channels = model.config["in_channels"]
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == channels and array.shape[-1] != channels:
        chw = array
    elif array.ndim == 3 and array.shape[-1] == channels and array.shape[0] != channels:
        chw = np.moveaxis(array, -1, 0)
    else:
        chw = image_to_chw(array, "predict: image")
    return match_channels(normalize_percentile(chw.astype(np.float32)), channels,
                          "predict: image")


def predict(model, image, tile: int | None = None, tta: bool = False,
            batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (K, H, W) float32, labels (H, W) int64) for one image array.

    ``model``: a U-Net, a ``Trainer`` or a checkpoint path, or a list of them: an ensemble
    whose probabilities are the mean of its members' (``tinyunet.ensemble``). ``image``:
    (H, W), (H, W, C) or (C, H, W), any numeric dtype; normalised as in training. Grey
    images are repeated to an RGB model's channels and RGB ones averaged for a grey
    model. ``tile``: the overlap-tile side (default: from the network's halo); ``tta``:
    average the 8 flips and rotations (``tinyunet.data.tiling``). Labels: probability >
    0.5 for one channel, the most probable class for several.
    """
    from .data.tiling import predict_tiled
    from .ensemble import Ensemble

    if isinstance(model, (list, tuple)):
        model = Ensemble([_model_of(member) for member in model])
    else:
        model = _model_of(model)
    model.eval()
    probabilities = predict_tiled(model, _image_for(model, image), tile=tile,
                                  batch_size=batch_size, tta=tta)
    if probabilities.shape[0] == 1:
        labels = (probabilities[0] > 0.5).astype(np.int64)
    else:
        labels = probabilities.argmax(axis=0).astype(np.int64)
    return probabilities, labels
