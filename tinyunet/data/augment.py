"""Augmentation applied identically to an image and its mask.

Shapes: ``image`` (C, H, W) float32, ``mask`` (H, W) integer labels, optional
``weight`` (H, W) float32 per-pixel loss weights. Geometric transforms move all of
them the same way: images are resampled bilinearly, masks by nearest neighbour so
they keep their labels, and weight maps by nearest neighbour too, so that each pixel
keeps the weight that belongs to its label (a separation border's high weight stays
on the border pixels). Intensity changes touch the image only. Every function that
takes ``weight=`` returns (image, mask, weight) when one is given, (image, mask)
otherwise; the random draws are the same either way. All randomness comes from the
``np.random.Generator`` passed in, so a seeded generator gives the same augmented
batch every run.

- ``random_crop``: a random window; images smaller than the window are mirrored out
  (``mirror_to_size``).
- ``flip_rotate``: random horizontal/vertical flips and 90-degree rotations (square crops).
- ``elastic_field`` + ``warp``: the paper's elastic deformation. Random displacement
  vectors on a coarse grid (3x3 by default), Gaussian with ``sigma`` pixels, spread to
  every pixel by bicubic interpolation; the image is then sampled at the displaced
  positions, mirroring at the borders.
- ``intensity_jitter``: a random gain and offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _result(image, mask, weight, weighted):
    return (image, mask, weight) if weighted else (image, mask)


def mirror_to_size(image, mask, size, weight=None):
    """Mirror-pad (symmetric, on both ends) the sides shorter than ``size`` (h, w).

    Returns (image, mask, weight, (top pad, left pad)); weight stays None if not given.
    """
    h, w = size
    H, W = mask.shape
    pad_h, pad_w = max(0, h - H), max(0, w - W)
    pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    if pad_h or pad_w:
        image = np.pad(image, ((0, 0), *pads), mode="symmetric")
        mask = np.pad(mask, pads, mode="symmetric")
        if weight is not None:
            weight = np.pad(weight, pads, mode="symmetric")
    return image, mask, weight, (pads[0][0], pads[1][0])


def _random_crop(image, mask, weight, size, rng):
    h, w = size
    image, mask, weight, _ = mirror_to_size(image, mask, size, weight)
    H, W = mask.shape
    top = int(rng.integers(0, H - h + 1))
    left = int(rng.integers(0, W - w + 1))
    rows, cols = slice(top, top + h), slice(left, left + w)
    return (image[:, rows, cols], mask[rows, cols],
            None if weight is None else weight[rows, cols])


def random_crop(image, mask, size, rng, weight=None):
    """A random (h, w) window of ``image`` (C, H, W) and ``mask`` (H, W), at one position.

    A side shorter than the window is mirror-padded first (symmetric, on both ends).
    """
    return _result(*_random_crop(image, mask, weight, size, rng), weight is not None)


def _flip_rotate(image, mask, weight, rng):
    maps = [mask] if weight is None else [mask, weight]
    if rng.random() < 0.5:
        image, maps = image[:, ::-1], [m[::-1] for m in maps]
    if rng.random() < 0.5:
        image, maps = image[:, :, ::-1], [m[:, ::-1] for m in maps]
    if mask.shape[0] == mask.shape[1]:
        turns = int(rng.integers(4))
        image, maps = np.rot90(image, turns, axes=(1, 2)), [np.rot90(m, turns) for m in maps]
    maps = [np.ascontiguousarray(m) for m in maps]
    return np.ascontiguousarray(image), maps[0], None if weight is None else maps[1]


def flip_rotate(image, mask, rng, weight=None):
    """Random flips along H and W, and a random multiple of 90 degrees when H == W."""
    return _result(*_flip_rotate(image, mask, weight, rng), weight is not None)


def _cubic_kernel(s, a=-0.5):
    """Keys' cubic convolution kernel (the usual 'bicubic')."""
    s = np.abs(s)
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def cubic_weights(points: int, size: int) -> np.ndarray:
    """(size, points) matrix that interpolates ``points`` evenly spaced samples to ``size``.

    Sample j sits at pixel j * (size - 1) / (points - 1), so the corners of the coarse grid
    are the corners of the image. Neighbours beyond the grid repeat its edge values.
    """
    if points == 1 or size == 1:
        return np.ones((size, points)) / points
    t = np.arange(size) * (points - 1) / (size - 1)
    weights = np.zeros((size, points))
    base = np.floor(t).astype(int)
    for k in range(-1, 3):
        j = base + k
        np.add.at(weights, (np.arange(size), np.clip(j, 0, points - 1)), _cubic_kernel(t - j))
    return weights


