"""Numba kernels behind tinyunet.data.instances (instance masks: distances, components).

Shapes: 2-D images (H, W), C-contiguous; ``lower_envelope_lines`` works on a stack of
independent lines (L, n).

* ``lower_envelope_lines``: the 1-D squared distance transform of Felzenszwalb and
  Huttenlocher (2012), min over q of (p - q)^2 + f(q), by the lower envelope of the
  parabolas rooted at the finite samples of f; one line at a time.
* ``label_pixels``: connected components by union-find over the pixels in raster
  order, numbered in raster order of each component's first pixel.
* ``flood_from_seeds``: a breadth-first flood of seed labels through a foreground mask,
  one level at a time, a pixel reached by several seeds in the same level taking the
  smallest label.

The kernels are serial: each is one linear pass, a fraction of a second on an
1100 x 1100 image, and leaving numba's parallel pool alone leaves its start-up to
kernels/cpu/runtime.py (``start_thread_pool``). The numpy twins of these kernels live in
tinyunet/data/instances.py and give identical results.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def lower_envelope_lines(f, out):
    """out[l, p] = min over q of (p - q)^2 + f[l, q] for each line l of f (L, n) float64.

    Samples where f is +inf take no part; a line with none left gets +inf everywhere.
    ``z[k]`` is where parabola ``v[k]`` starts to be the lowest; the intersection of the
    parabolas rooted at q and v is s = ((f(q) + q^2) - (f(v) + v^2)) / (2q - 2v).
    """
    lines, n = f.shape
    roots = np.empty(n, np.int64)
    starts = np.empty(n + 1, np.float64)
    for line in range(lines):
        k = -1
        for q in range(n):
            fq = f[line, q]
            if fq == np.inf:
                continue
            if k < 0:
                k = 0
                roots[0] = q
                starts[0] = -np.inf
                starts[1] = np.inf
                continue
            while True:
                v = roots[k]
                s = ((fq + q * q) - (f[line, v] + v * v)) / (2.0 * (q - v))
                if s <= starts[k]:
                    k -= 1  # parabola v is nowhere lowest; starts[0] = -inf stops this
                else:
                    break
            k += 1
            roots[k] = q
            starts[k] = s
            starts[k + 1] = np.inf
        if k < 0:
            out[line, :] = np.inf
            continue
        k = 0
        for p in range(n):
            while starts[k + 1] < p:
                k += 1
            d = p - roots[k]
            out[line, p] = d * d + f[line, roots[k]]


@njit(cache=True, inline="always")
def _find(parent, p):
    while parent[p] != p:
        parent[p] = parent[parent[p]]  # path halving
        p = parent[p]
    return p


@njit(cache=True, inline="always")
def _union(parent, a, b):
    ra = _find(parent, a)
    rb = _find(parent, b)
    # The smaller index becomes the root, so every root is its component's first pixel.
    if ra < rb:
        parent[rb] = ra
    elif rb < ra:
        parent[ra] = rb


@njit(cache=True, nogil=True)
def label_pixels(mask, diagonal, out):
    """Components of ``mask`` (H, W) uint8 into ``out`` (H, W) int32, 1..N; returns N.

    Neighbours: left and up, plus up-left and up-right when ``diagonal`` (8-connectivity).
    """
    h, w = mask.shape
    parent = np.empty(h * w, np.int64)
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                continue
            p = r * w + c
            parent[p] = p
            if c > 0 and mask[r, c - 1]:
                _union(parent, p, p - 1)
            if r > 0:
                if mask[r - 1, c]:
                    _union(parent, p, p - w)
                if diagonal:
                    if c > 0 and mask[r - 1, c - 1]:
                        _union(parent, p, p - w - 1)
                    if c + 1 < w and mask[r - 1, c + 1]:
                        _union(parent, p, p - w + 1)
    count = 0
    for r in range(h):
        for c in range(w):
            if not mask[r, c]:
                out[r, c] = 0
                continue
            root = _find(parent, r * w + c)
            if root == r * w + c:
                count += 1
                out[r, c] = count
            else:
                out[r, c] = out[root // w, root % w]  # labelled already: root comes first
    return count


@njit(cache=True, nogil=True)
def flood_from_seeds(labels, foreground):
    """Spread the labels > 0 of ``labels`` (H, W) int64 in place over ``foreground``
    (H, W) uint8, 8-connected, breadth first; ties within a level go to the smaller label.
    """
    h, w = labels.shape
    level = np.full((h, w), -1, np.int64)
    queue = np.empty(h * w, np.int64)
    tail = 0
    for r in range(h):
        for c in range(w):
            if labels[r, c] > 0:
                level[r, c] = 0
                queue[tail] = r * w + c
                tail += 1
    head = 0
    step = 0
    while head < tail:
        step += 1
        end = tail
        for i in range(head, end):
            r = queue[i] // w
            c = queue[i] % w
            label = labels[r, c]
            for dr in range(-1, 2):
                for dc in range(-1, 2):
                    rr = r + dr
                    cc = c + dc
                    if rr < 0 or rr >= h or cc < 0 or cc >= w or not foreground[rr, cc]:
                        continue
                    if level[rr, cc] < 0:
                        level[rr, cc] = step
                        labels[rr, cc] = label
                        queue[tail] = rr * w + cc
                        tail += 1
                    elif level[rr, cc] == step and label < labels[rr, cc]:
                        labels[rr, cc] = label
        head = end
