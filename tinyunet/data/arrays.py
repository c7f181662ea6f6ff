"""Datasets held in memory: numpy images and masks, as ``tinyunet.fit`` takes them.

    dataset = ArrayDataset(images, masks)          # dataset[i] -> (image, mask)

``images``: a list of (H, W), (H, W, C) or (C, H, W) arrays (sizes may differ), an
(N, H, W) stack of grey images or an (N, C, H, W) stack. A 3-D image is channels-last
when its last axis has at most 4 entries and its first more, channels-first in the
opposite case; any other 3-D shape is an error that asks for one of the two layouts.
``masks``: a list of (H, W) label arrays or an (N, H, W) stack; bool, or integers >= 0
of any integer dtype: 0/1 or 0/255 (binary), class labels 0..K-1 or instance ids,
read by ``mask_kind`` as a folder's masks are (``tinyunet.data.masks``).

Images are normalised as folder images are (``normalize_percentile``: per image and
channel, (x - p1) / (p99.8 - p1)); if some images are RGB, grey ones are repeated to
3 channels. Masks keep their own integer dtype (0/255 becomes 0/1, bool becomes
uint8); training converts each batch to int64. Optional per-pixel loss ``weights``
are (H, W) float32 maps, one per image.

Attributes, as ``FolderDataset``'s: ``names``, ``in_channels``, ``num_classes`` (1 for
binary masks: one sigmoid channel; K > 2 for labels 0..K-1), ``images`` (C, H, W)
float32, ``masks`` (H, W) integers and ``weights`` (a list of (H, W) float32, or None).
"""

from __future__ import annotations

import numpy as np

from .images import DataError, normalize_percentile
from .masks import interpret_masks

# A 3-D image's channel axis has at most this many entries (grey, two-channel, RGB, RGBA).
MAX_CHANNELS = 4


def image_to_chw(array, name: str) -> np.ndarray:
    """One image as (C, H, W), in its own dtype; the layout rule is the module's."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        first, last = array.shape[0], array.shape[-1]
        if last <= MAX_CHANNELS < first:
            return np.moveaxis(array, -1, 0)
        if first <= MAX_CHANNELS < last:
            return array
    raise DataError(
        f"{name}: Expect: an image (H, W), (H, W, C) or (C, H, W) with C <= {MAX_CHANNELS} "
        f"channels on one side and more than {MAX_CHANNELS} pixels on the others. "
        f"Actual: shape {array.shape}."
    )


STACK_SHAPES = {"images": ("(N, H, W)", "(N, C, H, W)"), "masks": ("(N, H, W)",),
                "weights": ("(N, H, W)",)}


def _as_list(arrays, what: str, stack_ndim: tuple[int, ...]) -> list:
    """A list of per-sample arrays from a list/tuple or a stacked array of ``stack_ndim``."""
    if isinstance(arrays, (list, tuple)):
        return list(arrays)
    arrays = np.asarray(arrays)
    if arrays.ndim == 2:
        return [arrays]
    if arrays.ndim in stack_ndim:
        return list(arrays)
    raise DataError(f"{what}: Expect: a list of arrays or a stack of shape "
                    f"{' or '.join(STACK_SHAPES[what])}. Actual: shape {arrays.shape}.")


def check_mask(array, name: str) -> np.ndarray:
    """A label mask (H, W) of an integer dtype: bool -> uint8, 0/255 -> 0/1."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise DataError(f"{name}: Expect: a mask of shape (H, W). Actual: shape {array.shape}.")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise DataError(f"{name}: Expect: an integer or bool mask. Actual: dtype {array.dtype}.")
    if array.size and array.min() < 0:
        raise DataError(f"{name}: Expect: mask values >= 0. Actual: minimum {array.min()}.")
    values = np.unique(array)
    if len(values) and set(values.tolist()) <= {0, 255} and values.max() == 255:
        return (array == 255).astype(np.uint8)
    return array


