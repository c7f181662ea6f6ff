"""Which pixels train and which validate, and where the training crops come from.

Shapes: images (C, H, W) float32, masks (H, W) integer labels, weight maps (H, W)
float32; a crop is (C, h, w), (h, w), (h, w) with (h, w) the network's input size.

**Validation split** (``split_for_validation``). With ``STRIP_SPLIT_BELOW`` (5) or more
images, whole images are held out (``val_fraction`` of them, drawn by the seed). With
fewer, holding out whole images would keep a large share of the few labelled pixels
from training, so each image gives its last rows instead: ``ceil(val_fraction * H)``
rows, at least ``min_rows`` (the training crop's side) where the image has twice that,
and never all of it. The training part is the rows above the strip, so no training
crop ever sees a validation pixel. Both parts are views of the same arrays.

Every epoch predicts the whole validation part, so its cost grows with the held-out
pixels while the training steps stay fixed. The held-out pixels are therefore capped at
``MAX_VALIDATION_PIXELS`` (2 Mpx, 1.7 images of 1100x1100): fewer images are held out
(never fewer than one), or shorter strips (never under ``min_rows``). Twenty images of
1100x1100 keep one for validation instead of four; that run's validation took a fifth
of its time.

**Crops** (``CropSampler``). An epoch is ``samples`` crops. Images are drawn in
proportion to their area, so every training pixel is equally likely to be seen;
within an epoch each image gets the floor or the ceiling of its share (systematic
sampling: images of one size get exactly one crop each when ``samples`` equals their
number), in a shuffled order. A crop's position is uniform over the image (a small
image is mirrored out to the crop's size first), except that a share
``foreground_fraction`` of the crops, as in nnU-Net, is centred on a random foreground
pixel (any non-zero label) shifted by up to a quarter of the output crop each way, so
that masks with little foreground (1% of a large field) still train. An image without
foreground gets uniform crops only. The foreground pixels of each image are found once:
their flat indices, a seeded random subsample of at most ``MAX_FOREGROUND_POINTS`` kept
as int32 (int64 past 2**31 pixels), found by row blocks so that a large image's full
coordinate list is never built.
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import ArrayDataset
from .augment import mirror_to_size
from .images import DataError

STRIP_SPLIT_BELOW = 5
MAX_FOREGROUND_POINTS = 10_000
MAX_VALIDATION_PIXELS = 2_000_000
# Pixels per row block when foreground pixels are listed.
_BLOCK_PIXELS = 1 << 22


# ---- the validation split ----------------------------------------------------------------

def _weights(dataset):
    """The dataset's per-pixel loss weight maps (a list) or None."""
    return getattr(dataset, "weights", None)


def split_indices(count: int, val_fraction: float, seed: int, pixels=None,
                  max_val_pixels: int = 0) -> tuple[list[int], list[int]]:
    """A shuffled train/validation split of range(count), the same for the same seed.

    The validation images are the first ``round(val_fraction * count)`` of a seeded
    permutation; given ``pixels`` (of image i: ``pixels[i]``), fewer where theirs would
    add up to more than ``max_val_pixels``. At least one sample goes to each side, so ``count``
    must be 2 or more.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"split: Expect: 0 < val_fraction < 1. Actual: {val_fraction}.")
    if count < 2:
        raise DataError(
            f"split: Expect: at least 2 image/mask pairs (one for training, one for "
            f"validation). Actual: {count}."
        )
    order = np.random.default_rng(seed).permutation(count)
    n_val = min(count - 1, max(1, int(round(count * val_fraction))))
    if pixels is not None:
        held = np.cumsum([pixels[i] for i in order[:n_val]])
        n_val = max(1, int(np.count_nonzero(held <= max_val_pixels)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def strip_rows(height: int, val_fraction: float, min_rows: int,
               max_rows: int | None = None) -> int:
    """Rows at the bottom of an image of ``height`` rows that are held out for validation;
    no more than ``max_rows`` unless that is under ``min_rows``."""
    rows = math.ceil(val_fraction * height - 1e-9)  # 0.2 * 1100 is 220.00000000000003
    if max_rows is not None:
        rows = min(rows, max_rows)
    if height >= 2 * min_rows:
        rows = min(max(rows, min_rows), height - min_rows)
    return min(max(rows, 1), height - 1)


def _part(dataset, pieces, names) -> ArrayDataset:
    """An ArrayDataset of (image, mask, weight) ``pieces`` keeping ``dataset``'s classes."""
    images, masks, weights = zip(*pieces, strict=True)
    return ArrayDataset(list(images), list(masks),
                        weights=None if weights[0] is None else list(weights),
                        names=names, prepared=True, num_classes=dataset.num_classes,
                        mask_kind=getattr(dataset, "mask_kind", None))


