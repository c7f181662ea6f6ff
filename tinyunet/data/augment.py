"""Augmentation applied identically to an image and its mask.

Shapes: ``image`` (C, H, W) float32, ``mask`` (H, W) integer labels. Geometric
transforms move both the same way: images are resampled bilinearly, masks by nearest
neighbour so they keep their labels. Intensity changes touch the image only. All
randomness comes from the ``np.random.Generator`` passed in, so a seeded generator
gives the same augmented batch every run.

- ``random_crop``: a random window; images smaller than the window are mirrored out.
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


def random_crop(image, mask, size, rng):
    """A random (h, w) window of ``image`` (C, H, W) and ``mask`` (H, W), at one position.

    A side shorter than the window is mirror-padded first (symmetric, on both ends).
    """
    h, w = size
    H, W = mask.shape
    pad_h, pad_w = max(0, h - H), max(0, w - W)
    if pad_h or pad_w:
        pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        image = np.pad(image, ((0, 0), *pads), mode="symmetric")
        mask = np.pad(mask, pads, mode="symmetric")
        H, W = mask.shape
    top = int(rng.integers(0, H - h + 1))
    left = int(rng.integers(0, W - w + 1))
    return image[:, top : top + h, left : left + w], mask[top : top + h, left : left + w]


def flip_rotate(image, mask, rng):
    """Random flips along H and W, and a random multiple of 90 degrees when H == W."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[::-1]
    if rng.random() < 0.5:
        image, mask = image[:, :, ::-1], mask[:, ::-1]
    if mask.shape[0] == mask.shape[1]:
        turns = int(rng.integers(4))
        image, mask = np.rot90(image, turns, axes=(1, 2)), np.rot90(mask, turns)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


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


def warp(image, mask, dy, dx):
    """Sample ``image`` (C, H, W) bilinearly and ``mask`` (H, W) by nearest neighbour at
    (y + dy, x + dx). Zero displacement returns both unchanged, bit for bit.
    """
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
    return warped_image.astype(image.dtype), mask[nearest_y, nearest_x]


def intensity_jitter(image, rng, gain: float = 0.2, offset: float = 0.1):
    """image * g + o with log g ~ U(-gain, gain) and o ~ U(-offset, offset)."""
    g = np.exp(rng.uniform(-gain, gain))
    o = rng.uniform(-offset, offset)
    return (image * g + o).astype(image.dtype)


@dataclass
class Augmenter:
    """Random crop, then flips/rotations, elastic deformation and intensity jitter.

    ``crop``: (h, w) window or None for the whole image. ``elastic_p`` is the chance a
    sample is deformed (deformation costs more than the rest together).
    """

    crop: tuple[int, int] | None = None
    flip: bool = True
    elastic_p: float = 0.5
    elastic_sigma: float = 4.0
    elastic_grid: int = 3
    jitter: bool = True

    def __call__(self, image, mask, rng):
        if self.crop is not None:
            image, mask = random_crop(image, mask, self.crop, rng)
        if self.flip:
            image, mask = flip_rotate(image, mask, rng)
        if self.elastic_p > 0 and rng.random() < self.elastic_p:
            dy, dx = elastic_field(mask.shape, rng, self.elastic_sigma, self.elastic_grid)
            image, mask = warp(image, mask, dy, dx)
        if self.jitter:
            image = intensity_jitter(image, rng)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)
