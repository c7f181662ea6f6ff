"""Channel concatenation, center cropping and padding: the glue of a U-Net's skips.

Shapes: concat joins (N, C_i, H, W) tensors into (N, sum C_i, H, W) (any ``dim`` works;
the other sizes must match). center_crop takes (N, C, H, W) to (N, C, h, w), cutting
(H - h) // 2 rows from the top and the rest from the bottom, the same for columns,
which is what the paper's unpadded U-Net does to its skips. pad zero-pads H and W by
(left, right, top, bottom), as ``F.pad``; negative amounts crop.
"""

from __future__ import annotations

from ..autograd import Function, Tensor
from ..errors import check, fail


class Concat(Function):
    @staticmethod
    def forward(ctx, *arrays, dim):
        ctx.save_for_backward([a.shape[dim] for a in arrays], dim)
        return ctx.backend.xp.concatenate(arrays, axis=dim)

    @staticmethod
    def backward(ctx, grad):
        sizes, dim = ctx.saved
        pieces, start = [], 0
        for size in sizes:
            index = [slice(None)] * grad.ndim
            index[dim] = slice(start, start + size)
            pieces.append(grad[tuple(index)])
            start += size
        return tuple(pieces)


class CenterCrop(Function):
    @staticmethod
    def forward(ctx, x, size):
        h, w = size
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        ctx.save_for_backward(x.shape, top, left)
        return x[:, :, top : top + h, left : left + w]

    @staticmethod
    def backward(ctx, grad):
        shape, top, left = ctx.saved
        dx = ctx.backend.xp.zeros(shape, dtype=grad.dtype)
        dx[:, :, top : top + grad.shape[2], left : left + grad.shape[3]] = grad
        return (dx,)


def concat(tensors, dim: int = 1) -> Tensor:
    """Join tensors along ``dim`` (default: channels), like ``torch.cat``."""
    tensors = list(tensors)
    op = "concat"
    check(len(tensors) >= 1, op, "at least one tensor", "none")
    first = tensors[0]
    if not -first.ndim <= dim < first.ndim:
        fail(op, f"dim in [-{first.ndim}, {first.ndim})", f"dim {dim}")
    dim %= first.ndim
    for t in tensors[1:]:
        same_rest = t.ndim == first.ndim and all(
            a == b for i, (a, b) in enumerate(zip(t.shape, first.shape, strict=True)) if i != dim
        )
        if not same_rest:
            fail(op, f"shapes equal to {first.shape} except in dim {dim}",
                 f"shapes {[x.shape for x in tensors]}")
        if t.dtype != first.dtype:
            fail(op, f"tensors of one dtype ({first.dtype})",
                 f"dtypes {[str(x.dtype) for x in tensors]}")
    return Concat.apply(*tensors, dim=dim)


cat = concat


def center_crop(input: Tensor, size) -> Tensor:
    """Cut the central ``size`` = (h, w) (or an int, or a tensor whose H, W to match)."""
    op = "center_crop"
    if input.ndim != 4:
        fail(op, "input of rank 4 (N, C, H, W)", f"shape {input.shape}")
    if isinstance(size, Tensor):
        size = size.shape[2:]
    elif isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if not (1 <= h <= input.shape[2] and 1 <= w <= input.shape[3]):
        fail(op, f"a crop size between (1, 1) and {input.shape[2:]}", f"size {(h, w)}")
    return CenterCrop.apply(input, size=(h, w))


class Pad(Function):
    @staticmethod
    def forward(ctx, x, pads):
        left, right, top, bottom = pads
        h, w = x.shape[2] + top + bottom, x.shape[3] + left + right
        y = ctx.backend.xp.zeros(x.shape[:2] + (h, w), dtype=x.dtype)
        # Negative pads crop, so copy only the window where input and output overlap.
        y[:, :, max(top, 0) : h - max(bottom, 0), max(left, 0) : w - max(right, 0)] = x[
            :, :, max(-top, 0) : x.shape[2] - max(-bottom, 0),
            max(-left, 0) : x.shape[3] - max(-right, 0),
        ]
        ctx.save_for_backward(x.shape, pads)
        return y

    @staticmethod
    def backward(ctx, grad):
        _, (left, right, top, bottom) = ctx.saved
        # Padding's adjoint is cropping by the same amounts, i.e. padding by their negatives.
        return (Pad.forward(ctx, grad, (-left, -right, -top, -bottom)),)


def pad(input: Tensor, pad, value: float = 0.0) -> Tensor:
    """Zero-pad H and W: ``pad`` = (left, right, top, bottom), as ``F.pad``; negative crops."""
    op = "pad"
    check(input.ndim == 4, op, "input of rank 4 (N, C, H, W)", f"shape {input.shape}")
    check(len(pad) == 4 and all(isinstance(p, int) for p in pad), op,
          "pad = (left, right, top, bottom) of ints", f"{pad!r}")
    check(value == 0.0, op, "constant zero padding", f"value {value}")
    left, right, top, bottom = pad
    h, w = input.shape[2] + top + bottom, input.shape[3] + left + right
    check(h >= 1 and w >= 1, op, "a padded size of at least 1 x 1",
          f"{(h, w)} from {input.shape[2:]} with pad {tuple(pad)}")
    return Pad.apply(input, pads=tuple(pad))
