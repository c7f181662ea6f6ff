"""Segmentation losses, each with a fused, hand-written backward.

Shapes: logits (N, C, H, W) (any number of trailing spatial axes works, H and W
included). Targets are never differentiated.

binary_cross_entropy_with_logits(logits, target)
    target: same shape as logits, values in [0, 1]. Stable for logits of any size:
    l = max(z, 0) - z*t + log(1 + exp(-|z|)).
cross_entropy(logits, target)
    target: integer class labels (N, H, W); optional class ``weight`` (C,) and
    ``ignore_index``. 'mean' divides by the summed weights of the counted pixels,
    as PyTorch does.
dice_loss / iou_loss (soft Dice and soft Jaccard), ``smooth`` s = 1 by default:
    One channel (C == 1): p = sigmoid(logits), target (N, 1, H, W) or (N, H, W) in [0, 1].
        Per sample n, with sums over C, H and W:
        dice_n = (2*sum(p*t) + s) / (sum(p) + sum(t) + s)
        iou_n  = (sum(p*t) + s) / (sum(p) + sum(t) - sum(p*t) + s)
        loss_n = 1 - score_n
    Several channels (C > 1): p = softmax(logits, dim=1); target is integer labels
        (N, H, W) (made one-hot) or one-hot (N, C, H, W). The score is computed per
        sample and per class with sums over H and W, then averaged over the classes
        (class 0 left out when ``ignore_background=True``): loss_n = 1 - mean_c score_nc.
    reduction: 'mean' (over the batch, the default), 'sum' or 'none' (one loss per sample).
bce_dice_loss: bce_weight * BCE + (1 - bce_weight) * Dice; with C > 1 the
    cross-entropy takes BCE's place.
"""

from __future__ import annotations

import numpy as np

from ..autograd import Function, Tensor
from ..errors import check, fail

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values, reduction):
    """'mean', 'sum' or 'none' of the per-element losses. As in PyTorch, the mean of an
    empty batch is NaN and its sum 0 (without numpy's warning about an empty mean)."""
    if reduction == "mean":
        return values.mean() if values.size else values.sum() + np.nan
    if reduction == "sum":
        return values.sum()
    return values


def _reduction_grad(grad, reduction, count):
    """The incoming gradient spread back over the values that were reduced (none when
    there were none)."""
    return grad / count if reduction == "mean" and count else grad


class BCEWithLogits(Function):
    @staticmethod
    def forward(ctx, z, target, weight, pos_weight, reduction):
        xp = ctx.backend.xp
        softplus_neg_z = xp.log1p(xp.exp(-xp.abs(z))) + xp.maximum(-z, 0)
        scale = 1 if pos_weight is None else 1 + (pos_weight - 1) * target
        loss = (1 - target) * z + scale * softplus_neg_z
        if weight is not None:
            loss = loss * weight
        ctx.save_for_backward(z, target, weight, scale, reduction)
        return _reduce(loss, reduction)

    @staticmethod
    def backward(ctx, grad):
        z, target, weight, scale, reduction = ctx.saved
        dz = (1 - target) - scale * ctx.backend.sigmoid(-z)
        if weight is not None:
            dz = dz * weight
        return (dz * _reduction_grad(grad, reduction, z.size),)


