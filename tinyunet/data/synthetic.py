"""The built-in synthetic microscopy dataset: grey images of cells with their masks.

Every sample is drawn from its own generator, ``np.random.default_rng([seed, index])``,
so sample ``i`` is the same whatever order or subset is asked for, and two datasets
with different seeds share no samples.

A sample is made the way a fluorescence image comes about:

1. Cells are ellipses or irregular blobs (an ellipse whose radius wobbles with a few
   low-order harmonics of the polar angle) of varied size, orientation and brightness.
   About a third of the cells are placed against an earlier one, so cells touch.
2. Each cell gets a textured, slightly brighter inside. Out-of-focus haze and small
   bright debris are added (background, not cells). The scene is lit unevenly (a
   smooth gradient and a broad hot spot), blurred with a Gaussian (the optics), and
   given Poisson shot noise plus Gaussian read noise.
3. The image is normalised per image by percentiles, like every image tinyunet reads.

Masks: ``kind='binary'`` gives 0 (background) / 1 (cell). ``kind='multiclass'`` gives
0 background, 1 cell, 2 cell border: the cell pixels next to the background or to
another cell, which is what separates touching cells (the paper's touching-cells
problem).

Shapes: ``image`` is (1, H, W) float32, ``mask`` is (H, W) int64.

``make_nuclei`` draws the same kind of scene as a user's data: a 16-bit image of nuclei
of a fixed size in pixels, however large the field, sparse or dense, with their
instance ids (H, W) uint16; ``benchmarks/real_data.py --synthetic`` writes folders of them.
"""

from __future__ import annotations

import numpy as np

from .images import normalize_percentile

KINDS = ("binary", "multiclass")


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur the last two axes of ``image`` with a separable Gaussian (reflecting edges)."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        size = out.shape[axis]
        out = sum(
            weight * np.take(padded, np.arange(i, i + size), axis=axis)
            for i, weight in enumerate(kernel)
        )
    return out


def _cell_shape(rng, ys, xs, cy, cx, radius):
    """Boolean (H, W) footprint of one cell centred at (cy, cx) with mean radius ``radius``."""
    aspect = rng.uniform(0.65, 1.0)
    angle = rng.uniform(0, np.pi)
    dy, dx = ys - cy, xs - cx
    # Rotate into the cell's own frame, where it is an axis-aligned ellipse.
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    a, b = radius / np.sqrt(aspect), radius * np.sqrt(aspect)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if rng.random() < 0.5:
        # A blob: the boundary radius wobbles with the 2nd and 3rd harmonics of the angle.
        theta = np.arctan2(v, u)
        wobble = 1.0
        for harmonic in (2, 3):
            wobble = wobble + rng.uniform(0, 0.12) * np.cos(
                harmonic * theta + rng.uniform(0, 2 * np.pi)
            )
        rho = rho / wobble
    return rho <= 1.0


def _place_cells(rng, height, width, radius_range, coverage_range=(0.25, 0.45)):
    """Instance labels (H, W) int64 (0 = background) and each cell's brightness."""
    labels = np.zeros((height, width), dtype=np.int64)
    mean_radius = float(np.mean(radius_range))
    # Cover a share of the field drawn from coverage_range (less where cells overlap).
    coverage = rng.uniform(*coverage_range)
    count = max(1, int(round(coverage * height * width / (np.pi * mean_radius**2))))
    centres, radii, brightness = [], [], []
    for _ in range(count):
        radius = rng.uniform(*radius_range)
        if centres and rng.random() < 0.35:
            # Put this cell against an earlier one so that the two touch.
            k = rng.integers(len(centres))
            direction = rng.uniform(0, 2 * np.pi)
            distance = (radii[k] + radius) * rng.uniform(0.85, 1.0)
            cy = centres[k][0] + distance * np.sin(direction)
            cx = centres[k][1] + distance * np.cos(direction)
        else:
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        # A cell reaches at most 1.25 / sqrt(0.65) < 1.6 radii from its centre
        # (_cell_shape), so its footprint is drawn in a window of that reach.
        (y0, y1), (x0, x1) = _window(cy, radius * 1.6, height), _window(cx, radius * 1.6, width)
        ys = np.arange(y0, y1, dtype=np.float64)[:, None]
        xs = np.arange(x0, x1, dtype=np.float64)[None, :]
        footprint = _cell_shape(rng, ys, xs, cy, cx, radius)
        if not footprint.any():
            continue
        centres.append((cy, cx))
        radii.append(radius)
        brightness.append(rng.uniform(0.3, 1.0))
        # A later cell lies on top of an earlier one where they overlap.
        labels[y0:y1, x0:x1][footprint] = len(centres)
    return labels, np.array([0.0, *brightness])


def _window(centre: float, reach: float, size: int) -> tuple[int, int]:
    """The pixel range [start, stop) within [0, size) of centre - reach .. centre + reach."""
    start = min(max(int(np.floor(centre - reach)), 0), size)
    return start, max(min(int(np.ceil(centre + reach)) + 1, size), start)


