"""Instance masks: training targets that keep touching cells apart, and instances back out.

Shapes: every array is one 2-D image (H, W).

- ``ids``: instance labels, 0 background and 1..N one id per cell (the format of the
  Cell Tracking Challenge, cellpose and StarDist); any integer dtype.
- ``instance_targets(ids)``: a 3-class target, uint8: 0 background, 1 cell interior,
  2 the separation border where two cells touch.
- ``weight_map(ids)``: the per-pixel loss weights of Ronneberger et al. (2015), eq. 2,
  float32.
- ``instances_from_labels(labels)`` / ``instances_from_foreground(fg)``: a model's 3-class
  or binary prediction back to instance ids, uint16 (uint32 beyond 65535 objects).
- ``distance_to``, ``two_nearest_distances`` and ``label_components``: the exact
  Euclidean distance transform and connected components these are built on.

Connectivity, in one place: objects are 8-connected (a pixel touching an object at a
corner belongs to it); the border class marks cell pixels with a pixel of another cell
among their 8 neighbours; seeds (connected pieces of the interior class) are
4-connected, see ``instances_from_labels``.

Numba, when installed, runs the per-pixel loops (kernels/cpu/instances.py);
without it the same algorithms run as whole-array numpy operations, slower but with
identical results.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import fail

try:
    from ..kernels.cpu import instances as _kernels
except ImportError:  # numba is optional
    _kernels = None

# weight_map ignores a cell farther than this from a pixel when the term it would add
# to that pixel's weight is below this (see weight_map_cutoff).
WEIGHT_TOLERANCE = 1e-3

# The 8 neighbour offsets (row, column).
_NEIGHBOURS_8 = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def _check_image(op: str, array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        fail(op, f"{what} of shape (H, W)", f"shape {array.shape}")
    return array


def _check_ids(op: str, ids: np.ndarray) -> np.ndarray:
    ids = _check_image(op, ids, "instance ids")
    if ids.dtype != bool and not np.issubdtype(ids.dtype, np.integer):
        fail(op, "integer instance ids (0 background, 1..N cells)", f"dtype {ids.dtype}")
    if ids.size and np.issubdtype(ids.dtype, np.signedinteger) and ids.min() < 0:
        fail(op, "instance ids >= 0", f"minimum {ids.min()}")
    # The smallest signed type that holds every id: 4 bytes a pixel, not 8, on large images.
    wide = ids.size and ids.max() > np.iinfo(np.int32).max
    return ids.astype(np.int64 if wide else np.int32)


# ----------------------------------------------------------------------------------
# Exact Euclidean distance transform (Felzenszwalb & Huttenlocher, 2012)


def _envelope_lines_numpy(f: np.ndarray) -> np.ndarray:
    """The numpy twin of the numba lower_envelope_lines: the same lower envelope,
    built for all lines at once; each step below is the kernel's step on every line
    that takes it."""
    lines, n = f.shape
    every = np.arange(lines)
    roots = np.zeros((lines, n), np.int64)
    starts = np.full((lines, n + 1), np.inf)
    top = np.full(lines, -1)
    for q in range(n):
        fq = f[:, q]
        finite = np.isfinite(fq)
        first = finite & (top < 0)
        roots[first, 0] = q
        starts[first, 0] = -np.inf
        rest = every[finite & ~first]
        top[first] = 0
        while rest.size:
            k = top[rest]
            v = roots[rest, k]
            s = ((fq[rest] + q * q) - (f[rest, v] + v * v)) / (2.0 * (q - v))
            covered = s <= starts[rest, k]
            if not covered.any():
                top[rest] = k + 1
                roots[rest, k + 1] = q
                starts[rest, k + 1] = s
                starts[rest, k + 2] = np.inf
                break
            # Lines whose top parabola is covered pop it and try again; the others
            # push q now.
            done = rest[~covered]
            kd = k[~covered] + 1
            top[done] = kd
            roots[done, kd] = q
            starts[done, kd] = s[~covered]
            starts[done, kd + 1] = np.inf
            rest = rest[covered]
            top[rest] -= 1
    out = np.empty_like(f)
    k = np.zeros(lines, np.int64)
    for p in range(n):
        while True:
            ahead = starts[every, k + 1] < p
            if not ahead.any():
                break
            k[ahead] += 1
        v = roots[every, k]
        out[:, p] = (p - v) ** 2 + f[every, v]  # lines with no sample: f[., 0] is inf
    return out


def _envelope_lines(f: np.ndarray) -> np.ndarray:
    """min over q of (p - q)^2 + f[l, q] for every line l of f (L, n) float64."""
    f = np.ascontiguousarray(f, dtype=np.float64)
    if _kernels is None:
        return _envelope_lines_numpy(f)
    out = np.empty_like(f)
    _kernels.lower_envelope_lines(f, out)
    return out


def _squared_distance_to(mask: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance (float64, exact) of each pixel to the nearest True one.

    Separable: first along each column, then the column results along each row.
    """
    f = np.where(mask, 0.0, np.inf)
    columns = _envelope_lines(f.T).T
    return _envelope_lines(columns)


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance (H, W) float32 of every pixel to the nearest True pixel.

    ``mask``: (H, W), nonzero = True. True pixels get 0. A mask with no True pixel gives
    +inf everywhere. The algorithm is the separable lower envelope of parabolas of
    Felzenszwalb and Huttenlocher (2012): linear in the pixel count.
    """
    mask = _check_image("distance_to", mask, "a mask")
    return np.sqrt(_squared_distance_to(mask.astype(bool))).astype(np.float32)


# ----------------------------------------------------------------------------------
# Distances to the nearest and second-nearest cell, and the paper's weight map


def _object_boxes(ids: np.ndarray):
    """(labels, row0, row1, col0, col1) of every id > 0, bounds inclusive."""
    flat = ids.ravel()
    where = np.flatnonzero(flat)
    labels = flat[where]
    order = np.argsort(labels, kind="stable")
    labels, where = labels[order], where[order]
    if not labels.size:
        return (np.zeros(0, np.int64),) * 5
    firsts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    rows, cols = np.divmod(where, ids.shape[1])
    return (labels[firsts], np.minimum.reduceat(rows, firsts), np.maximum.reduceat(rows, firsts),
            np.minimum.reduceat(cols, firsts), np.maximum.reduceat(cols, firsts))


def two_nearest_distances(ids: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances (d1, d2), each (H, W) float32, to the nearest and second-nearest cell.

    ``ids``: (H, W) instance ids, 0 background. A pixel's distance to a cell is the
    Euclidean distance to the cell's nearest pixel, so a pixel inside a cell has d1 = 0
    (its own cell) and d2 = the distance to the nearest other cell. Cells farther than
    ``max_distance`` from a pixel are ignored there: d1 or d2 is +inf where fewer than
    one or two cells lie within ``max_distance``. This cut-off is what keeps the cost
    linear: each cell's distances are computed only in its bounding box grown by
    ``max_distance`` (every pixel outside lies farther away).
    """
    ids = _check_ids("two_nearest_distances", ids)
    if not max_distance >= 0:
        fail("two_nearest_distances", "max_distance >= 0", f"{max_distance}")
    h, w = ids.shape
    # Squared distances: integers, exact in float32 up to 2**24 (distances up to 4096).
    nearest = np.full((h, w), np.inf, np.float32)
    second = np.full((h, w), np.inf, np.float32)
    reach = math.floor(min(max_distance, h + w))
    limit = float(max_distance) ** 2
    for label, r0, r1, c0, c1 in zip(*_object_boxes(ids), strict=True):
        window = (slice(max(r0 - reach, 0), min(r1 + reach + 1, h)),
                  slice(max(c0 - reach, 0), min(c1 + reach + 1, w)))
        squared = _squared_distance_to(ids[window] == label)
        squared[squared > limit] = np.inf
        squared = squared.astype(np.float32)
        n, s = nearest[window], second[window]
        second[window] = np.minimum(s, np.maximum(n, squared))
        nearest[window] = np.minimum(n, squared)
    return np.sqrt(nearest), np.sqrt(second)


