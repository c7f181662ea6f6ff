"""Masks as users have them: binary, class labels or instance ids, decided per folder.

Kinds (``interpret_masks``'s ``kind``):

- ``'binary'``: every file holds 0/1, 0/255 or bool; the target is 0/1.
- ``'classes'``: labels 0..K-1 over the folder, none missing (a gap such as {0, 5} or
  {0, 1, 3} would add classes no pixel has, so it is an error naming the file and the
  missing labels). A palette PNG is read as its indices. K = 2 trains one sigmoid
  channel; K > 2 a softmax over K channels.
- ``'instances'``: ids 0..N, 0 background, one id per object (the Cell Tracking
  Challenge's, cellpose's and StarDist's format). The ids are kept in ``instances``;
  the training target has 3 classes (``instances.instance_targets``): 0 background,
  1 cell, 2 the border where a cell touches another, so that a model learns to keep
  touching cells apart; classes 1 and 2 together are exactly the foreground ids > 0.
- ``'auto'`` decides once for the whole folder and says why in one note:

  1. every file holds 0/1, 0/255 or bool -> binary;
  2. a file holding 0/255 beside a file holding other labels (0..2, say) -> error
     naming one of each: the encodings are mixed;
  3. any palette PNG -> classes;
  4. otherwise the labels are instance ids when at least 80% of the (file, label) pairs
     are one 8-connected region (each object is one blob) and either some file holds
     more than 10 labels or the number of labels differs between files; else they are
     classes (class labels are few, the same set in each file, and usually spread over
     several regions), and gaps in them are an error that suggests 'instances'. More
     than 64 classes is an error: such a "mask" is almost always an image.

  An explicit kind skips the guess; every file must then fit it.

Every mask is held in the smallest unsigned dtype that fits (uint8, else uint16, else
uint32; instance ids in uint16 or uint32), never int64.

Shapes: every mask (H, W); ``read_mask`` accepts (H, W), or (H, W, C) / (C, H, W) with
equal channels, by the channel rule of ``tinyunet.data.images``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import DataError, read_array, to_chw
from .instances import instance_targets

MASK_KINDS = ("auto", "binary", "classes", "instances")
# More classes than this in a "label" mask almost certainly means a grey-level image
# was given as a mask.
MAX_CLASSES = 64
# auto: instance ids when this share of (file, label) pairs is one region each ...
SINGLE_REGION_SHARE = 0.8
# ... and some file holds more labels than this (or the counts differ between files).
FEW_LABELS = 10


@dataclass
class MaskSet:
    """The masks of a folder read as one kind, and what was decided on the way."""

    kind: str                          # 'binary', 'classes' or 'instances'
    masks: list[np.ndarray]            # training targets (H, W): 0/1 or 0..K-1
    num_classes: int                   # model outputs: 1 (sigmoid) or K > 2 (softmax)
    instances: list[np.ndarray] | None = None  # the ids (H, W), for kind 'instances'
    notes: list[str] = field(default_factory=list)     # decisions, one line each
    warnings: list[str] = field(default_factory=list)  # suspicious data, one line each


def smallest_unsigned(max_value: int, at_least=np.uint8) -> np.dtype:
    """The smallest of uint8, uint16, uint32 (no smaller than ``at_least``) holding it."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if np.dtype(dtype).itemsize >= np.dtype(at_least).itemsize and \
                max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"Expect: mask values below 2**32. Actual: {max_value}.")


def as_labels(labels: np.ndarray, name) -> np.ndarray:
    """A mask (H, W) of non-negative whole numbers (any numeric dtype) in the smallest
    unsigned dtype that holds it; a view when it already is. ``name`` is named in errors.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"{name}: Expect: a mask (H, W). Actual: shape {labels.shape}.")
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if labels.dtype.kind not in "iuf" or labels.size == 0:
        raise DataError(f"{name}: Expect: a numeric, non-empty mask. Actual: dtype "
                        f"{labels.dtype}, shape {labels.shape}.")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DataError(f"{name}: Expect: integer mask values. Actual: fractional values.")
    low, high = labels.min(), labels.max()
    if low < 0:
        raise DataError(f"{name}: Expect: mask values >= 0. Actual: minimum {low}.")
    try:
        dtype = smallest_unsigned(int(high))
    except DataError as error:
        raise DataError(f"{name}: {error}") from None
    return labels.astype(dtype, copy=False)


def read_mask(path: Path, page: int | None = None) -> np.ndarray:
    """The (H, W) labels of a mask file as stored, in the smallest unsigned dtype.

    Values must be non-negative integers (a float file must hold whole numbers); a
    several-channel mask must have equal channels. Nothing is interpreted here.
    """
    planes = to_chw(read_array(path, page), path)
    if planes.shape[0] > 1 and not (planes == planes[:1]).all():
        raise DataError(
            f"{path}: Expect: a one-channel mask (a colour mask must have equal channels). "
            f"Actual: {planes.shape[0]} channels that differ."
        )
    return as_labels(planes[0], path)


def _distinct(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an unsigned mask (a histogram for 8 and 16 bits)."""
    if labels.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(labels.ravel()))
    return np.unique(labels)