def _disks(rng, height, width, count, radius_range, amplitude_range):
    """(H, W) float64: ``count`` disks at random places, each of a random amplitude."""
    out = np.zeros((height, width))
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(*radius_range)
        amplitude = rng.uniform(*amplitude_range)
        (y0, y1), (x0, x1) = _window(cy, radius, height), _window(cx, radius, width)
        ys = np.arange(y0, y1, dtype=np.float64)[:, None]
        xs = np.arange(x0, x1, dtype=np.float64)[None, :]
        out[y0:y1, x0:x1] += amplitude * ((ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2)
    return out


def _render(rng, labels, brightness, scale, fields=1.0):
    """The light a microscope records of cells ``labels`` (H, W) float64, before
    normalisation; ``scale`` sizes the clutter, ``fields`` (the image's area in 96x96
    fields of that scale) multiplies its amount."""
    height, width = labels.shape
    # Cell bodies: each cell's brightness, a brighter core, and a fine texture.
    signal = brightness[labels]
    texture = gaussian_blur(rng.normal(0, 1, (height, width)), 1.5)
    signal = signal * (1 + 0.15 * texture) * (labels > 0)
    signal = signal + 0.25 * gaussian_blur((labels > 0).astype(float), 2.5) * signal

    # Things that are not cells: out-of-focus haze (large, faint, very blurred blobs) and
    # small bright debris. Both belong to the background class.
    haze = _disks(rng, height, width, rng.integers(0, max(1, round(4 * fields))),
                  (10 * scale, 18 * scale), (0.1, 0.25))
    clutter = gaussian_blur(haze, 5 * scale) + _disks(
        rng, height, width, rng.integers(0, max(1, round(6 * fields))),
        (0.8 * scale, 2.0 * scale), (0.5, 1.0))

    # Uneven illumination: a tilted plane times a broad hot spot, between ~0.5 and ~1.5.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) / max(height, width)
    tilt = 1 + rng.uniform(-0.5, 0.5) * (ys - 0.5) + rng.uniform(-0.5, 0.5) * (xs - 0.5)
    hy, hx = rng.uniform(0, 1, 2)
    hot_spot = 0.7 + 0.5 * np.exp(-((ys - hy) ** 2 + (xs - hx) ** 2) / 0.2)
    background = rng.uniform(0.05, 0.2)
    image = (background + signal + clutter) * tilt * hot_spot

    image = gaussian_blur(image, rng.uniform(0.7, 1.6))
    photons = rng.uniform(60, 250)
    image = rng.poisson(np.clip(image, 0, None) * photons) / photons
    return image + rng.normal(0, rng.uniform(0.02, 0.05), image.shape)


def border_classes(labels: np.ndarray) -> np.ndarray:
    """Three classes from instance labels (H, W): 0 background, 1 cell, 2 cell border.

    A cell pixel is border when one of its 8 neighbours has another label (background
    or another cell). Beyond the image edge the edge pixels repeat, so a cell cut by
    the edge has no border there.
    """
    padded = np.pad(labels, 1, mode="edge")
    height, width = labels.shape
    border = np.zeros(labels.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            neighbour = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            border |= neighbour != labels
    classes = (labels > 0).astype(np.int64)
    classes[(labels > 0) & border] = 2
    return classes


def make_sample(rng: np.random.Generator, height: int = 96, width: int = 96,
                kind: str = "binary") -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (1, H, W) float32 and its mask (H, W) int64."""
    if kind not in KINDS:
        raise ValueError(f"synthetic: Expect: kind in {KINDS}. Actual: '{kind}'.")
    scale = min(height, width) / 96
    labels, brightness = _place_cells(rng, height, width, (6 * scale + 2, 12 * scale + 2))
    image = _render(rng, labels, brightness, scale)
    mask = (labels > 0).astype(np.int64) if kind == "binary" else border_classes(labels)
    return normalize_percentile(image[None].astype(np.float32)), mask


def make_nuclei(rng: np.random.Generator, height: int = 256, width: int = 256,
                radius: tuple[float, float] = (5.0, 11.0),
                coverage: tuple[float, float] = (0.05, 0.45)) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit fluorescence image of nuclei, (H, W) uint16, and their instance ids,
    (H, W) uint16 (uint32 past 65535 nuclei).

    Nuclei keep their size (``radius``, in pixels) whatever the image's size, so a large
    image holds many of them: they cover a share of the field drawn from ``coverage``
    (sparse to dense), a third of them touching another. The image is the camera's
    counts: an offset of 400-600 plus a gain of 500-3000 counts per unit of light.
    """
    scale = float(np.mean(radius)) / 9  # make_sample's cells at 96 px have a radius of 9
    labels, brightness = _place_cells(rng, height, width, radius, coverage)
    fields = height * width / (96 * scale) ** 2
    light = _render(rng, labels, brightness, scale, fields)
    counts = rng.uniform(400, 600) + rng.uniform(500, 3000) * light
    ids_dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16), labels.astype(ids_dtype)


class SyntheticCells:
    """``count`` synthetic samples of size (H, W); ``dataset[i]`` -> (image, mask).

    Samples are generated on first access and kept, so epochs don't regenerate them.
    """

    def __init__(self, count: int, size=(96, 96), seed: int = 0, kind: str = "binary"):
        if kind not in KINDS:
            raise ValueError(f"SyntheticCells: Expect: kind in {KINDS}. Actual: '{kind}'.")
        if count < 1:
            raise ValueError(f"SyntheticCells: Expect: count >= 1. Actual: {count}.")
        self.count = count
        self.size = (int(size[0]), int(size[1]))
        self.seed = seed
        self.kind = kind
        self.in_channels = 1
        # Binary masks train one sigmoid channel; multi-class masks a softmax over 3.
        self.num_classes = 1 if kind == "binary" else 3
        self.names = [f"synthetic_{seed}_{i:04d}" for i in range(count)]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self):
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(f"SyntheticCells: index {index} out of range [0, {self.count})")
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, index])
            self._cache[index] = make_sample(rng, *self.size, kind=self.kind)
        return self._cache[index]
