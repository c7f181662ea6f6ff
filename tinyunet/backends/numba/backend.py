"""The fast CPU backend: numba kernels for data movement, BLAS GEMMs for the arithmetic.

Shapes: x (N, C, H, W); w (O, C, kH, kW); y (N, O, Ho, Wo), all C-contiguous numpy
arrays, so ``xp`` is numpy and tensors move freely between this backend and ``numpy``.

How a convolution runs here (``python -m benchmarks.ops`` times each U-Net layer):

* 3x3 stride-1 convs with many channels run as Winograd convolutions (Lavin & Gray
  2016), unless the direct kernels below take them (the weight gradient tries
  Winograd first; see conv2d_grad_weight): F(4x4, 3x3) computes each 4x4 block of
  outputs from a 6x6 input tile with 36 multiplies instead of 144, F(2x2, 3x3) each 2x2
  block from a 4x4 tile with 16 instead of 36, so alpha^2 GEMMs (C_out, C_in) @ (C_in,
  tiles) (alpha = 6 or 4) do 4x or 2.25x less arithmetic than im2col's one. Those GEMMs
  are shared out among the threads, whole GEMMs each (blas.gemm). F(4x4) takes
  output sides that are multiples of 4 on maps 16 or more wide, with enough tiles
  (``WINOGRAD_4X4_MIN_WIDTH``, ``WINOGRAD_4X4_MIN_TILES``, ``WINOGRAD_4X4_MIN_CHANNELS``;
  fewer channels on maps narrower than ``WINOGRAD_4X4_NARROW_BELOW_WIDTH``), F(2x2) the
  8-wide deep levels and other even sides (``WINOGRAD_MIN_CHANNELS``,
  ``WINOGRAD_MIN_WORK``). The forward, the input gradient (the adjoint conv, whose
  filter transforms are the forward's with the taps reversed) and the weight gradient
  (the adjoint of the forward's steps) all take them, band by band of tile rows
  (``WINOGRAD_BUDGET``). Rounding: each output sums other products than im2col's,
  within float32 rounding of the GEMM paths (F(4x4)'s transforms lose a few more bits:
  about 5e-6 of the largest output on 64 channels).
  Inf and NaN: the transforms add and subtract neighbouring values whose coefficients
  cancel only in exact arithmetic, so an Inf input can give NaN where the other paths
  give Inf, and under F(4x4) a NaN input reaches outputs of its 4x4 tiles beyond its
  3x3 neighbourhood (outputs outside those tiles are unaffected).
* 3x3 stride-1 convs with few channels on wide maps (``DIRECT_RULES``, and
  ``DIRECT_OVER_WINOGRAD_RULES`` where Winograd competes: the U-Net's outer levels)
  skip im2col and BLAS: a padded copy of the input and the direct kernels of direct3x3,
  for the forward, the input gradient (again a conv, with the flipped weight) and the
  weight gradient. Their GEMMs would be skinny (16 rows over
  65536 pixels) and run far below BLAS's peak. The weight gradient's direct kernel
  also wins on somewhat more channels (``GRAD_WEIGHT_DIRECT_RULES``).
* Row stride 1 on maps of ROW_SHIFT_MIN_PIXELS or more, with no more output channels
  than input channels (most of the U-Net's other 3x3 convs): columns of the kernel's
  width only, kH times fewer than im2col's, over a band of input rows; one GEMM with
  the weight's kernel rows stacked, then ``row_shift_sum`` adds each kernel row's
  share, shifted by its row, into the output.
* Every other conv is im2col + BLAS GEMMs. Forward: output rows are processed in
  bands. ``im2col_rows`` writes one band's columns, padding included, straight into
  a reusable buffer of at most ``COLUMN_BUDGET`` bytes, and one GEMM writes
  (O, band pixels) into the output. The buffer stays in cache between the two, and
  no padded copy or full column matrix of the batch is made. Small maps (deep
  levels) put several images side by side into one wider GEMM instead of N narrow
  ones.
* Input gradient, stride 1: a forward conv of dy with the weight flipped and
  transposed (the adjoint), so it takes one of the paths above and needs no col2im.
  Other strides (the U-Net's 2x2 stride-2 transposed conv): one batched GEMM and
  one gather (``col2im_gather``), which for 2x2 stride 2 is a pixel shuffle. Where a
  direct 3x3 'same' conv's input and weight gradients are both wanted
  (``conv2d_grads``), they read one padded dy; the up-conv's three gradients
  (``conv_transpose2d_grads``) one space-to-depth of dy.
* Weight gradient (row stride 1, maps of ROW_SHIFT_MIN_PIXELS or more): columns of
  the kernel's width only, over the input rows of a band; each kernel row is a
  shifted window of that one matrix and one GEMM, so kH times fewer columns are
  written than by im2col. Other strides and smaller maps use the forward's bands.
  Either way the batch's columns never exist all at once.
* 1x1 stride-1 convs (the U-Net's head) skip im2col: the input already is the
  column matrix.
* The weight gradients' GEMMs dY @ X^T (Winograd's per tile value, im2col's on
  whole images, the 1x1 conv's) multiply two matrices of few rows over a long shared
  dimension, which BLAS runs far below its peak. Where one has at most
  ``GRAM_MAX_ROWS`` rows and the shared dimension is long enough (``_gram_wins``),
  gemm.stacked_gram computes them as dot products instead. im2col's bands of rows
  of one image and the row-shift path's windows are views with gaps and stay in BLAS.

Every kernels/cpu kernel but the direct convs goes through ``_run``: calls on fewer than
``PARALLEL_MIN_ELEMENTS`` elements take the kernel's serial compile.
"""