def weight_map_cutoff(w0: float, sigma: float) -> float:
    """The distance beyond which ``weight_map`` ignores a cell: sigma * sqrt(2 ln(w0 /
    WEIGHT_TOLERANCE)). A pixel whose second-nearest cell lies farther than this gets
    w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) < WEIGHT_TOLERANCE, so the term is dropped."""
    if w0 <= WEIGHT_TOLERANCE:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / WEIGHT_TOLERANCE))


def _touching_other_cell(ids: np.ndarray) -> np.ndarray:
    """Cell pixels (ids > 0) with a pixel of another cell among their 8 neighbours."""
    h, w = ids.shape
    padded = np.pad(ids, 1)
    touching = np.zeros((h, w), bool)
    for dr, dc in _NEIGHBOURS_8:
        neighbour = padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        touching |= (neighbour > 0) & (neighbour != ids)
    return touching & (ids > 0)


def weight_map(ids: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
               class_balance: bool = True, max_distance: float | None = None) -> np.ndarray:
    """Per-pixel loss weights (H, W) float32 of Ronneberger et al. (2015), eq. 2:

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

    ``ids``: (H, W) instance ids, 0 background; d1, d2: distances to the nearest and
    second-nearest cell (``two_nearest_distances``).

    - w_c balances background (ids == 0) against foreground (ids > 0): a pixel of a class
      with frequency p gets 1 / (n p), n the number of the two classes present, so both
      classes weigh the same in all and w_c averages exactly 1 over the image. With
      ``class_balance=False``, or when one class fills the image, w_c = 1.
    - The exp term weights the background between cells, as in the paper, and the
      separation-border pixels of ``instance_targets`` (cell pixels touching another
      cell): this target separates touching cells by a border class instead of a
      background gap, and those pixels need the weight the paper gives the gap. There
      d1 = 0 and d2 is 1 or sqrt(2), so they get nearly w0. Inside a cell the paper's
      formula would give w0 * exp(-d2^2 / (2 sigma^2)), heavy over every cell near
      another; those pixels get w_c only.
    - ``max_distance``: cells farther from a pixel are ignored there; by default
      ``weight_map_cutoff(w0, sigma)`` (21.5 px for the defaults), where the term left
      out is below WEIGHT_TOLERANCE.
    """
    ids = _check_ids("weight_map", ids)
    if not sigma > 0 or not w0 >= 0:
        fail("weight_map", "sigma > 0 and w0 >= 0", f"sigma {sigma}, w0 {w0}")
    foreground = ids > 0
    weights = np.ones(ids.shape, np.float32)
    if class_balance:
        cells = np.count_nonzero(foreground)
        if 0 < cells < ids.size:
            weights[foreground] = ids.size / (2.0 * cells)
            weights[~foreground] = ids.size / (2.0 * (ids.size - cells))
    if max_distance is None:
        max_distance = weight_map_cutoff(w0, sigma)
    if w0 > 0:
        where = ~foreground | _touching_other_cell(ids)
        d1, d2 = two_nearest_distances(ids, max_distance)
        total = d1[where].astype(np.float64) + d2[where]
        weights[where] += w0 * np.exp(-total**2 / (2.0 * sigma**2))
    return weights


