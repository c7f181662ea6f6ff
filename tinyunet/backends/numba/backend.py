"""NumbaBackend: each conv method plans its pass once (policy.plan_conv) and runs the plan.

Shapes: x (N, C, H, W); w (O, C, kH, kW); y and dy (N, O, Ho, Wo); all C-contiguous
numpy arrays, so ``xp`` is numpy and tensors move freely between this backend and
``numpy``. The paths themselves are mixed in from their family modules: im2col.py,
winograd.py, direct.py, pool.py, elementwise.py and optim.py; docs/backend-numba.md
describes them.
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import elementwise as elementwise_kernels
from ...kernels.cpu.runtime import run
from ..interface import Backend, ConvGeometry
from . import policy
from .direct import DirectConvs
from .elementwise import Elementwise
from .im2col import Im2colConvs
from .optim import OptimizerUpdates
from .policy import ConvPlan
from .pool import MaxPool
from .scratch import contiguous, flipped
from .winograd import WinogradConvs


def _tile(plan: ConvPlan) -> int:
    """The output tile of a Winograd plan: 4 for winograd4, 2 for winograd2."""
    return 4 if plan.algo == "winograd4" else 2


class NumbaBackend(DirectConvs, WinogradConvs, Im2colConvs, MaxPool, Elementwise,
                   OptimizerUpdates, Backend):
    """The fast CPU backend: numba kernels for data movement, BLAS GEMMs for the arithmetic."""

    name = "numba"
    xp = np

    def __init__(self) -> None:
        # Scratch arrays per (dtype, use) (scratch.py).
        self._scratch: dict[tuple[np.dtype, str], np.ndarray] = {}
        # The optimizer updates' typed Lists, by role, and their piece tables (optim.py).
        self._lists: dict[tuple[str, int], tuple] = {}
        self._piece_tables: dict[tuple, np.ndarray] = {}

    def asarray(self, host_array: np.ndarray) -> np.ndarray:
        return np.asarray(host_array)

    def to_numpy(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    # ---- convolution: forward --------------------------------------------------------------
    def conv2d(self, x: np.ndarray, w: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
        return self._conv2d(x, w, geometry, None)

    def conv2d_bias_relu(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                         geometry: ConvGeometry) -> np.ndarray:
        bias = np.zeros(w.shape[0], dtype=x.dtype) if b is None else contiguous(b)
        return self._conv2d(x, w, geometry, bias)

    def _conv2d(self, x, w, geometry, relu_bias, plan=None):
        """conv2d, then relu(y + relu_bias[o]) in the same call unless ``relu_bias`` is
        None; by ``plan``, else by the forward's plan."""
        x, w = contiguous(x), contiguous(w)
        n, c, h, width = x.shape
        o, _, kh, kw = w.shape
        ho, wo = geometry.output_hw((h, width), (kh, kw))
        if plan is None:
            plan = policy.plan_conv("forward", n, c, o, (h, width), (kh, kw), geometry)
        y = np.empty((n, o, ho, wo), dtype=x.dtype)
        match plan.algo:
            case "winograd4" | "winograd2":
                # The output transform applies bias and ReLU itself.
                self._conv2d_winograd(x, self._winograd_filters(w, _tile(plan)), _tile(plan),
                                      geometry.padding, relu_bias, y, plan.band_bytes)
                return y
            case "direct":
                self._conv2d_direct(x, w, geometry, y)
            case "pointwise":
                self._conv2d_pointwise(x, w, y)
            case "row_shift":
                self._conv2d_row_shifts(x, w, geometry, y, plan.band_bytes)
            case _:  # im2col
                self._conv2d_gemms(x, w.reshape(o, -1), geometry, (kh, kw), y, plan.band_bytes)
        if relu_bias is not None:
            run(elementwise_kernels.bias_relu, y.size, y.reshape(n, o, ho * wo), relu_bias)
        return y

    # ---- convolution: gradients ------------------------------------------------------------
    def conv2d_grad_input(self, dy: np.ndarray, w: np.ndarray, geometry: ConvGeometry,
                          input_hw: tuple[int, int]) -> np.ndarray:
        plan = policy.plan_conv("grad_input", dy.shape[0], w.shape[1], w.shape[0], input_hw,
                                w.shape[2:], geometry)
        return self._grad_input(dy, w, geometry, input_hw, plan)

    def conv2d_grad_weight(self, dy: np.ndarray, x: np.ndarray, geometry: ConvGeometry,
                           kernel_hw: tuple[int, int]) -> np.ndarray:
        plan = policy.plan_conv("grad_weight", x.shape[0], x.shape[1], dy.shape[1],
                                x.shape[2:], kernel_hw, geometry)
        return self._grad_weight(dy, x, geometry, kernel_hw, plan)

    def conv2d_grads(self, dy: np.ndarray, x: np.ndarray, w: np.ndarray,
                     geometry: ConvGeometry, need_input: bool = True, need_weight: bool = True
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
        n, c = x.shape[:2]
        o, _, kh, kw = w.shape
        layer = (n, c, o, x.shape[2:], (kh, kw), geometry)
        input_plan = policy.plan_conv("grad_input", *layer) if need_input else None
        weight_plan = policy.plan_conv("grad_weight", *layer) if need_weight else None
        if (input_plan and weight_plan and input_plan.algo == weight_plan.algo == "direct"
                and geometry.padding == (1, 1, 1, 1)):
            return self._grads_direct_same(contiguous(dy), contiguous(x), contiguous(w))
        dx = self._grad_input(dy, w, geometry, x.shape[2:], input_plan) if need_input else None
        dw = self._grad_weight(dy, x, geometry, (kh, kw), weight_plan) if need_weight else None
        return dx, dw

    def _grad_input(self, dy, w, geometry, input_hw, plan):
        dy, w = contiguous(dy), contiguous(w)
        match plan.algo:
            case "col2im" | "pixel_shuffle":
                return self._grad_input_transposed(dy, w, geometry, input_hw,
                                                   plan.algo == "pixel_shuffle")
            case "winograd4" | "winograd2":
                # The adjoint conv, with its filter transforms made from w directly.
                adjoint = policy.adjoint_geometry(w.shape[2:], geometry)
                dx = np.empty((dy.shape[0], w.shape[1], *input_hw), dtype=dy.dtype)
                self._conv2d_winograd(dy, self._winograd_filters(w, _tile(plan), adjoint=True),
                                      _tile(plan), adjoint.padding, None, dx, plan.band_bytes)
                return dx
            case _:
                # The adjoint conv: the flipped, transposed weight and the complementary
                # padding; its output is exactly input_hw.
                adjoint = policy.adjoint_geometry(w.shape[2:], geometry)
                return self._conv2d(dy, flipped(w), adjoint, None, plan)

    def _grad_weight(self, dy, x, geometry, kernel_hw, plan):
        dy, x = contiguous(dy), contiguous(x)
        match plan.algo:
            case "winograd4" | "winograd2":
                return self._grad_weight_winograd(dy, x, _tile(plan), geometry.padding,
                                                  plan.band_bytes)
            case "direct":
                return self._grad_weight_direct(dy, x, geometry)
            case "pointwise":
                return self._grad_weight_pointwise(dy, x)
            case "row_shift":
                return self._grad_weight_row_shifts(dy, x, geometry, kernel_hw, plan.band_bytes)
            case _:  # im2col
                return self._grad_weight_gemms(dy, x, geometry, kernel_hw, plan.band_bytes)

    # ---- transposed convolution ------------------------------------------------------------
    def conv_transpose2d_concat(self, skip: np.ndarray, x: np.ndarray, w: np.ndarray,
                                b: np.ndarray | None, geometry: ConvGeometry,
                                output_hw: tuple[int, int]) -> np.ndarray:
        # conv_transpose2d(x, w) is the input gradient of the conv from output_hw to x.
        plan = policy.plan_conv("grad_input", x.shape[0], w.shape[1], w.shape[0], output_hw,
                                w.shape[2:], geometry)
        if plan.algo != "pixel_shuffle":
            return super().conv_transpose2d_concat(skip, x, w, b, geometry, output_hw)
        return self._up_conv_into_concat(skip, contiguous(x), contiguous(w), b, output_hw)

    def conv_transpose2d_grads(self, dy: np.ndarray, x: np.ndarray, w: np.ndarray,
                               geometry: ConvGeometry, need_input: bool = True,
                               need_weight: bool = True, need_bias: bool = True
                               ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        if not (need_input and need_weight and policy.share_up_conv_columns(
                dy.shape[0], dy.shape[1], x.shape[2:], dy.shape[2:], w.shape[2:], geometry,
                dy.itemsize)):
            return super().conv_transpose2d_grads(dy, x, w, geometry, need_input, need_weight,
                                                  need_bias)
        return self._up_conv_grads(dy, contiguous(x), contiguous(w), need_bias)
