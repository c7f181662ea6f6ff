"""Upsampling by an integer factor: nearest and bilinear, as ``F.interpolate``.

Shapes: x (N, C, H, W) -> y (N, C, s*H, s*W) for ``scale_factor`` s.

Bilinear interpolation is separable, so it is two small matrix products:
y = A_h @ x @ A_w.T, where row o of A_h holds the two weights that output row o
takes from the input rows around its source position. The backward is the transpose:
dx = A_h.T @ dy @ A_w. Source positions follow PyTorch:
    align_corners=False: src = (o + 0.5) / s - 0.5, clamped below at 0
    align_corners=True:  src = o * (H - 1) / (s*H - 1)
"""

from __future__ import annotations

import numpy as np

from ..autograd import Function, Tensor
from ..errors import check


def interpolation_matrix(size: int, scale: int, align_corners: bool, dtype) -> np.ndarray:
    """(scale*size, size) matrix of linear-interpolation weights along one axis."""
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
    np.add.at(matrix, (np.arange(out), low), 1 - frac)
    np.add.at(matrix, (np.arange(out), high), frac)
    return matrix.astype(dtype)


class UpsampleNearest(Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.repeat(scale, axis=2).repeat(scale, axis=3)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved
        n, c, h, w = grad.shape
        # Each input pixel was copied into a scale x scale block: sum the block.
        return (grad.reshape(n, c, h // scale, scale, w // scale, scale).sum(axis=(3, 5)),)


class UpsampleBilinear(Function):
    @staticmethod
    def forward(ctx, x, scale, align_corners):
        xp = ctx.backend.xp
        rows = ctx.backend.asarray(interpolation_matrix(x.shape[2], scale, align_corners, x.dtype))
        cols = ctx.backend.asarray(interpolation_matrix(x.shape[3], scale, align_corners, x.dtype))
        ctx.save_for_backward(rows, cols)
        return xp.matmul(xp.matmul(rows, x), cols.T)

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.saved
        xp = ctx.backend.xp
        return (xp.matmul(xp.matmul(rows.T, grad), cols),)


def interpolate(input: Tensor, scale_factor: int = 2, mode: str = "nearest",
                align_corners: bool | None = None) -> Tensor:
    """Upsample (N, C, H, W) by an integer ``scale_factor`` ('nearest' or 'bilinear')."""
    op = "interpolate"
    check(input.ndim == 4, op, "input of rank 4 (N, C, H, W)", f"shape {input.shape}")
    check(mode in ("nearest", "bilinear"), op, "mode 'nearest' or 'bilinear'", f"'{mode}'")
    check(float(scale_factor).is_integer() and scale_factor >= 1, op,
          "an integer scale_factor of 1 or more", f"{scale_factor}")
    scale = int(scale_factor)
    if mode == "nearest":
        check(align_corners is None, op, "align_corners only with mode 'bilinear'",
              f"align_corners={align_corners}")
        return UpsampleNearest.apply(input, scale=scale)
    return UpsampleBilinear.apply(input, scale=scale, align_corners=bool(align_corners))