def _components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The root of each of ``count`` nodes joined by the edges (a[i], b[i]).

    Union-find on arrays: every round points each node at its root (pointer jumping),
    then hooks the larger root of every edge joining two trees onto the smaller one.
    Roots only ever point to smaller nodes, so no cycle can form.
    """
    parent = np.arange(count)
    while True:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            return parent
        a, b = a[apart], b[apart]
        np.minimum.at(parent, np.maximum(root_a[apart], root_b[apart]),
                      np.minimum(root_a[apart], root_b[apart]))


def regions_per_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, regions): each non-zero value of ``labels`` (H, W), sorted, and how many
    8-connected regions it forms.

    Works on runs (stretches of one value within a row): two runs of one value in
    neighbouring rows touch when their column spans overlap or meet at a corner.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    starts_mask = np.ones((h, w), dtype=bool)
    starts_mask[:, 1:] = labels[:, 1:] != labels[:, :-1]
    rows, starts = np.nonzero(starts_mask)
    ends = np.full(starts.shape, w - 1)
    same_row = rows[1:] == rows[:-1]
    ends[:-1][same_row] = starts[1:][same_row] - 1
    values = labels[rows, starts]
    keep = values != 0
    rows, starts, ends, values = rows[keep], starts[keep], ends[keep], values[keep]
    if values.size == 0:
        return values, np.zeros(0, dtype=np.int64)
    ids = _distinct(values)
    dense = np.searchsorted(ids, values)
    order = np.lexsort((starts, rows, dense))
    rows, starts, ends, dense = rows[order], starts[order], ends[order], dense[order]

    def key(value, row, column):
        # One sortable int64 per (value, row, column); column + 1 keeps column -1 >= 0.
        return (value.astype(np.int64) * (h + 1) + row) * (w + 2) + (column + 1)

    # Runs of one (value, row) are disjoint and sorted, so both keys are sorted, and the
    # runs of the next row touching run i are the contiguous range lo[i]:hi[i].
    lo = np.searchsorted(key(dense, rows, ends), key(dense, rows + 1, starts - 1), "left")
    hi = np.searchsorted(key(dense, rows, starts), key(dense, rows + 1, ends + 1), "right")
    touching = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(dense)), touching)
    offsets = np.arange(touching.sum()) - np.repeat(np.cumsum(touching) - touching, touching)
    b = np.repeat(lo, touching) + offsets
    parent = _components(len(dense), a, b)
    roots = np.flatnonzero(parent == np.arange(len(dense)))
    return ids, np.bincount(dense[roots], minlength=len(ids))


def touching_pairs(labels: np.ndarray) -> int:
    """How many pairs of distinct non-zero labels of ``labels`` (H, W) touch (4-neighbours)."""
    pairs = []
    for x, y in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        both = (x != y) & (x != 0) & (y != 0)
        small = np.minimum(x[both], y[both]).astype(np.uint64)
        large = np.maximum(x[both], y[both]).astype(np.uint64)
        pairs.append((small << np.uint64(32)) | large)
    return len(np.unique(np.concatenate(pairs)))


def _show(values: np.ndarray, limit: int = 8) -> str:
    """values such as {0, 1, 3} or {0, 1, 2, ... 312} (313 distinct)."""
    shown = values.tolist()
    if len(shown) <= limit:
        return "{" + ", ".join(map(str, shown)) + "}"
    head = ", ".join(map(str, shown[: limit - 1]))
    return "{" + f"{head}, ... {shown[-1]}" + "} " + f"({len(shown)} distinct)"


def _is_binary(values: np.ndarray) -> bool:
    return set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}


def _as_binary(paths, labels, values, asked: bool) -> MaskSet:
    for path, vals in zip(paths, values, strict=True):
        if not _is_binary(vals):
            how = " (masks='binary')" if asked else ""
            raise DataError(
                f"{path}: Expect: a binary mask{how}: 0/1, 0/255 or bool. "
                f"Actual: values {_show(vals)}."
            )
    counts = {"0/255": 0, "0/1": 0, "empty": 0}
    for vals in values:
        counts["0/255" if 255 in vals else "0/1" if 1 in vals else "empty"] += 1
    found = ", ".join(f"{kind} in {n} file{'s' * (n != 1)}" for kind, n in counts.items() if n)
    masks = [np.not_equal(mask, 0).view(np.uint8) for mask in labels]
    return MaskSet("binary", masks, 1, notes=[f"masks: binary ({found})"])


def _as_classes(paths, labels, values, reason: str) -> MaskSet:
    used = np.unique(np.concatenate(values))
    count = int(used[-1]) + 1
    missing = np.setdiff1d(np.arange(count), used)
    if missing.size:
        gap = int(missing[0])
        path, vals = next((p, v) for p, v in zip(paths, values, strict=True) if v[-1] > gap)
        hint = " (255 is often an 'ignore' label, as in Pascal VOC)" if 255 in used else ""
        raise DataError(
            f"{path}: Expect: class labels 0..K-1 with none missing over all masks; if the "
            f"labels are object ids, read them as instances (masks='instances'). Actual: "
            f"labels {_show(vals)} here, and no mask holds {_show(missing)}{hint}."
        )
    dtype = smallest_unsigned(count - 1)
    masks = [mask.astype(dtype, copy=False) for mask in labels]
    num_classes = count if count > 2 else 1
    note = f"masks: classes 0..{count - 1} ({count} classes in {len(paths)} files; {reason})"
    return MaskSet("classes", masks, num_classes, notes=[note])


def _as_instances(labels, values, reason: str) -> MaskSet:
    largest = max(int(vals[-1]) for vals in values)
    dtype = smallest_unsigned(largest, at_least=np.uint16)
    ids = [mask.astype(dtype, copy=False) for mask in labels]
    masks = [instance_targets(mask) for mask in labels]
    touching = sum(touching_pairs(mask) for mask in labels)
    note = (f"masks: instances (ids up to {largest} in {len(labels)} files; {touching} "
            f"pairs of touching objects have distinct ids; {reason})")
    return MaskSet("instances", masks, 3, instances=ids, notes=[note])


def _check_not_mixed(paths, values) -> None:
    """A 0/255 file beside a file of other labels is two encodings: refuse."""
    white = next((i for i, v in enumerate(values) if 255 in v and _is_binary(v)), None)
    other = next((i for i, v in enumerate(values) if not set(v.tolist()) <= {0, 1, 255}), None)
    if white is not None and other is not None:
        raise DataError(
            f"{paths[other]}: Expect: one mask encoding in a folder (say which with the "
            f"masks option: binary, classes or instances). Actual: labels "
            f"{_show(values[other])} here, but 0/255 in {paths[white]}."
        )


def _guess(paths, labels, values, palette) -> MaskSet:
    """The 'auto' rule of the module docstring."""
    if all(_is_binary(v) for v in values):
        return _as_binary(paths, labels, values, asked=False)
    _check_not_mixed(paths, values)
    override = "the masks option overrides this"
    if any(palette):
        return _as_classes(paths, labels, values,
                           f"palette PNG indices in {sum(palette)} files; {override}")
    singles = total = 0
    counts = []
    for mask in labels:
        _, regions = regions_per_label(mask)
        singles += int((regions == 1).sum())
        total += len(regions)
        if len(regions):
            counts.append(len(regions))
    share = singles / max(total, 1)
    many, varied = max(counts) > FEW_LABELS, len(set(counts)) > 1
    if share >= SINGLE_REGION_SHARE and (many or varied):
        why = f"more than {FEW_LABELS} in a file" if many else "a different number per file"
        return _as_instances(labels, values,
                             f"{share:.0%} of ids are one connected region each, {why}; "
                             f"{override}")
    if max(int(v[-1]) for v in values) + 1 > MAX_CLASSES:
        index = max(range(len(values)), key=lambda i: int(values[i][-1]))
        raise DataError(
            f"{paths[index]}: Expect: a binary mask (0/1, 0/255), class labels below "
            f"{MAX_CLASSES} or instance ids (each id one connected region). Actual: values "
            f"{_show(values[index])}, only {share:.0%} of them one region each: an image?"
        )
    if share >= SINGLE_REGION_SHARE:
        why = (f"each file holds the same {counts[0]} labels, at most {FEW_LABELS}, where "
               "instance ids are usually more and differ in number per file")
    else:
        why = (f"only {share:.0%} of the labels form one region in a file, where each "
               "instance id is one object")
    return _as_classes(paths, labels, values, f"{why}; {override}")


def interpret_masks(labels: Sequence[np.ndarray], paths: Sequence[Path | str], kind: str = "auto",
                    palette: Sequence[bool] | None = None) -> MaskSet:
    """Read the ``labels`` (H, W) of a folder's masks (``read_mask``'s arrays, or any
    arrays of non-negative whole numbers) as ``kind``.

    ``paths`` name the files (or arrays) in errors and notes; ``palette`` says which
    were palette PNGs (for 'auto'). See the module docstring for the kinds and the rule.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"masks: Expect: one of {MASK_KINDS}. Actual: '{kind}'.")
    paths = [Path(p) for p in paths]
    labels = [as_labels(mask, path) for mask, path in zip(labels, paths, strict=True)]
    values = [_distinct(mask) for mask in labels]
    palette = [False] * len(labels) if palette is None else list(palette)
    if kind == "auto":
        result = _guess(paths, labels, values, palette)
    elif kind == "binary":
        result = _as_binary(paths, labels, values, asked=True)
    elif kind == "classes":
        result = _as_classes(paths, labels, values, "as the masks option asks")
    else:
        result = _as_instances(labels, values, "as the masks option asks")
    if all(int(vals[-1]) == 0 for vals in values):
        result.warnings.append(
            f"warning: every mask is empty (no foreground pixel in {len(labels)} files); "
            "the model can only learn background. Check the masks."
        )
    return result
