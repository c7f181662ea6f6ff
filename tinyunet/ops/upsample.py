"""Upsampling by integer factors: nearest and bilinear, with ``F.interpolate``'s semantics.

Shapes: x (N, C, H, W) -> y (N, C, sH*H, sW*W) for ``scale_factor`` s = (sH, sW)
(an int means the same factor on both axes).

Nearest: output pixel (i, j) copies input pixel (i // sH, j // sW); for integer
factors this is exactly PyTorch's 'nearest' (checked against it in the tests). Its
backward sums each sH x sW block of the output gradient.

Bilinear is separable, so it is two small matrix products, y = A_h @ x @ A_w^T, where
row o of A_h holds the (at most two) weights that output row o takes from the input
rows around its source position. The backward is the transpose, dx = A_h^T @ dy @ A_w.
Source positions follow PyTorch for a given scale_factor:
    align_corners=False (the default): src = (o + 0.5) / s - 0.5, clamped below at 0,
        so the outermost output pixels copy the edge (no extrapolation);
    align_corners=True: src = o * (H - 1) / (s*H - 1), so the corner pixels line up.
A source position past the last input row puts all its weight on that row.
"""

from __future__ import annotations

import functools

import numpy as np

from ..autograd import Function, Tensor
from ..errors import check


@functools.lru_cache(maxsize=64)
def interpolation_matrix(size: int, scale: int, align_corners: bool) -> np.ndarray:
    """(scale*size, size) float64 matrix of linear-interpolation weights along one axis.

    Cached (read-only), since a network upsamples the same sizes at every step.
    """
    out = scale * size
    o = np.arange(out, dtype=np.float64)
    if align_corners:
        src = o * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    else:
        src = np.maximum((o + 0.5) / scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size - 1)
    high = np.minimum(low + 1, size - 1)
    frac = src - low
    matrix = np.zeros((out, size))
    # add.at, not assignment: at the last row low == high and both weights must land.
    np.add.at(matrix, (np.arange(out), low), 1 - frac)
    np.add.at(matrix, (np.arange(out), high), frac)
    matrix.setflags(write=False)
    return matrix


class UpsampleNearest(Function):
    @staticmethod
    def forward(ctx, x, scale):
        sh, sw = scale
        n, c, h, w = x.shape
        ctx.save_for_backward(scale)
        # One copy: a broadcast view (N, C, H, sH, W, sW) laid out as the output.
        blocks = ctx.backend.xp.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sh, w, sw))
        return blocks.reshape(n, c, h * sh, w * sw)

    @staticmethod
    def backward(ctx, grad):
        ((sh, sw),) = ctx.saved
        n, c, h, w = grad.shape
        # Each input pixel was copied into an sH x sW block: its gradient is the block's sum.
        return (grad.reshape(n, c, h // sh, sh, w // sw, sw).sum(axis=(3, 5)),)


class UpsampleBilinear(Function):
    @staticmethod
    def forward(ctx, x, scale, align_corners):
        backend, xp = ctx.backend, ctx.backend.xp
        rows = backend.asarray(interpolation_matrix(x.shape[2], scale[0], align_corners)
                               .astype(x.dtype))
        cols = backend.asarray(interpolation_matrix(x.shape[3], scale[1], align_corners)
                               .astype(x.dtype))
        ctx.save_for_backward(rows, cols)
        # (sH*H, H) @ (N, C, H, W) @ (W, sW*W): matmul broadcasts over N and C.
        return xp.matmul(xp.matmul(rows, x), cols.T)

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved
        xp = ctx.backend.xp
        return (xp.matmul(xp.matmul(rows.T, grad), cols),)


def _scale_pair(scale_factor) -> tuple[int, int] | None:
    """(sH, sW) from an int or a pair of ints (floats with integer values are accepted)."""
    values = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(v.is_integer() and v >= 1 for v in pair):
        return None
    return int(pair[0]), int(pair[1])


def interpolate(input: Tensor, scale_factor=2, mode: str = "nearest",
                align_corners: bool | None = None) -> Tensor:
    """Upsample (N, C, H, W) to (N, C, sH*H, sW*W) by integer ``scale_factor`` (int or pair).

    ``mode`` is 'nearest' or 'bilinear'. As in PyTorch, ``align_corners`` applies to
    'bilinear' only (None means False) and passing it with 'nearest' is an error.
    Unlike torch's, the second positional argument here is ``scale_factor`` (torch's
    is ``size``): pass it by keyword for code that runs on both.
    """
    op = "interpolate"
    check(isinstance(input, Tensor) and input.ndim == 4, op, "input of rank 4 (N, C, H, W)",
          f"shape {getattr(input, 'shape', type(input).__name__)}")
    check(mode in ("nearest", "bilinear"), op, "mode 'nearest' or 'bilinear'", f"{mode!r}")
    scale = _scale_pair(scale_factor)
    check(scale is not None, op, "scale_factor an integer of 1 or more, or a pair of them",
          f"{scale_factor!r}")
    if mode == "nearest":
        check(align_corners is None, op, "align_corners only with mode 'bilinear' (as PyTorch)",
              f"align_corners={align_corners} with mode 'nearest'")
        return UpsampleNearest.apply(input, scale=scale)
    check(input.dtype.kind == "f", op, "a floating input for mode 'bilinear'",
          f"dtype {input.dtype}")
    return UpsampleBilinear.apply(input, scale=scale, align_corners=bool(align_corners))
