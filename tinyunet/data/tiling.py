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

The default tile (``default_tile``) follows from the halo, so prediction works at every
depth: the smallest multiple of 2**depth that is at least max(1024, 4 * halo). At
4 * halo a tile keeps at least half of each side (a quarter of its area) for the
output; the floor of 1024 runs most microscopy fields whole, in one tile, with no
context recomputed (a depth-4 net's halo is 144: 576-pixel tiles would keep 288 of 576
pixels per side and compute a 1100-pixel image about four times over). A batch of
four 1024-pixel tiles of a 16-channel U-Net holds about 1.5 GB; give a smaller
``tile`` on a small machine. Depth 2-4 give 1024; depth 5 gives 1152. A side that
needs several tiles gets tiles of equal size, the smallest that needs no more of them
(``balanced_tile``), so that little is computed twice.

Test-time augmentation (``tta=True``) runs the 8 flips and 90-degree rotations of the
image (the dihedral group), turns each prediction back, and averages the
probabilities (sigmoid or softmax), not the logits: a probability average is what a
vote of the 8 views means, and one very confident view cannot outweigh the others as
its logit would. ``predict_logits`` then returns the logits of the averaged
probabilities (log p - log(1 - p) for one channel, log p for several), so that
``logits_to_labels`` and ``logits_to_probabilities`` apply unchanged. It costs 8
predictions. Because the set of 8 views of a flipped or rotated image is the same set,
TTA's output is exactly equivariant (up to float rounding of the sums), whatever the
network.
"""

from __future__ import annotations

import math

import numpy as np

from ..autograd import no_grad, tensor
from ..ensemble import Ensemble


def _batch_forward(model):
    """A function from an image batch (N, C, h, w) float32 to logits (N, K, h', w').

    A model that runs elsewhere (``tinyunet.onnx_runtime.OnnxModel``) brings its own
    ``predict_batch``; a tinyunet UNet runs on its parameters' backend (called under
    ``no_grad``, so without a graph).
    """
    if hasattr(model, "predict_batch"):
        return model.predict_batch
    backend = next(iter(model.parameters())).backend
    return lambda batch: model(tensor(batch, backend=backend)).numpy()


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


def default_tile(depth: int) -> int:
    """The tile side ``predict_logits`` uses when none is given (see the module docstring)."""
    align = 2**depth
    return math.ceil(max(1024, 4 * receptive_halo(depth)) / align) * align


# The dihedral group of the square as (quarter turns, mirror left-right) pairs.
DIHEDRAL = tuple((turns, mirror) for mirror in (False, True) for turns in range(4))


def dihedral_transform(array: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """Mirror the last axis (if ``mirror``), then turn the last two by ``turns`` quarters."""
    if mirror:
        array = array[..., ::-1]
    return np.rot90(array, turns, axes=(-2, -1))


def dihedral_inverse(array: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """Undo ``dihedral_transform(array, turns, mirror)``."""
    array = np.rot90(array, -turns, axes=(-2, -1))
    return array[..., ::-1] if mirror else array


def _valid_windows(size, out_tile, stride):
    """(input start in the padded image, output start) per tile along one axis."""
    starts = [0]
    while starts[-1] + out_tile < size:
        starts.append(starts[-1] + stride)
    return [(s, s, s, min(s + out_tile, size)) for s in starts]


def balanced_tile(padded_size: int, tile: int, halo: int, align: int) -> int:
    """The smallest multiple of ``align``, at most ``tile``, whose windows cover
    ``padded_size`` in as few tiles as ``tile``'s do ('same' padding, overlap 2 * halo).

    Tiles of ``tile`` would compute the overlap of their last window again: 1104 rows
    in tiles of 1024 with a halo of 144 run two 1024-row windows, while two of 704 do.
    """
    if padded_size <= tile:
        return padded_size
    count = len(_same_windows(padded_size, padded_size, tile, halo))
    need = math.ceil((padded_size + (count - 1) * 2 * halo) / count)
    return min(tile, math.ceil(need / align) * align)


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


def predict_logits(model, image: np.ndarray, tile=None, halo=None, batch_size: int = 4,
                   tta: bool = False) -> np.ndarray:
    """Logits (K, H, W) for one image (C, H, W) of any size.

    ``model``: a tinyunet UNet, or an object with the same ``config``, ``valid_input_hw``
    and ``output_hw`` and a ``predict_batch`` (e.g. ``tinyunet.onnx_runtime.OnnxModel``).
    ``tile``: the tile side (int or (h, w)); default ``default_tile(depth)`` ('same') or
    the smallest valid input of at least that ('valid'). ``halo`` ('same' only): context
    kept out of each tile's kept part, default ``receptive_halo(depth)``. ``tta``: average
    the probabilities of the 8 flipped and rotated views (module docstring) and return
    their logits. ``model`` may be a ``tinyunet.ensemble.Ensemble``: then the logits of
    its members' mean probabilities.
    """
    if not tta and not isinstance(model, Ensemble):
        return _predict_view(model, image, tile, halo, batch_size)
    return probabilities_to_logits(predict_tiled(model, image, tile, halo, batch_size, tta))


def _checked_image(model, image) -> np.ndarray:
    """``image`` as float32, or a ValueError when it is not (in_channels, H, W)."""
    image = np.asarray(image, dtype=np.float32)
    channels = model.config["in_channels"]
    if image.ndim != 3 or image.shape[0] != channels:
        raise ValueError(f"predict: Expect: an image of shape ({channels}, H, W). "
                         f"Actual: shape {image.shape}.")
    return image


def _predict_view(model, image, tile, halo, batch_size):
    """``predict_logits`` without test-time augmentation."""
    config = model.config
    depth, padding = config["depth"], config["padding"]
    align = 2**depth
    image = _checked_image(model, image)
    C, H, W = image.shape
    tile = default_tile(depth) if tile is None else tile
    tile_hw = (tile, tile) if np.isscalar(tile) else tile

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
        in_hw = tuple(balanced_tile(p, t, halo, align) for p, t in zip(padded_hw, in_hw,
                                                                        strict=True))
        rows = _same_windows(padded_hw[0], H, in_hw[0], halo)
        cols = _same_windows(padded_hw[1], W, in_hw[1], halo)
        padded = np.pad(image, ((0, 0), (0, padded_hw[0] - H), (0, padded_hw[1] - W)))

    tiles = [(r, c) for r in rows for c in cols]
    logits = None
    forward = _batch_forward(model)
    with no_grad():
        for first in range(0, len(tiles), batch_size):
            chunk = tiles[first : first + batch_size]
            batch = np.stack([
                padded[:, r[0] : r[0] + in_hw[0], c[0] : c[0] + in_hw[1]] for r, c in chunk
            ])
            out = forward(batch)
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


def probabilities_to_logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits (K, H, W) float32 whose sigmoid (K = 1) or softmax (K > 1) are
    ``probabilities``; probabilities of exactly 0 or 1 are first moved 1e-12 inside.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    if p.shape[0] == 1:
        return (np.log(p) - np.log1p(-p)).astype(np.float32)
    return np.log(p).astype(np.float32)


def predict_tiled(model, image: np.ndarray, tile=None, halo=None, batch_size: int = 4,
                  tta: bool = False) -> np.ndarray:
    """Probabilities (K, H, W) float32 for one image (C, H, W) of any size; see
    ``predict_logits``. With ``tta`` the mean of the 8 views' probabilities; for an
    ``Ensemble``, the mean of its members' (each with ``tta`` if given).
    """
    if isinstance(model, Ensemble):
        image = _checked_image(model, image)
        return _mean(predict_tiled(member, image, tile, halo, batch_size, tta)
                     for member in model.members)
    if not tta:
        return logits_to_probabilities(_predict_view(model, image, tile, halo, batch_size))
    image = _checked_image(model, image)

    def view_probabilities(turns, mirror):
        view = np.ascontiguousarray(dihedral_transform(image, turns, mirror))
        logits = _predict_view(model, view, tile, halo, batch_size)
        return dihedral_inverse(logits_to_probabilities(logits), turns, mirror)

    return _mean(view_probabilities(turns, mirror) for turns, mirror in DIHEDRAL)


def _mean(probabilities) -> np.ndarray:
    """The mean of an iterable of (K, H, W) arrays as float32, summed in float64 so that
    their order hardly changes the rounding (one array held at a time)."""
    total, count = None, 0
    for array in probabilities:
        total = array.astype(np.float64) if total is None else total + array
        count += 1
    assert total is not None, "nothing to average"
    return (total / count).astype(np.float32)
