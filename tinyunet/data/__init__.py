"""Datasets and augmentation: the built-in synthetic cells, image folders, arrays,
training crops (sampling), tiling.

Shapes: images (C, H, W) float32, masks (H, W) integer class labels.
"""

from .arrays import ArrayDataset
from .augment import Augmenter, elastic_field, flip_rotate, intensity_jitter, random_crop, warp
from .folder import (
    DataError,
    FolderDataset,
    Subset,
    normalize_percentile,
    read_image,
    read_mask,
    split_indices,
    train_val_split,
)
from .sampling import CropSampler, split_for_validation
from .synthetic import SyntheticCells, make_sample

__all__ = [
    "ArrayDataset",
    "Augmenter",
    "CropSampler",
    "DataError",
    "FolderDataset",
    "Subset",
    "SyntheticCells",
    "elastic_field",
    "flip_rotate",
    "intensity_jitter",
    "make_sample",
    "normalize_percentile",
    "random_crop",
    "read_image",
    "read_mask",
    "split_for_validation",
    "split_indices",
    "train_val_split",
    "warp",
]
