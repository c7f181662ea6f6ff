"""Prediction on images of any size by the paper's overlap-tile strategy.

Shapes: ``image`` (C, H, W) float32 in, logits or probabilities (K, H, W) out, where K
is the model's ``num_classes``.

The image is cut into tiles that fit the network, the tiles are run in batches, and
the parts of their outputs that saw enough context are stitched together.

- ``padding='valid'`` (the paper): the network's output is smaller than its input by a
  margin m on each side, so the image is mirrored out by m (and a little more at the
  bottom/right) and every output pixel is computed with its full context. Tiles start
  at multiples of 2**depth, which keeps the pooling grid of every tile aligned with
  the whole image's: where the whole mirrored image fits the network too, tiled and
  whole-image predictions agree.
- ``padding='same'``: the image is zero-padded at the bottom/right to a multiple of
  2**depth (as the model itself does) and tiles overlap by ``2 * halo``; of each tile
  only the part at least ``halo`` pixels from an inner tile edge is kept. With the
  default halo (the U-Net's receptive-field radius) that part equals the whole-image
  prediction.
"""

from __future__ import annotations

import math

import numpy as np

from ..autograd import no_grad, tensor


def _model_backend(model):
    return next(iter(model.parameters())).backend


def receptive_halo(depth: int, up: str = "transpose") -> int:
    """Context (pixels, a multiple of 2**depth) that a 'same' U-Net tile needs per side.

    Two 3x3 convs at scale 2**l reach 2 * 2**l pixels, a 2x2 pool 2**l more, on the way
    down and (convs only) on the way up, plus the bottleneck's two convs at 2**depth:
    5 * (2**depth - 1) + 2**(depth + 1). Another 2**(depth + 1) covers the pooling
    windows' one-sided reach and bilinear upsampling's neighbours.
    """
    del up  # both upsampling kinds are covered by the extra margin
    align = 2**depth
    radius = 5 * (align - 1) + 4 * align
    return math.ceil(radius / align) * align


def _valid_windows(size, out_tile, stride):
    """(input start in the padded image, output start) per tile along one axis."""
    starts = [0]
    while starts[-1] + out_tile < size:
        starts.append(starts[-1] + stride)
    return [(s, s, s, min(s + out_tile, size)) for s in starts]


def _same_windows(padded_size, size, tile, halo):
    """(input start, output start, keep from, keep to) per tile along one axis."""
    if padded_size <= tile:
        return [(0, 0, 0, size)]
    starts = list(range(0, padded_size - tile, tile - 2 * halo)) + [padded_size - tile]
    windows = []
    for s in starts:
        keep_from = s + halo if s > 0 else 0
        keep_to = s + tile - halo if s + tile < padded_size else padded_size
        windows.append((s, s, keep_from, min(keep_to, size)))
    return windows


def predict_logits(model, image: np.ndarray, tile=None, halo=None,
                   batch_size: int = 4) -> np.ndarray:
    """Logits (K, H, W) for one image (C, H, W) of any size.

    ``tile``: the tile side (int or (h, w)); default 256 ('same') or the smallest valid
    input of at least 256 ('valid'). ``halo`` ('same' only): context kept out of each
    tile's kept part, default ``receptive_halo(depth)``.
    """
    config = model.config
    depth, padding = config["depth"], config["padding"]
    align = 2**depth
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != config["in_channels"]:
        raise ValueError(
            f"predict: Expect: an image of shape ({config['in_channels']}, H, W). "
            f"Actual: shape {image.shape}."
        )
    C, H, W = image.shape
    tile_hw = (256, 256) if tile is None else ((tile, tile) if np.isscalar(tile) else tile)

    if padding == "valid":
        in_hw = model.valid_input_hw(tuple(int(t) for t in tile_hw))
        out_hw = model.output_hw(in_hw)
        margins = [(i - o) // 2 for i, o in zip(in_hw, out_hw, strict=True)]
        strides = [(o // align) * align for o in out_hw]
        if min(strides) == 0:
            raise ValueError(
                f"predict: Expect: a tile whose output is at least {align} pixels. "
                f"Actual: tile {in_hw} gives output {out_hw}; use a larger tile."
            )
        rows = _valid_windows(H, out_hw[0], strides[0])
        cols = _valid_windows(W, out_hw[1], strides[1])
        extra_h = rows[-1][1] + out_hw[0] - H
        extra_w = cols[-1][1] + out_hw[1] - W
        padded = np.pad(
            image,
            ((0, 0), (margins[0], margins[0] + extra_h), (margins[1], margins[1] + extra_w)),
            mode="reflect",
        )
    else:
        halo_given = halo is not None
        halo = receptive_halo(depth, config.get("up", "transpose")) if halo is None else halo
        in_hw = tuple(math.ceil(int(t) / align) * align for t in tile_hw)
        padded_hw = (math.ceil(H / align) * align, math.ceil(W / align) * align)
        in_hw = (min(in_hw[0], padded_hw[0]), min(in_hw[1], padded_hw[1]))
        for side, padded_side in zip(in_hw, padded_hw, strict=True):
            if side < padded_side and side <= 2 * halo:
                smallest = (2 * halo // align + 1) * align  # tiles are multiples of align
                remedy = ", or a smaller halo" if halo_given else ""
                raise ValueError(
                    f"predict: Expect: a tile larger than 2 * halo = {2 * halo} (the context "
                    f"kept out of each tile). Actual: tile {side}; use a tile of at least "
                    f"{smallest}{remedy}."
                )
        rows = _same_windows(padded_hw[0], H, in_hw[0], halo)
        cols = _same_windows(padded_hw[1], W, in_hw[1], halo)
        padded = np.pad(image, ((0, 0), (0, padded_hw[0] - H), (0, padded_hw[1] - W)))

    tiles = [(r, c) for r in rows for c in cols]
    logits = None
    backend = _model_backend(model)
    with no_grad():
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first : first + batch_size]
            batch = np.stack([
                padded[:, r[0] : r[0] + in_hw[0], c[0] : c[0] + in_hw[1]] for r, c in chunk
            ])
            out = model(tensor(batch, backend=backend)).numpy()
            if logits is None:
                logits = np.zeros((out.shape[1], H, W), dtype=np.float32)
            for (r, c), piece in zip(chunk, out, strict=True):
                (_, r_out, r_from, r_to), (_, c_out, c_from, c_to) = r, c
                logits[:, r_from:r_to, c_from:c_to] = piece[
                    :, r_from - r_out : r_to - r_out, c_from - c_out : c_to - c_out
                ]
    return logits


def logits_to_probabilities(logits: np.ndarray) -> np.ndarray:
    """Sigmoid of one channel, softmax over several: (K, H, W) -> (K, H, W)."""
    if logits.shape[0] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def logits_to_labels(logits: np.ndarray) -> np.ndarray:
    """Class labels (H, W) int64: logit > 0 for one channel, argmax over several."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).astype(np.int64)
    return logits.argmax(axis=0).astype(np.int64)


def predict_tiled(model, image: np.ndarray, tile=None, halo=None,
                  batch_size: int = 4) -> np.ndarray:
    """Probabilities (K, H, W) for one image (C, H, W) of any size; see ``predict_logits``."""
    return logits_to_probabilities(predict_logits(model, image, tile, halo, batch_size))
