"""Object-level scores of instance segmentations: matching by IoU, precision, recall, AP.

Shapes: ``pred_ids`` and ``true_ids`` are instance label images (H, W) of the same
shape, 0 background and one positive id per object (any integer dtype; ids need not be
consecutive).

A predicted and a true object match at threshold t when their IoU (pixels in both /
pixels in either) is above t, strictly. Per threshold:

- tp: matched pairs; fp: predicted objects left unmatched; fn: true objects left
  unmatched;
- precision tp / (tp + fp), recall tp / (tp + fn), F1 2 tp / (2 tp + fp + fn);
- AP = tp / (tp + fp + fn), the "average precision" of the 2018 Data Science Bowl as
  StarDist reports it.

An image with no object in either label image scores 1 on every ratio (nothing to
find, nothing found); where one of them has objects and the other none, every ratio
is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import fail

# IoU thresholds 0.5, 0.55, ..., 0.95, rounded to two decimals so that an IoU of
# exactly 0.75 meets a threshold of exactly 0.75 (and so does not match).
IOU_THRESHOLDS = np.round(0.5 + 0.05 * np.arange(10), 2)

_COUNTS = ("tp", "fp", "fn")


@dataclass(frozen=True)
class ObjectOverlaps:
    """The overlapping (predicted, true) object pairs of two instance label images.

    ``pred_labels`` (P,) and ``true_labels`` (T,): the ids present, ascending.
    ``pred_index``, ``true_index`` and ``iou`` (M,): for each pair that shares at least
    one pixel, its objects' positions in those lists and their IoU. Pairs not listed
    have IoU 0; ``dense()`` gives the whole (P, T) matrix.
    """

    pred_labels: np.ndarray
    true_labels: np.ndarray
    pred_index: np.ndarray
    true_index: np.ndarray
    iou: np.ndarray

    def dense(self) -> np.ndarray:
        """The IoU matrix (P, T) float64, rows in ``pred_labels``' order, columns in
        ``true_labels``'."""
        matrix = np.zeros((self.pred_labels.size, self.true_labels.size))
        matrix[self.pred_index, self.true_index] = self.iou
        return matrix


def _check_pair(op: str, pred_ids: np.ndarray, true_ids: np.ndarray):
    pred_ids, true_ids = np.asarray(pred_ids), np.asarray(true_ids)
    if pred_ids.shape != true_ids.shape or pred_ids.ndim != 2:
        fail(op, "predicted and true instance ids of one shape (H, W)",
             f"{pred_ids.shape} and {true_ids.shape}")
    for name, ids in (("predicted", pred_ids), ("true", true_ids)):
        if ids.dtype != bool and not np.issubdtype(ids.dtype, np.integer):
            fail(op, f"integer {name} instance ids", f"dtype {ids.dtype}")
        if ids.size and ids.min() < 0:
            fail(op, f"{name} instance ids >= 0", f"minimum {ids.min()}")
    return pred_ids.astype(np.int64).ravel(), true_ids.astype(np.int64).ravel()


def match_objects(pred_ids: np.ndarray, true_ids: np.ndarray) -> ObjectOverlaps:
    """IoU of every overlapping pair of predicted and true objects (H, W each).

    One pass over the pixels: each pixel's (predicted id, true id) pair becomes one
    code, and counting the distinct codes gives every intersection; the areas are those
    counts summed per id (background pixels included).
    """
    pred, true = _check_pair("match_objects", pred_ids, true_ids)
    base = int(true.max(initial=0)) + 1
    codes, counts = np.unique(pred * base + true, return_counts=True)
    pair_pred, pair_true = np.divmod(codes, base)
    pred_labels, pred_of_pair = np.unique(pair_pred, return_inverse=True)
    true_labels, true_of_pair = np.unique(pair_true, return_inverse=True)
    pred_area = np.bincount(pred_of_pair, weights=counts, minlength=pred_labels.size)
    true_area = np.bincount(true_of_pair, weights=counts, minlength=true_labels.size)
    # Drop the background (id 0) from both lists; it sorts first where present.
    pred_skip = int(pred_labels.size > 0 and pred_labels[0] == 0)
    true_skip = int(true_labels.size > 0 and true_labels[0] == 0)
    both = (pair_pred > 0) & (pair_true > 0)
    pi, ti, inter = pred_of_pair[both], true_of_pair[both], counts[both]
    iou = inter / (pred_area[pi] + true_area[ti] - inter)
    return ObjectOverlaps(pred_labels[pred_skip:], true_labels[true_skip:],
                          pi - pred_skip, ti - true_skip, iou)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, nothing: np.ndarray) -> np.ndarray:
    """numerator / denominator, 1 where the image holds no object at all (``nothing``)
    and 0 where only the denominator is 0 otherwise."""
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, np.where(nothing, 1.0, 0.0))