def instance_targets(ids: np.ndarray) -> np.ndarray:
    """A 3-class target (H, W) uint8 from instance ids (H, W): 0 background, 1 cell
    interior, 2 separation border.

    A border pixel is a cell pixel with a pixel of another cell among its 8 neighbours,
    so where two cells touch, both sides of the contact become border; a cell's edge
    against the background stays interior. Classes 1 and 2 together are exactly
    ids > 0. 8-neighbours (not 4) keep the interiors of different cells from touching
    even at a corner, so no seed of ``instances_from_labels`` spans two cells.
    """
    ids = _check_ids("instance_targets", ids)
    labels = (ids > 0).astype(np.uint8)
    labels[_touching_other_cell(ids)] = 2
    return labels


# ----------------------------------------------------------------------------------
# Connected components and instances from a prediction


def _label_components_numpy(mask: np.ndarray, diagonal: bool) -> tuple[np.ndarray, int]:
    """The numpy twin of the numba label_pixels: union-find over the horizontal runs
    of each row instead of over pixels, runs joined where their pixels touch."""
    h, w = mask.shape
    left = np.zeros((h, w), bool)
    left[:, 1:] = mask[:, :-1]
    run_starts = mask & ~left
    runs = int(np.count_nonzero(run_starts))
    run_of = (np.cumsum(run_starts.ravel()) - 1).reshape(h, w)  # meaningful where mask
    pairs = [(mask[:-1] & mask[1:], run_of[:-1], run_of[1:])]
    if diagonal:
        pairs.append((mask[:-1, :-1] & mask[1:, 1:], run_of[:-1, :-1], run_of[1:, 1:]))
        pairs.append((mask[:-1, 1:] & mask[1:, :-1], run_of[:-1, 1:], run_of[1:, :-1]))
    codes = np.concatenate([a[both] * runs + b[both] for both, a, b in pairs])
    codes = np.unique(codes)
    parent = list(range(runs))

    def find(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in zip((codes // max(runs, 1)).tolist(), (codes % max(runs, 1)).tolist(),
                    strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(p) for p in range(runs)], np.int64)
    # The smaller run is always the root, so a component's root is its first run and
    # the roots, in increasing order, number the components in raster order.
    unique_roots, number = np.unique(roots, return_inverse=True)
    out = np.zeros((h, w), np.int32)
    out[mask] = number.reshape(-1)[run_of[mask]] + 1
    return out, int(unique_roots.size)


def label_components(mask: np.ndarray, connectivity: int = 1) -> tuple[np.ndarray, int]:
    """Connected components of ``mask`` (H, W): (ids (H, W) int32, count).

    ``connectivity`` 1: pixels sharing an edge connect (4-neighbours); 2: also those
    sharing a corner (8-neighbours). Components are numbered 1..count in raster order of
    their first pixel; background is 0.
    """
    mask = _check_image("label_components", mask, "a mask").astype(bool)
    if connectivity not in (1, 2):
        fail("label_components", "connectivity 1 (4-neighbours) or 2 (8-neighbours)",
             f"{connectivity}")
    if _kernels is None:
        return _label_components_numpy(mask, connectivity == 2)
    out = np.empty(mask.shape, np.int32)
    count = _kernels.label_pixels(np.ascontiguousarray(mask, dtype=np.uint8),
                                  connectivity == 2, out)
    return out, int(count)


def _flood_numpy(labels: np.ndarray, foreground: np.ndarray) -> None:
    """The numpy twin of the numba flood_from_seeds: each step labels the unlabelled
    foreground pixels next to a labelled one with the smallest such neighbour's label."""
    h, w = labels.shape
    unset = np.iinfo(np.int64).max
    while True:
        padded = np.pad(np.where(labels > 0, labels, unset), 1, constant_values=unset)
        nearest = np.full((h, w), unset)
        for dr, dc in _NEIGHBOURS_8:
            np.minimum(nearest, padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w], out=nearest)
        reached = foreground & (labels == 0) & (nearest != unset)
        if not reached.any():
            return
        labels[reached] = nearest[reached]


