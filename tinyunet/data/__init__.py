"""Datasets and augmentation: the built-in synthetic cells, image folders, arrays,
training crops (sampling), tiling.

Shapes: images (C, H, W) float32, masks (H, W) unsigned integer class labels.
"""

from .arrays import ArrayDataset
from .augment import Augmenter, elastic_field, flip_rotate, intensity_jitter, random_crop, warp
from .folder import FolderDataset
from .images import (
    DataError,
    normalize_percentile,
    parse_channels,
    read_array,
    read_image,
    to_chw,
)
from .masks import MASK_KINDS, MaskSet, interpret_masks, read_mask, regions_per_label
from .sampling import CropSampler, split_for_validation, split_indices
from .synthetic import SyntheticCells, make_nuclei, make_sample

__all__ = [
    "MASK_KINDS",
    "ArrayDataset",
    "Augmenter",
    "CropSampler",
    "DataError",
    "FolderDataset",
    "MaskSet",
    "SyntheticCells",
    "elastic_field",
    "flip_rotate",
    "interpret_masks",
    "intensity_jitter",
    "make_nuclei",
    "make_sample",
    "normalize_percentile",
    "parse_channels",
    "random_crop",
    "read_array",
    "read_image",
    "read_mask",
    "regions_per_label",
    "split_for_validation",
    "split_indices",
    "to_chw",
    "warp",
]