def elastic_field(shape, rng, sigma: float = 4.0, grid: int = 3):
    """Per-pixel displacements (dy, dx), each (H, W): a smooth random deformation.

    Displacements on a ``grid`` x ``grid`` coarse grid are drawn from N(0, sigma^2) pixels
    and interpolated bicubically, as in the U-Net paper (which used a 3x3 grid and 10 px).
    """
    H, W = shape
    wy, wx = cubic_weights(grid, H), cubic_weights(grid, W)
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    return wy @ coarse[0] @ wx.T, wy @ coarse[1] @ wx.T


def _reflect(coordinate, size):
    """Fold coordinates into [0, size - 1] by mirroring at the borders."""
    if size == 1:
        return np.zeros_like(coordinate)
    period = 2 * (size - 1)
    folded = np.mod(coordinate, period)
    return np.where(folded > size - 1, period - folded, folded)


def _warp(image, mask, weight, dy, dx):
    H, W = mask.shape
    ys, xs = np.mgrid[0:H, 0:W]
    y = _reflect(ys + dy, H)
    x = _reflect(xs + dx, W)

    y0 = np.minimum(np.floor(y).astype(np.int64), max(H - 2, 0))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(W - 2, 0))
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    fy, fx = (y - y0).astype(image.dtype), (x - x0).astype(image.dtype)
    top = image[:, y0, x0] * (1 - fx) + image[:, y0, x1] * fx
    bottom = image[:, y1, x0] * (1 - fx) + image[:, y1, x1] * fx
    warped_image = top * (1 - fy) + bottom * fy

    nearest_y = np.clip(np.rint(y).astype(np.int64), 0, H - 1)
    nearest_x = np.clip(np.rint(x).astype(np.int64), 0, W - 1)
    return (warped_image.astype(image.dtype), mask[nearest_y, nearest_x],
            None if weight is None else weight[nearest_y, nearest_x])


def warp(image, mask, dy, dx, weight=None):
    """Sample ``image`` (C, H, W) bilinearly and ``mask`` (H, W) (and ``weight``) by nearest
    neighbour at (y + dy, x + dx). Zero displacement returns them unchanged, bit for bit.
    """
    return _result(*_warp(image, mask, weight, dy, dx), weight is not None)


def intensity_jitter(image, rng, gain: float = 0.2, offset: float = 0.1):
    """image * g + o with log g ~ U(-gain, gain) and o ~ U(-offset, offset)."""
    g = np.exp(rng.uniform(-gain, gain))
    o = rng.uniform(-offset, offset)
    return (image * g + o).astype(image.dtype)


@dataclass
class Augmenter:
    """Random crop, then flips/rotations, elastic deformation and intensity jitter.

    ``crop``: (h, w) window or None for the whole image (the trainer cuts its crops
    itself, ``tinyunet.data.sampling``). ``elastic_p`` is the chance a sample is
    deformed (deformation costs more than the rest together). ``weight``: an optional
    (H, W) loss weight map, moved like the mask; then the result is (image, mask, weight).
    """

    crop: tuple[int, int] | None = None
    flip: bool = True
    elastic_p: float = 0.5
    elastic_sigma: float = 4.0
    elastic_grid: int = 3
    jitter: bool = True

    def __call__(self, image, mask, rng, weight=None):
        weighted = weight is not None
        if self.crop is not None:
            image, mask, weight = _random_crop(image, mask, weight, self.crop, rng)
        if self.flip:
            image, mask, weight = _flip_rotate(image, mask, weight, rng)
        if self.elastic_p > 0 and rng.random() < self.elastic_p:
            dy, dx = elastic_field(mask.shape, rng, self.elastic_sigma, self.elastic_grid)
            image, mask, weight = _warp(image, mask, weight, dy, dx)
        if self.jitter:
            image = intensity_jitter(image, rng)
        image, mask = np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)
        if weighted:
            weight = np.ascontiguousarray(weight, dtype=np.float32)
        return _result(image, mask, weight, weighted)
