"""Folder datasets: ``images/`` and ``masks/`` with matching file stems.

    data/
      images/  cell01.png  cell02.tif  cell03.npy  ...
      masks/   cell01.png  cell02.tif  cell03.npy  ...

Files may be PNG, TIFF or NPY (a 2-D (H, W) or channels-last (H, W, C) array), grey or
RGB (an alpha channel is dropped). An image and its mask share a stem; their
extensions may differ.

Images are normalised per image by percentiles: (x - p1) / (p99.8 - p1), per channel,
so that the bulk of the intensities fall in [0, 1] whatever the bit depth. If any image
is RGB, grey images are repeated to 3 channels so that every sample has the same C.

Masks may be binary (0/255 or 0/1) or integer class labels 0..K-1. Binary masks give a
one-channel (sigmoid) problem; labels with K > 2 a K-class (softmax) problem.

Every problem with a file (no partner, differing sizes, unreadable, odd mask values)
raises ``DataError`` naming the file.

Shapes: ``image`` (C, H, W) float32, ``mask`` (H, W) int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
# More classes than this in a "label" mask almost certainly means a grey-level image
# (or an instance mask) was given as a mask.
MAX_CLASSES = 64


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def require_pillow(purpose: str):
    """The PIL.Image module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs Pillow, which is not installed. "
            "Install it with: pip install 'tinyunet[images]'"
        ) from error
    return Image


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Per-channel (x - p_low) / (p_high - p_low) of a (C, H, W) image, as float32.

    Not clipped, so that bright structures keep their contrast. A flat channel maps to 0.
    """
    image = image.astype(np.float32, copy=False)
    lo = np.percentile(image, low, axis=(1, 2), keepdims=True)
    hi = np.percentile(image, high, axis=(1, 2), keepdims=True)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return ((image - lo) / span).astype(np.float32)


def read_array(path: Path) -> np.ndarray:
    """The pixels of an image file: (H, W) or (H, W, C), dtype as stored."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: Expect: one of {EXTENSIONS}. Actual: '{suffix}'.")
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            Image = require_pillow(f"reading {path.name}")
            with Image.open(path) as opened:
                if opened.mode == "P":
                    opened = opened.convert("RGB")
                array = np.asarray(opened)
    except ImportError:
        raise
    except Exception as error:  # Pillow and numpy raise many types for a bad file
        raise DataError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    if array.ndim == 3 and array.shape[2] in (2, 4):
        array = array[..., : array.shape[2] - 1]  # drop the alpha channel
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        raise DataError(
            f"{path}: Expect: a grey (H, W) or RGB (H, W, 3) image. Actual: shape {array.shape}."
        )
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: Expect: numeric pixels. Actual: dtype {array.dtype}.")
    return array


def read_image(path: Path) -> np.ndarray:
    """A normalised (C, H, W) float32 image, C = 1 (grey) or 3 (RGB)."""
    array = read_array(path).astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: the image holds NaN or infinite values")
    chw = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return normalize_percentile(chw)


def read_mask(path: Path) -> np.ndarray:
    """An (H, W) int64 class-label mask; binary 0/255 becomes 0/1."""
    array = read_array(path)
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise DataError(
                f"{path}: Expect: a grey mask (an RGB mask must have equal channels). "
                "Actual: channels differ."
            )
        array = array[..., 0]
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise DataError(f"{path}: Expect: integer mask values. Actual: fractional values.")
    values = np.unique(array)
    if values.min() < 0:
        raise DataError(f"{path}: Expect: mask values >= 0. Actual: minimum {values.min()}.")
    if set(values.tolist()) <= {0, 255}:
        return (array == 255).astype(np.int64)
    if values.max() >= MAX_CLASSES:
        raise DataError(
            f"{path}: Expect: a binary mask (0/255 or 0/1) or class labels below {MAX_CLASSES}. "
            f"Actual: values up to {values.max()} ({len(values)} distinct)."
        )
    return array.astype(np.int64)


def _index_folder(folder: Path) -> dict[str, Path]:
    """stem -> file for the image files in ``folder``; two files with one stem is an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in EXTENSIONS:
            if path.stem in files:
                raise DataError(
                    f"{path}: two files share the stem '{path.stem}' ({files[path.stem].name}); "
                    "keep one"
                )
            files[path.stem] = path
    return files


class FolderDataset:
    """The image/mask pairs of ``root``; ``dataset[i]`` -> (image (C, H, W), mask (H, W)).

    Everything is read and checked up front, so a bad file fails before training starts.
    """

    def __init__(self, root):
        root = Path(root)
        images_dir, masks_dir = root / "images", root / "masks"
        for folder in (root, images_dir, masks_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: not a folder. A dataset folder holds images/ and masks/ "
                    "with matching file stems"
                )
        images, masks = _index_folder(images_dir), _index_folder(masks_dir)
        if not images:
            raise DataError(f"{images_dir}: no images ({', '.join(EXTENSIONS)}) found")
        for stem, path in images.items():
            if stem not in masks:
                raise DataError(f"{path}: no mask with the stem '{stem}' in {masks_dir}")
        for stem, path in masks.items():
            if stem not in images:
                raise DataError(f"{path}: no image with the stem '{stem}' in {images_dir}")

        self.root = root
        self.names = sorted(images)
        self.images, self.masks = [], []
        for stem in self.names:
            image, mask = read_image(images[stem]), read_mask(masks[stem])
            if image.shape[1:] != mask.shape:
                raise DataError(
                    f"{masks[stem]}: Expect: the size of {images[stem].name}, "
                    f"{image.shape[1]}x{image.shape[2]}. Actual: {mask.shape[0]}x{mask.shape[1]}."
                )
            self.images.append(image)
            self.masks.append(mask)

        self.in_channels = max(image.shape[0] for image in self.images)
        self.images = [
            np.repeat(image, self.in_channels, axis=0) if image.shape[0] == 1 else image
            for image in self.images
        ]
        labels = max(int(mask.max()) for mask in self.masks) + 1
        # Two classes are one sigmoid channel; more are a softmax over all of them.
        self.num_classes = 1 if labels <= 2 else labels

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index]


class Subset:
    """The samples of ``dataset`` at ``indices``, with the same attributes."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.in_channels = dataset.in_channels
        self.num_classes = dataset.num_classes
        self.names = [dataset.names[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A shuffled train/validation split of range(count), the same for the same seed.

    At least one sample goes to each side, so ``count`` must be 2 or more.
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
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def train_val_split(dataset, val_fraction: float = 0.2, seed: int = 0):
    """(train, validation) Subsets of ``dataset`` split by ``seed``."""
    train, val = split_indices(len(dataset), val_fraction, seed)
    return Subset(dataset, train), Subset(dataset, val)