def split_for_validation(dataset, val_fraction: float, seed: int, min_rows: int,
                         max_pixels: int = MAX_VALIDATION_PIXELS):
    """(train, validation, description) for ``dataset``; see the module docstring.

    ``description`` is one line that says what was held out.
    """
    count = len(dataset)
    weights = _weights(dataset)
    samples = [(*dataset[i], None if weights is None else weights[i]) for i in range(count)]
    cap = f"; at most {max_pixels / 1e6:g} Mpx, to keep validation short"
    if count >= STRIP_SPLIT_BELOW:
        pixels = [mask.size for _, mask, _ in samples]
        train, val = split_indices(count, val_fraction, seed, pixels, max_pixels)
        uncapped = len(split_indices(count, val_fraction, seed)[1])
        description = (f"validation: {len(val)} of {count} images held out, drawn by the "
                       f"seed (--val-fraction {val_fraction:g}"
                       f"{cap if len(val) < uncapped else ''})")
        return (_part(dataset, [samples[i] for i in train], [dataset.names[i] for i in train]),
                _part(dataset, [samples[i] for i in val], [dataset.names[i] for i in val]),
                description)
    train_pieces, val_pieces, train_names, val_names, held = [], [], [], [], []
    capped = False
    for (image, mask, weight), name in zip(samples, dataset.names, strict=True):
        height = mask.shape[0]
        if height < 2:
            raise DataError(f"{name}: Expect: at least 2 rows to hold some out for "
                            f"validation. Actual: {height}. Give --val-data DIR.")
        rows = strip_rows(height, val_fraction, min_rows,
                          max_rows=max_pixels // (count * mask.shape[1]))
        capped = capped or rows < strip_rows(height, val_fraction, min_rows)
        cut = height - rows
        train_pieces.append((image[:, :cut], mask[:cut], None if weight is None else weight[:cut]))
        val_pieces.append((image[:, cut:], mask[cut:], None if weight is None else weight[cut:]))
        train_names.append(f"{name} (rows 0-{cut - 1})")
        val_names.append(f"{name} (rows {cut}-{height - 1})")
        held.append(rows)
    spread = f"{held[0]}" if min(held) == max(held) else f"{min(held)}-{max(held)}"
    description = (f"validation: {count} image{'s' if count > 1 else ''} (fewer than "
                   f"{STRIP_SPLIT_BELOW}), so the last {spread} rows of each (--val-fraction "
                   f"{val_fraction:g}, at least {min_rows} rows where the image has twice "
                   f"that{cap if capped else ''}) are held out; training crops never reach "
                   "them")
    return (_part(dataset, train_pieces, train_names), _part(dataset, val_pieces, val_names),
            description)


# ---- crops ---------------------------------------------------------------------------------

def foreground_points(mask: np.ndarray, rng: np.random.Generator,
                      limit: int = MAX_FOREGROUND_POINTS) -> np.ndarray:
    """Sorted flat indices of at most ``limit`` foreground (non-zero) pixels of ``mask``.

    All of them when there are at most ``limit``; otherwise a uniform random subsample
    drawn from ``rng``. int32 unless the image has 2**31 pixels or more.
    """
    height, width = mask.shape
    dtype = np.int32 if mask.size < 2**31 else np.int64
    total = int(np.count_nonzero(mask))
    if total <= limit:
        return np.flatnonzero(mask).astype(dtype)
    # Ranks (in raster order) of the kept pixels, then each row block's share of them.
    ranks = np.sort(rng.choice(total, size=limit, replace=False))
    kept = np.empty(limit, dtype=dtype)
    block = max(1, _BLOCK_PIXELS // max(width, 1))
    seen = filled = 0
    for top in range(0, height, block):
        found = np.flatnonzero(mask[top : top + block])
        upto = int(np.searchsorted(ranks, seen + len(found)))
        kept[filled:upto] = found[ranks[filled:upto] - seen] + top * width
        seen += len(found)
        filled = upto
    return kept


class CropSampler:
    """Training crops of ``dataset``: ``epoch_order`` says which images, ``crop`` cuts one.

    ``input_hw``: the network's input crop; ``output_hw``: the part of it the loss sees
    (smaller in 'valid' mode, centred). ``seed`` fixes the foreground subsamples; every
    per-epoch draw comes from the generator passed in (the trainer's, checkpointed).
    """

    def __init__(self, dataset, input_hw, output_hw, foreground_fraction: float, seed: int):
        self.dataset = dataset
        self.weights = _weights(dataset)
        self.input_hw = tuple(input_hw)
        self.output_hw = tuple(output_hw)
        self.foreground_fraction = float(foreground_fraction)
        masks = [dataset[i][1] for i in range(len(dataset))]
        self.areas = np.array([mask.size for mask in masks], dtype=np.float64)
        empty = np.zeros(0, dtype=np.int32)
        self.foreground = [
            foreground_points(mask, np.random.default_rng([seed, 2, i]))
            if self.foreground_fraction > 0 else empty
            for i, mask in enumerate(masks)
        ]

    def epoch_order(self, samples: int, rng: np.random.Generator) -> np.ndarray:
        """The image index of each of an epoch's ``samples`` crops, shuffled."""
        bounds = np.cumsum(self.areas) / self.areas.sum() * samples
        positions = rng.random() + np.arange(samples)
        chosen = np.searchsorted(bounds, positions, side="right")
        return rng.permutation(np.minimum(chosen, len(self.areas) - 1))

    def crop(self, index: int, rng: np.random.Generator):
        """(image (C, h, w), mask (h, w), weight (h, w) or None) of image ``index``."""
        image, mask = self.dataset[index]
        weight = None if self.weights is None else self.weights[index]
        original_width = mask.shape[1]
        image, mask, weight, (pad_top, pad_left) = mirror_to_size(image, mask, self.input_hw,
                                                                  weight)
        h, w = self.input_hw
        height, width = mask.shape
        points = self.foreground[index]
        centred = self.foreground_fraction > 0 and rng.random() < self.foreground_fraction
        if centred and points.size:
            point = int(points[rng.integers(points.size)])
            y, x = divmod(point, original_width)
            reach_y, reach_x = self.output_hw[0] // 4, self.output_hw[1] // 4
            top = y + pad_top - h // 2 + int(rng.integers(-reach_y, reach_y + 1))
            left = x + pad_left - w // 2 + int(rng.integers(-reach_x, reach_x + 1))
            top, left = min(max(top, 0), height - h), min(max(left, 0), width - w)
        else:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
        rows, cols = slice(top, top + h), slice(left, left + w)
        return (image[:, rows, cols], mask[rows, cols],
                None if weight is None else weight[rows, cols])