def _numbered(ids: np.ndarray, min_size: int) -> np.ndarray:
    """``ids`` without objects under ``min_size`` pixels, renumbered 1..N in raster order
    of first pixel; uint16, or uint32 beyond 65535 objects."""
    flat = ids.ravel()
    present, first, inverse, sizes = np.unique(flat, return_index=True, return_inverse=True,
                                               return_counts=True)
    keep = (present > 0) & (sizes >= min_size)
    rank = np.zeros(present.size, np.int64)
    order = np.argsort(np.where(keep, first, flat.size), kind="stable")
    rank[order[:np.count_nonzero(keep)]] = np.arange(1, np.count_nonzero(keep) + 1)
    count = int(np.count_nonzero(keep))
    dtype = np.uint16 if count < 2**16 else np.uint32
    return rank[inverse.reshape(-1)].reshape(ids.shape).astype(dtype)


def _check_min_size(op: str, min_size: int) -> None:
    if min_size < 0:
        fail(op, "min_size >= 0 pixels", f"{min_size}")


def instances_from_labels(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Instance ids (H, W) from a 3-class label map (H, W): 0 background, 1 cell
    interior, 2 separation border (``instance_targets``' classes).

    Seeds are the 4-connected pieces of the interior class. Every foreground pixel
    (class 1 or 2) joins the seed it reaches first by a breadth-first flood through
    8-connected foreground (the geodesically nearest seed; at equal distance the seed
    whose first pixel comes first in raster order). Foreground pieces that hold no seed
    become objects of their own. Seeds are 4-connected because a predicted border is
    thinnest where two interiors meet at a corner; there they stay apart.

    Objects under ``min_size`` pixels are dropped (default 0: none are). Ids are 1..N in
    raster order of each object's first pixel; uint16, or uint32 beyond 65535 objects.
    """
    labels = _check_image("instances_from_labels", labels, "class labels")
    _check_min_size("instances_from_labels", min_size)
    if not np.issubdtype(labels.dtype, np.integer):
        fail("instances_from_labels", "integer class labels 0, 1, 2", f"dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 2):
        fail("instances_from_labels", "labels 0 background, 1 interior, 2 border",
             f"values {labels.min()}..{labels.max()}")
    foreground = labels > 0
    seeds, count = label_components(labels == 1, connectivity=1)
    ids = seeds.astype(np.int64)
    if _kernels is None:
        _flood_numpy(ids, foreground)
    else:
        _kernels.flood_from_seeds(ids, np.ascontiguousarray(foreground, dtype=np.uint8))
    leftover, _ = label_components(foreground & (ids == 0), connectivity=2)
    ids[leftover > 0] = leftover[leftover > 0] + count
    return _numbered(ids, min_size)


def instances_from_foreground(foreground: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Instance ids (H, W) from a binary prediction (H, W): its 8-connected components,
    those under ``min_size`` pixels dropped, numbered 1..N in raster order; uint16, or
    uint32 beyond 65535 objects."""
    foreground = _check_image("instances_from_foreground", foreground, "a foreground mask")
    _check_min_size("instances_from_foreground", min_size)
    ids, _ = label_components(foreground, connectivity=2)
    return _numbered(ids, min_size)