from __future__ import annotations

import numpy as np

from ...kernels.cpu import direct3x3 as direct3x3_kernels
from ...kernels.cpu import elementwise as elementwise_kernels
from ...kernels.cpu import im2col as im2col_kernels
from ...kernels.cpu.runtime import run
from ..interface import Backend, ConvGeometry
from . import blas, policy
from .elementwise import Elementwise
from .im2col import Im2colConvs
from .optim import OptimizerUpdates
from .pool import MaxPool
from .scratch import _contiguous, _flipped
from .winograd import WinogradConvs


class NumbaBackend(WinogradConvs, Im2colConvs, MaxPool, Elementwise, OptimizerUpdates, Backend):
    name = "numba"
    xp = np

    def __init__(self):
        # Scratch arrays per (dtype, use), grown on demand and reused across calls and
        # steps, so the temporaries that scale with the maps (columns, padded copies,
        # GEMM products, Winograd tiles) are allocated once; those that scale with a
        # layer's weights (Winograd's transformed filters and dU sums, alpha^2 * C_out *
        # C_in values) are fresh arrays each call, which malloc reuses under
        # tinyunet.memory.keep_freed_memory. A fresh
        # multi-MB array costs its page faults on every call (measured: a 2x2 transposed
        # conv to a 128x128 map took 4.3 ms with fresh columns, 2.7 ms reusing them).
        self._scratch: dict[tuple[np.dtype, str], np.ndarray] = {}
        # The optimizer updates' typed Lists, by role, and their piece tables (_spans).
        self._lists: dict[str, tuple] = {}
        self._piece_tables: dict[tuple, np.ndarray] = {}

    def asarray(self, host_array):
        return np.asarray(host_array)

    def to_numpy(self, array):
        return np.asarray(array)

    def conv2d(self, x, w, geometry: ConvGeometry):
        return self._conv2d(x, w, geometry, None)

    def conv2d_bias_relu(self, x, w, b, geometry: ConvGeometry):
        bias = np.zeros(w.shape[0], dtype=x.dtype) if b is None else _contiguous(b)
        return self._conv2d(x, w, geometry, bias)

    def _conv2d(self, x, w, geometry, relu_bias):
        """conv2d, then relu(y + relu_bias[o]) in the same call unless ``relu_bias`` is None."""
        x, w = _contiguous(x), _contiguous(w)
        n, c, h, width = x.shape
        o, _, kh, kw = w.shape
        ho, wo = geometry.output_hw((h, width), (kh, kw))
        w2 = w.reshape(o, c * kh * kw)
        y = np.empty((n, o, ho, wo), dtype=x.dtype)
        direct, tile = policy._forward_route(c, o, (kh, kw), geometry, n, (ho, wo))
        if tile:
            filters = self._winograd_filters(w, tile)
            self._conv2d_winograd(x, filters, tile, geometry.padding, relu_bias, y)
            return y
        if direct:
            direct3x3_kernels.conv3x3_forward(self._padded(x, geometry.padding), w, y)
        elif (kh, kw) == (1, 1) and geometry.stride == (1, 1) and not any(geometry.padding):
            # One input channel makes each image's GEMM an outer product, which BLAS ran
            # 10x slower than numpy's broadcast multiply (the input gradient of B's
            # one-class head: 4.7 vs 0.47 ms).
            if c == 1:
                np.multiply(w2, x.reshape(n, c, h * width), out=y.reshape(n, o, ho * wo))
            else:
                blas.gemm(w2, x.reshape(n, c, h * width), y.reshape(n, o, ho * wo))
        elif (geometry.stride[0] == 1 and kh > 1 and ho * wo >= policy.ROW_SHIFT_MIN_PIXELS
              and o <= c):
            self._conv2d_row_shifts(x, w, geometry, y)
        else:
            self._conv2d_gemms(x, w2, geometry, (kh, kw), y)
        if relu_bias is not None:
            run(elementwise_kernels.bias_relu, y.size, y.reshape(n, o, ho * wo), relu_bias)
        return y

    def conv2d_grad_input(self, dy, w, geometry: ConvGeometry, input_hw):
        dy, w = _contiguous(dy), _contiguous(w)
        n, o, ho, wo = dy.shape
        _, c, kh, kw = w.shape
        (dh, dw), (top, bottom, left, right) = geometry.dilation, geometry.padding
        reach_h, reach_w = dh * (kh - 1), dw * (kw - 1)
        adjoint_pads = (reach_h - top, reach_h - bottom, reach_w - left, reach_w - right)
        if geometry.stride == (1, 1) and min(adjoint_pads) >= 0:
            adjoint = ConvGeometry((1, 1), adjoint_pads, geometry.dilation)
            # Routed as conv2d would route the adjoint conv, but a Winograd one gets its
            # filter transforms from w directly, with no flipped copy.
            _, tile = policy._forward_route(o, c, (kh, kw), adjoint, n, input_hw)
            if tile:
                dx = np.empty((n, c, *input_hw), dtype=dy.dtype)
                self._conv2d_winograd(dy, self._winograd_filters(w, tile, adjoint=True), tile,
                                      adjoint_pads, None, dx)
                return dx
            # The adjoint of a stride-1 conv is a conv with the flipped, transposed
            # weight and the complementary padding; its output is exactly input_hw.
            return self.conv2d(dy, _flipped(w), adjoint)
        (sh, sw) = geometry.stride
        dx = np.empty((n, c, *input_hw), dtype=dy.dtype)
        # One batched GEMM into the scratch buffer, then one gather; for the U-Net's 2x2
        # stride-2 transposed conv the gather is a pixel shuffle (depth_to_space_2x2).
        cols = self._transposed_columns(dy, w)
        if policy._is_2x2_stride2((kh, kw), geometry) and tuple(input_hw) == (2 * ho, 2 * wo):
            run(im2col_kernels.depth_to_space_2x2, dx.size, cols, np.zeros(c, dy.dtype), dx, 0)
        else:
            run(im2col_kernels.col2im_gather, dx.size, cols, kh, kw, sh, sw, top, left, dh, dw,
                ho, wo, dx)
        return dx

    def conv_transpose2d_concat(self, skip, x, w, b, geometry, output_hw):
        x, w = _contiguous(x), _contiguous(w)
        n, h, width = x.shape[0], x.shape[2], x.shape[3]
        if not (policy._is_2x2_stride2(w.shape[2:], geometry)
                and tuple(output_hw) == (2 * h, 2 * width)):
            return super().conv_transpose2d_concat(skip, x, w, b, geometry, output_hw)
        c_skip, c_up = skip.shape[1], w.shape[1]
        joined = np.empty((n, c_skip + c_up, *output_hw), dtype=x.dtype)
        joined[:, :c_skip] = skip
        bias = np.zeros(c_up, x.dtype) if b is None else _contiguous(b)
        run(im2col_kernels.depth_to_space_2x2, n * c_up * 4 * h * width,
            self._transposed_columns(x, w), bias, joined, c_skip)
        return joined

    def conv_transpose2d_grads(self, dy, x, w, geometry: ConvGeometry, need_input=True,
                               need_weight=True, need_bias=True):
        n, c_up = dy.shape[:2]
        c_in, h, width = x.shape[1:]
        depth, pixels = 4 * c_up, n * h * width
        # The U-Net's up-conv: dy's columns (space to depth, read straight from the
        # concat's gradient) once for all three gradients, which the interface's way
        # makes twice after a contiguous copy of dy.
        if not (policy._is_2x2_stride2(w.shape[2:], geometry)
                and dy.shape[2:] == (2 * h, 2 * width)
                and need_input and need_weight
                and depth * pixels * dy.itemsize <= policy.COLUMN_BUDGET):
            return super().conv_transpose2d_grads(dy, x, w, geometry, need_input, need_weight,
                                                  need_bias)
        x, w = _contiguous(x), _contiguous(w)
        cols = self._buffer(dy.dtype, depth * pixels).reshape(depth, pixels)
        run(im2col_kernels.im2col_2x2_stride2, cols.size, dy, 0, n, 0, h, width, cols)
        # dx = conv2d(dy, w): w (C_in, C_up, 2, 2) is that conv's (O, C, kH, kW).
        wide = self._buffer(dy.dtype, c_in * pixels, "product").reshape(c_in, pixels)
        blas.gemm(w.reshape(c_in, depth), cols, wide)
        dx = np.empty(x.shape, dtype=dy.dtype)  # not a view of the buffer, reused below
        dx[...] = wide.reshape(c_in, n, h, width).transpose(1, 0, 2, 3)
        # dW = x's pixels (the conv's output gradient) by channel, against the columns.
        wide.reshape(c_in, n, h * width)[...] = x.reshape(n, c_in, h * width).transpose(1, 0, 2)
        dw = np.zeros((c_in, depth), dtype=dy.dtype)
        blas.add_gram(wide, cols, dw)
        db = None
        if need_bias:
            # Rows 4c .. 4c+3 of the columns are channel c's pixels.
            db = np.empty(c_up, dtype=dy.dtype)
            run(elementwise_kernels.channel_sums, cols.size, cols.reshape(1, c_up, 4 * pixels),
                db)
        return dx, dw.reshape(w.shape), db

    def conv2d_grads(self, dy, x, w, geometry: ConvGeometry, need_input=True, need_weight=True):
        n, o, ho, wo = dy.shape
        c = x.shape[1]
        # A 3x3 'same' conv's input gradient is a 3x3 'same' conv of dy: where it and the
        # weight gradient both take the direct kernels, they read one padded dy (config
        # C's step makes three fewer padded copies of 1.1 MiB: its level-0 layers' two
        # gradients took 0.04-0.12 ms less, alone).
        if (need_input and need_weight and geometry.padding == (1, 1, 1, 1)
                and policy._forward_route(o, c, w.shape[2:], geometry, n, x.shape[2:])
                == (True, 0)
                and policy._grad_weight_route(c, o, w.shape[2:], geometry, n, (ho, wo))
                == (True, 0)):
            dy, x, w = _contiguous(dy), _contiguous(x), _contiguous(w)
            padded_dy = self._padded(dy, (1, 1, 1, 1), "gradient")
            dx = np.empty(x.shape, dtype=dy.dtype)
            direct3x3_kernels.conv3x3_forward(padded_dy, _flipped(w), dx)
            dw = np.zeros(w.shape, dtype=dy.dtype)
            direct3x3_kernels.conv3x3_grad_weight(padded_dy, self._padded(x, geometry.padding),
                                                  dw)
            return dx, dw
        return super().conv2d_grads(dy, x, w, geometry, need_input, need_weight)

    def conv2d_grad_weight(self, dy, x, geometry: ConvGeometry, kernel_hw):
        dy, x = _contiguous(dy), _contiguous(x)
        n, o, ho, wo = dy.shape
        c, (kh, kw) = x.shape[1], kernel_hw
        # Unlike the forward, the weight gradient tries Winograd before the direct
        # kernel, which policy.GRAD_WEIGHT_DIRECT_RULES also admits on these layers: alone,
        # F(4x4)'s beat it 1.44-1.56x on 64-wide maps of 32-64 channels, F(2x2)'s 1.37x
        # on B's 128-wide 64 -> 64 layer.
        direct, tile = policy._grad_weight_route(c, o, kernel_hw, geometry, n, (ho, wo))
        if tile:
            return self._grad_weight_winograd(dy, x, tile, geometry.padding)
        dw = np.zeros((o, c * kh * kw), dtype=dy.dtype)
        if (kh, kw) == (1, 1) and geometry.stride == (1, 1) and not any(geometry.padding):
            for image in range(n):
                blas.add_gram(dy[image].reshape(o, -1), x[image].reshape(c, -1), dw)
            return dw.reshape(o, c, kh, kw)
        if direct:
            dw = dw.reshape(o, c, kh, kw)
            direct3x3_kernels.conv3x3_grad_weight(self._padded(dy, (1, 1, 1, 1), "gradient"),
                                                  self._padded(x, geometry.padding), dw)
            return dw
        if geometry.stride[0] == 1 and kh > 1 and ho * wo >= policy.ROW_SHIFT_MIN_PIXELS:
            return self._grad_weight_row_shifts(dy, x, geometry, kernel_hw)
        for cols, images, n0, r0, rows in self._column_bands(x, kernel_hw, geometry, (ho, wo)):
            if images > 1:
                grads = self._buffer(dy.dtype, o * images * ho * wo, "product")
                grads = grads.reshape(o, images, ho * wo)
                grads[...] = dy[n0 : n0 + images].reshape(images, o, ho * wo).transpose(1, 0, 2)
                blas.add_gram(grads.reshape(o, images * ho * wo), cols, dw)
            else:
                blas.add_gram(dy[n0].reshape(o, ho * wo)[:, r0 * wo : (r0 + rows) * wo], cols, dw)
        return dw.reshape(o, c, kh, kw)