class CrossEntropy(Function):
    @staticmethod
    def forward(ctx, z, labels, weight, ignore_index, reduction):
        xp = ctx.backend.xp
        log_p = ctx.backend.log_softmax(z, 1)
        counted = labels != ignore_index
        safe_labels = xp.where(counted, labels, 0)
        picked = xp.take_along_axis(log_p, safe_labels[:, None], axis=1)[:, 0]
        pixel_weight = counted.astype(z.dtype)
        if weight is not None:
            pixel_weight = pixel_weight * weight[safe_labels]
        loss = -picked * pixel_weight
        total_weight = pixel_weight.sum()
        ctx.save_for_backward(log_p, safe_labels, pixel_weight, total_weight, reduction)
        if reduction == "mean":
            # No counted pixel (an empty batch, or every label ignored): NaN, as PyTorch.
            with np.errstate(invalid="ignore", divide="ignore"):
                return loss.sum() / total_weight
        return _reduce(loss, reduction)

    @staticmethod
    def backward(ctx, grad):
        log_p, labels, pixel_weight, total_weight, reduction = ctx.saved
        xp = ctx.backend.xp
        classes = xp.arange(log_p.shape[1]).reshape((1, -1) + (1,) * (log_p.ndim - 2))
        dz = xp.exp(log_p) - (labels[:, None] == classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_pixel = pixel_weight * _reduction_grad(grad, reduction, total_weight)
        return (dz * per_pixel[:, None],)


def _dice_score(intersection, total, smooth):
    """(score, slope, offset): soft Dice and its derivative by p, which is affine in t:
    d_score = slope * t + offset. total = sum(p) + sum(t); all keep the sums' dims."""
    denominator = total + smooth
    score = (2 * intersection + smooth) / denominator
    return score, 2 / denominator, -score / denominator


def _iou_score(intersection, total, smooth):
    """(score, slope, offset): soft Jaccard and its derivative by p, which is affine in t:
    d_score = slope * t + offset. union = total - intersection; all keep the sums' dims."""
    union = total - intersection + smooth
    score = (intersection + smooth) / union
    return score, (1 + score) / union, -score / union


_SCORES = {"dice": _dice_score, "iou": _iou_score}


class SoftOverlapLoss(Function):
    """1 - soft Dice or 1 - soft IoU on sigmoid (C == 1) or softmax (C > 1) probabilities.

    One channel runs as two backend passes over the pixels: sigmoid and the three sums
    (``sigmoid_overlap_sums``), then the whole gradient to the logits
    (``sigmoid_overlap_backward``).
    """

    @staticmethod
    def forward(ctx, z, target, kind, smooth, class_mask, reduction):
        backend = ctx.backend
        if z.shape[0] == 0:  # an empty batch: no sample to score, no gradient to route
            ctx.save_for_backward(None, z.shape)
            return _reduce(backend.xp.zeros(0, dtype=z.dtype), reduction)
        binary = z.shape[1] == 1
        # Binary: one score per sample over C, H, W. Multi-class: one per (sample, class).
        if binary:
            p, intersection, p_total, t_total = backend.sigmoid_overlap_sums(z, target)
        else:
            p = backend.softmax(z, 1)
            intersection, p_total, t_total = backend.overlap_sums(p, target, 2)
        score, slope, offset = _SCORES[kind](intersection, p_total + t_total, smooth)
        score = score.reshape(score.shape[: 1 if binary else 2])
        if binary:
            per_sample = 1 - score
        else:
            per_sample = 1 - (score * class_mask).sum(axis=1) / class_mask.sum()
        ctx.save_for_backward(p, target, slope, offset, binary, class_mask, reduction)
        return _reduce(per_sample, reduction)

    @staticmethod
    def backward(ctx, grad):
        if ctx.saved[0] is None:
            return (ctx.backend.xp.zeros(ctx.saved[1], dtype=grad.dtype),)
        p, target, slope, offset, binary, class_mask, reduction = ctx.saved
        xp = ctx.backend.xp
        n = p.shape[0]
        g = _reduction_grad(grad, reduction, n)
        g = xp.broadcast_to(g, (n,)).reshape((n,) + (1,) * (p.ndim - 1))
        if binary:
            return (ctx.backend.sigmoid_overlap_backward(p, target, -g * slope, -g * offset),)
        weights = (class_mask / class_mask.sum()).reshape((1, -1) + (1,) * (p.ndim - 2))
        dp = -g * weights * (slope * target + offset)
        return (p * (dp - (dp * p).sum(axis=1, keepdims=True)),)


# ---- public functions -------------------------------------------------------------

def _check_reduction(op, reduction):
    if reduction not in REDUCTIONS:
        fail(op, f"reduction in {REDUCTIONS}", f"'{reduction}'")


def _check_logits(op, logits):
    if logits.ndim < 2:
        fail(op, "logits of rank 2 or more (N, C, ...)", f"shape {logits.shape}")
    if logits.dtype.kind != "f":
        fail(op, "floating logits", f"dtype {logits.dtype}")


def _float_target(op, logits, target):
    """A target of the logits' shape and dtype, as a raw backend array."""
    if target.shape != logits.shape:
        fail(op, f"target of the logits' shape {logits.shape}", f"target shape {target.shape}")
    if target.dtype.kind == "f" and target.dtype != logits.dtype:
        fail(op, f"target of dtype {logits.dtype}", f"target dtype {target.dtype}")
    return target.data.astype(logits.data.dtype, copy=False)


def _label_target(op, logits, target):
    n, c, *spatial = logits.shape
    if target.shape != (n, *spatial):
        fail(op, f"integer class labels of shape {(n, *spatial)} for logits {logits.shape}",
             f"target shape {target.shape}")
    if target.dtype.kind not in "iu":
        fail(op, "an integer label dtype", f"dtype {target.dtype}")
    return target.data.astype(np.int64, copy=False)


def _const(value, like: Tensor, op, name, shape=None):
    if value is None:
        return None
    array = value.data if isinstance(value, Tensor) else like.backend.asarray(np.asarray(value))
    array = array.astype(like.data.dtype, copy=False)
    if shape is not None:
        if tuple(array.shape) != shape:
            fail(op, f"{name} of shape {shape}", f"shape {tuple(array.shape)}")
    return array


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight=None,
                                     reduction: str = "mean", pos_weight=None) -> Tensor:
    op = "binary_cross_entropy_with_logits"
    _check_logits(op, input)
    _check_reduction(op, reduction)
    weight, pos_weight = (_const(w, input, op, name) for w, name in
                          ((weight, "weight"), (pos_weight, "pos_weight")))
    for name, array in (("weight", weight), ("pos_weight", pos_weight)):
        if array is not None:
            fits = len(array.shape) <= input.ndim and all(
                a in (1, b) for a, b in zip(array.shape[::-1], input.shape[::-1], strict=False))
            check(fits, op, f"{name} that broadcasts to the input's shape {input.shape} "
                  "(e.g. (C, 1, 1) per channel)", f"shape {tuple(array.shape)}")
    return BCEWithLogits.apply(
        input,
        target=_float_target(op, input, target),
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
    )


