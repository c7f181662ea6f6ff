"""Folder datasets: ``images/`` and ``masks/`` with matching file stems.

    data/
      images/  cell01.png  cell02.tif  cell03.npy  ...
      masks/   cell01.png  cell02.tif  cell03.npy  ...

Files may be PNG, TIFF or NPY, read exactly as stored (``tinyunet.data.images``: every
dtype kept, the channel rule for (H, W), (H, W, C) and (C, H, W), multi-page files
refused unless ``page`` picks one). An image and its mask share a stem; their
extensions may differ.

Images are normalised per image by percentiles: (x - p1) / (p99.8 - p1), per channel,
so that the bulk of the intensities fall in [0, 1] whatever the bit depth. Every image
of a folder must have the same number of channels (after ``channels`` picks some),
except that grey images are repeated to 3 channels beside RGB ones (said in ``notes``).

Masks are read as ``masks`` says: 'binary', 'classes', 'instances', or 'auto', which
decides once for the whole folder (``tinyunet.data.masks`` gives the rule) and says so
in ``notes``. An all-empty mask set is a warning in ``warnings``, not an error.

Every problem with a file (no partner, differing sizes, unreadable, odd mask values)
raises ``DataError`` naming the file.

Shapes: ``image`` (C, H, W) float32, ``mask`` (H, W) uint8 (uint16 or uint32 only for
more than 255 classes); instance ids (H, W) uint16 or uint32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .images import EXTENSIONS, DataError, is_palette, read_image
from .masks import interpret_masks, read_mask


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

    ``masks``: 'auto', 'binary', 'classes' or 'instances' (see ``tinyunet.data.masks``).
    ``channels``: None keeps every channel of the images; a sequence of indices keeps
    those (``parse_channels`` reads the CLI's text). ``page`` picks one page of
    multi-page files, images and masks alike.

    Attributes: ``names``, ``images``, ``masks`` (training targets), ``mask_kind``,
    ``num_classes`` (1 for binary, K for K > 2 classes, 3 for instances: background,
    cell, border), ``instances`` (the ids, for 'instances'; else None), ``in_channels``,
    ``notes`` (what was decided, one line each, for the caller to print), ``warnings``.

    Everything is read and checked up front, so a bad file fails before training starts.
    """

    def __init__(self, root, masks: str = "auto", channels: Sequence[int] | None = None,
                 page: int | None = None):
        root = Path(root)
        images_dir, masks_dir = root / "images", root / "masks"
        for folder in (root, images_dir, masks_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: not a folder. A dataset folder holds images/ and masks/ "
                    "with matching file stems"
                )
        image_files, mask_files = _index_folder(images_dir), _index_folder(masks_dir)
        if not image_files:
            raise DataError(f"{images_dir}: no images ({', '.join(EXTENSIONS)}) found")
        for stem, path in image_files.items():
            if stem not in mask_files:
                raise DataError(f"{path}: no mask with the stem '{stem}' in {masks_dir}")
        for stem, path in mask_files.items():
            if stem not in image_files:
                raise DataError(f"{path}: no image with the stem '{stem}' in {images_dir}")

        self.root = root
        self.names = sorted(image_files)
        self.images, labels = [], []
        for stem in self.names:
            image = read_image(image_files[stem], channels, page)
            mask = read_mask(mask_files[stem], page)
            if image.shape[1:] != mask.shape:
                raise DataError(
                    f"{mask_files[stem]}: Expect: the size of {image_files[stem].name}, "
                    f"{image.shape[1]}x{image.shape[2]}. Actual: {mask.shape[0]}x{mask.shape[1]}."
                )
            self.images.append(image)
            labels.append(mask)

        self.notes: list[str] = []
        self._match_channels([image_files[stem] for stem in self.names])
        mask_paths = [mask_files[stem] for stem in self.names]
        decided = interpret_masks(labels, mask_paths, masks,
                                  palette=[is_palette(path) for path in mask_paths])
        self.mask_kind = decided.kind
        self.masks = decided.masks
        self.instances = decided.instances
        self.num_classes = decided.num_classes
        self.notes += decided.notes
        self.warnings = decided.warnings

    def _match_channels(self, paths: list[Path]) -> None:
        """One channel count for all images: grey is repeated beside RGB, else an error."""
        first_of: dict[int, Path] = {}
        for path, image in zip(paths, self.images, strict=True):
            first_of.setdefault(image.shape[0], path)
        if set(first_of) == {1, 3}:
            self.images = [np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
                           for image in self.images]
            self.notes.append(f"images: grey images (such as {first_of[1].name}) repeated to "
                              f"3 channels to match the RGB ones (such as {first_of[3].name})")
        elif len(first_of) > 1:
            (few, few_path), (more, more_path) = sorted(first_of.items())[:2]
            raise DataError(
                f"{more_path}: Expect: {few} channel(s), like {few_path.name} (every image of "
                f"a folder needs the same channels; pick some with --channels). "
                f"Actual: {more} channels."
            )
        self.in_channels = self.images[0].shape[0]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index]