class ArrayDataset:
    """Images and masks in memory; ``dataset[i]`` -> (image (C, H, W) float32, mask (H, W)).

    ``prepared=True`` takes lists of images and masks that a dataset already prepared
    (images (C, H, W) float32, normalised; masks checked), as the train/validation
    split passes its parts, and ``num_classes`` then keeps the class count of the whole.

    ``mask_kind``: how to read the masks, 'auto', 'binary', 'classes' or 'instances', by
    the rule of a folder's masks (``tinyunet.data.masks.interpret_masks``); afterwards
    the kind decided. Instance ids become 3-class targets and stay in ``instances``;
    ``notes`` and ``warnings`` say what was decided, as a ``FolderDataset``'s do.
    """

    def __init__(self, images, masks, weights=None, names=None, prepared: bool = False,
                 num_classes: int | None = None, mask_kind: str | None = "auto"):
        image_list = _as_list(images, "images", (3, 4))
        mask_list = _as_list(masks, "masks", (3,))
        if not image_list:
            raise DataError("images: Expect: at least one image. Actual: none.")
        if len(mask_list) != len(image_list):
            raise DataError(f"masks: Expect: one mask per image, {len(image_list)}. "
                            f"Actual: {len(mask_list)}.")
        self.names = ([f"array_{i}" for i in range(len(image_list))] if names is None
                      else [str(name) for name in names])
        if not prepared:
            image_list = [self._normal_image(image, name)
                          for image, name in zip(image_list, self.names, strict=True)]
            mask_list = [check_mask(mask, f"mask {name}")
                         for mask, name in zip(mask_list, self.names, strict=True)]
        self.mask_kind, self.instances = mask_kind, None
        self.notes: list[str] = []
        self.warnings: list[str] = []
        if not prepared and mask_kind is not None:
            decided = interpret_masks(mask_list, [f"mask {name}" for name in self.names],
                                      mask_kind)
            mask_list, self.mask_kind, self.instances = (decided.masks, decided.kind,
                                                         decided.instances)
            self.notes, self.warnings = decided.notes, decided.warnings
            num_classes = decided.num_classes if num_classes is None else num_classes
        self.images, self.masks = image_list, mask_list
        for image, mask, name in zip(self.images, self.masks, self.names, strict=True):
            if image.shape[1:] != mask.shape:
                raise DataError(f"mask {name}: Expect: the size of its image, "
                                f"{image.shape[1]}x{image.shape[2]}. "
                                f"Actual: {mask.shape[0]}x{mask.shape[1]}.")
        self.weights = None
        if weights is not None:
            weight_list = _as_list(weights, "weights", (3,))
            if len(weight_list) != len(self.masks):
                raise DataError(f"weights: Expect: one weight map per image, "
                                f"{len(self.masks)}. Actual: {len(weight_list)}.")
            self.weights = []
            for weight, mask, name in zip(weight_list, self.masks, self.names, strict=True):
                weight = np.asarray(weight, dtype=np.float32)
                if weight.shape != mask.shape or not np.isfinite(weight).all():
                    raise DataError(f"weights {name}: Expect: finite values of the mask's "
                                    f"shape {mask.shape}. Actual: shape {weight.shape}.")
                self.weights.append(weight)

        self.in_channels = max(image.shape[0] for image in self.images)
        self.images = [np.repeat(image, self.in_channels, axis=0)
                       if image.shape[0] == 1 < self.in_channels else image
                       for image in self.images]
        for image, name in zip(self.images, self.names, strict=True):
            if image.shape[0] != self.in_channels:
                raise DataError(f"{name}: Expect: {self.in_channels} channels like the other "
                                f"images (or 1). Actual: {image.shape[0]}.")
        if num_classes is None:
            labels = max(int(mask.max()) for mask in self.masks) + 1
            # Two classes are one sigmoid channel; more are a softmax over all of them.
            num_classes = 1 if labels <= 2 else labels
        self.num_classes = num_classes

    @staticmethod
    def _normal_image(image, name: str) -> np.ndarray:
        chw = image_to_chw(image, f"image {name}")
        if chw.dtype.kind not in "biuf":
            raise DataError(f"image {name}: Expect: numeric pixels. Actual: dtype {chw.dtype}.")
        chw = chw.astype(np.float32)
        if not np.isfinite(chw).all():
            raise DataError(f"image {name}: the image holds NaN or infinite values")
        return normalize_percentile(chw)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index]