def _scores(thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict:
    nothing = (tp + fp + fn) == 0
    ap = _ratio(tp, tp + fp + fn, nothing)
    return {
        "thresholds": thresholds, "tp": tp, "fp": fp, "fn": fn,
        "precision": _ratio(tp, tp + fp, nothing),
        "recall": _ratio(tp, tp + fn, nothing),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, nothing),
        "ap": ap,
        "mean_ap": float(ap.mean()),
    }


def _check_thresholds(op: str, thresholds) -> np.ndarray:
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if (thresholds.ndim != 1 or not thresholds.size
            or not np.all((thresholds >= 0.5) & (thresholds < 1.0))):
        fail(op, "IoU thresholds in [0.5, 1)", f"{thresholds.tolist()}")
    return thresholds


def object_scores(pred_ids: np.ndarray, true_ids: np.ndarray,
                  thresholds=IOU_THRESHOLDS) -> dict:
    """Object-level scores of one predicted instance image against the truth (H, W each).

    Returns a dict of arrays aligned with ``thresholds`` (default 0.5:0.05:0.95): "tp",
    "fp", "fn" (int64 counts), "precision", "recall", "f1" and "ap" (float64, AP =
    tp / (tp + fp + fn), the 2018 Data Science Bowl's and StarDist's definition), plus
    "thresholds" and "mean_ap", AP's mean over the thresholds. Matches need IoU >
    threshold (strictly). Empty images: see the module docstring.
    """
    thresholds = _check_thresholds("object_scores", thresholds)
    overlaps = match_objects(pred_ids, true_ids)
    # Above IoU 0.5 a pairing is unique: IoU(p, t) > 0.5 means |p & t| > |p | t| / 2,
    # so more than half of p lies in t and more than half of t in p; true objects are
    # disjoint, so no other true object can hold more than half of p, and likewise for
    # t. Every pair above the threshold is therefore a match and no assignment problem
    # arises, which is why thresholds below 0.5 are refused.
    tp = (overlaps.iou[None, :] > thresholds[:, None]).sum(axis=1).astype(np.int64)
    fp = overlaps.pred_labels.size - tp
    fn = overlaps.true_labels.size - tp
    return _scores(thresholds, tp, fp, fn)


def summarize_object_scores(per_image: list[dict]) -> dict:
    """Scores over a set of images from their ``object_scores``: tp, fp and fn summed
    over the images, then the ratios of those sums (so an image with many objects
    counts for more), in the same dict layout, "mean_ap" included.

    An empty list counts as one image with no objects: every ratio 1.
    """
    if not per_image:
        return _scores(IOU_THRESHOLDS, *(np.zeros(IOU_THRESHOLDS.size, np.int64),) * 3)
    thresholds = np.asarray(per_image[0]["thresholds"])
    for scores in per_image[1:]:
        if not np.array_equal(scores["thresholds"], thresholds):
            fail("summarize_object_scores", f"every image scored at {thresholds.tolist()}",
                 f"one at {np.asarray(scores['thresholds']).tolist()}")
    totals = [np.sum([scores[name] for scores in per_image], axis=0).astype(np.int64)
              for name in _COUNTS]
    return _scores(thresholds, *totals)