def cross_entropy(input: Tensor, target: Tensor, weight=None, ignore_index: int = -100,
                  reduction: str = "mean") -> Tensor:
    op = "cross_entropy"
    _check_logits(op, input)
    _check_reduction(op, reduction)
    labels = _label_target(op, input, target)
    classes = input.shape[1]
    # A label outside [0, C) would silently index another class (or wrap around).
    stray = ((labels < 0) | (labels >= classes)) & (labels != ignore_index)
    check(not bool(stray.any()), op,
          f"labels in [0, {classes}) or equal to ignore_index={ignore_index}",
          f"labels {sorted({int(v) for v in labels[stray][:8].tolist()})}")
    return CrossEntropy.apply(
        input,
        labels=labels,
        weight=_const(weight, input, op, "weight", shape=(input.shape[1],)),
        ignore_index=ignore_index,
        reduction=reduction,
    )


def _overlap_target(op, logits, target):
    n, c, *spatial = logits.shape
    if c == 1 and target.shape == (n, *spatial):
        target = target.reshape(n, 1, *spatial)
    if c > 1 and target.dtype.kind in "iu":
        labels = _label_target(op, logits, target)
        xp = logits.backend.xp
        one_hot = labels[:, None] == xp.arange(c).reshape((1, c) + (1,) * len(spatial))
        return one_hot.astype(logits.data.dtype)
    return _float_target(op, logits, target)


def _overlap_loss(kind, logits, target, smooth, ignore_background, reduction):
    op = f"{kind}_loss"
    _check_logits(op, logits)
    _check_reduction(op, reduction)
    c = logits.shape[1]
    if ignore_background and c < 2:
        fail(op, "at least 2 channels (softmax) with ignore_background=True", f"{c} channel(s)")
    class_mask = np.ones(c, dtype=logits.dtype)
    if ignore_background:
        class_mask[0] = 0
    return SoftOverlapLoss.apply(
        logits,
        target=_overlap_target(op, logits, target),
        kind=kind,
        smooth=float(smooth),
        class_mask=logits.backend.asarray(class_mask),
        reduction=reduction,
    )


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0,
              ignore_background: bool = False, reduction: str = "mean") -> Tensor:
    """1 - soft Dice; see the module docstring for the exact definition."""
    return _overlap_loss("dice", logits, target, smooth, ignore_background, reduction)


def iou_loss(logits: Tensor, target: Tensor, smooth: float = 1.0,
             ignore_background: bool = False, reduction: str = "mean") -> Tensor:
    """1 - soft IoU (Jaccard); see the module docstring for the exact definition."""
    return _overlap_loss("iou", logits, target, smooth, ignore_background, reduction)


def bce_dice_loss(logits: Tensor, target: Tensor, bce_weight: float = 0.5,
                  smooth: float = 1.0) -> Tensor:
    """bce_weight * (BCE or cross-entropy) + (1 - bce_weight) * Dice, both batch means."""
    check(0.0 <= bce_weight <= 1.0, "bce_dice_loss", "bce_weight in [0, 1]", f"{bce_weight}")
    if logits.shape[1] == 1:
        n, _, *spatial = logits.shape
        binary_target = target.reshape(n, 1, *spatial) if target.ndim == logits.ndim - 1 else target
        pixel = binary_cross_entropy_with_logits(logits, binary_target)
    else:
        pixel = cross_entropy(logits, target)
    return pixel * bce_weight + dice_loss(logits, target, smooth=smooth) * (1 - bce_weight)
