"""Columns, copies and their adjoints: the data movement around the backend's GEMMs.

Images are C-contiguous (N, C, H, W) arrays; column matrices are (C*kH*kW, pixels).

* ``valid_outputs``: the range of outputs whose input falls inside the image.
* ``im2col_rows``: a band of output rows (of one or more images) -> columns
  (C*kH*kW, rows*Wo), zero padding written in the same pass.
* ``im2col_2x2_stride2``: the same for 2x2 stride-2 convs (space to depth).
* ``depth_to_space_2x2``: (N, 4C, H*W) columns -> (N, C, 2H, 2W) plus bias (pixel shuffle).
* ``col2im_gather``: the adjoint of im2col, (N, C*kH*kW, Ho*Wo) -> (N, C, H, W).
* ``row_shift_sum``: the row-shift path's sum of each kernel row's share, shifted by its row.
* ``pad_images``: (N, C, H, W) -> (N, C, Hp, Wp) in a zero border.
"""

from __future__ import annotations

from numba import njit, prange

from .jit import kernel


@njit(cache=True, inline="always")
def valid_outputs(shift, stride, size, count):
    """[lo, hi): the outputs o < count whose input o*stride + shift lies in [0, size)."""
    lo = 0 if shift >= 0 else min(count, (stride - 1 - shift) // stride)
    if size - 1 - shift < 0:
        return lo, lo
    return lo, max(lo, min(count, (size - 1 - shift) // stride + 1))


@kernel()
def im2col_rows(x, n0, count, row0, rows, kh, kw, sh, sw, top, left, dh, dw, wo, cols):
    """Columns of output rows [row0, row0 + rows) of images n0 .. n0 + count - 1.

    x: (N, C, H, W). cols: (C*kh*kw, >= count*rows*wo); entry (c*kh*kw + i*kw + j,
    (k*rows + r)*wo + ow) = x[n0 + k, c, (row0 + r)*sh - top + i*dh, ow*sw - left + j*dw],
    or 0 where that position falls in the padding. Several images side by side make
    one wide GEMM; one call per band keeps the thread-pool wake-ups few.
    """
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    taps = kh * kw
    depth = c_in * taps
    for task in prange(count * depth):
        k = task // depth
        row = task % depth
        n = n0 + k
        c = row // taps
        i = (row % taps) // kw
        j = row % kw
        shift = j * dw - left
        ow_lo, ow_hi = valid_outputs(shift, sw, w, wo)
        if sh == 1 and sw == 1 and wo == w:
            # 'same'-style rows: the band is one contiguous run of the input plane
            # shifted by `shift`, so copy it in one go and then zero the few entries
            # that wrapped around from a neighbouring row or fell in the padding.
            plane = x[n, c].reshape(h * w)
            dest = cols[row]
            r_lo, r_hi = valid_outputs(row0 - top + i * dh, 1, h, rows)
            first = (k * rows) * wo
            for q in range(first, first + r_lo * wo):
                dest[q] = 0
            for q in range(first + r_hi * wo, first + rows * wo):
                dest[q] = 0
            if r_hi > r_lo:
                start = (row0 + r_lo - top + i * dh) * w + shift
                stop = (row0 + r_hi - top + i * dh) * w + shift
                lo, hi = max(start, 0), min(stop, h * w)
                out = first + r_lo * wo - start
                # A run wholly in the padding (inputs narrower than the kernel) is empty:
                # no slice then, since a parallel loop quietly stops at a slice of
                # negative length instead of copying nothing.
                if hi > lo:
                    dest[out + lo : out + hi] = plane[lo:hi]
                for r in range(r_lo, r_hi):
                    base = first + r * wo
                    for ow in range(ow_lo):
                        dest[base + ow] = 0
                    for ow in range(ow_hi, wo):
                        dest[base + ow] = 0
            continue
        for r in range(rows):
            base = (k * rows + r) * wo
            ih = (row0 + r) * sh - top + i * dh
            if ih < 0 or ih >= h:
                for ow in range(wo):
                    cols[row, base + ow] = 0
                continue
            for ow in range(ow_lo):
                cols[row, base + ow] = 0
            if sw == 1:
                # A contiguous run: a slice copy that LLVM turns into a memcpy.
                cols[row, base + ow_lo : base + ow_hi] = x[n, c, ih, ow_lo + shift : ow_hi + shift]
            else:
                for ow in range(ow_lo, ow_hi):
                    cols[row, base + ow] = x[n, c, ih, ow * sw + shift]
            for ow in range(ow_hi, wo):
                cols[row, base + ow] = 0


@kernel()
def im2col_2x2_stride2(x, n0, count, row0, rows, wo, cols):
    """im2col_rows for a 2x2 kernel at stride 2 with no padding (space to depth).

    cols[c*4 + i*2 + j, (k*rows + r)*wo + ow] = x[n0 + k, c, 2*(row0 + r) + i, 2*ow + j].
    Each parallel step fills one (image, channel) plane's rows, indexing the arrays
    directly (cheaper than taking row views for each pair of rows).
    """
    c_in = x.shape[1]
    for task in prange(count * c_in):
        k = task // c_in
        c = task % c_in
        for r in range(rows):
            ih = 2 * (row0 + r)
            base = (k * rows + r) * wo
            for ow in range(wo):
                cols[4 * c, base + ow] = x[n0 + k, c, ih, 2 * ow]
                cols[4 * c + 1, base + ow] = x[n0 + k, c, ih, 2 * ow + 1]
                cols[4 * c + 2, base + ow] = x[n0 + k, c, ih + 1, 2 * ow]
                cols[4 * c + 3, base + ow] = x[n0 + k, c, ih + 1, 2 * ow + 1]


@kernel()
def depth_to_space_2x2(cols, bias, out, first_channel):
    """out[n, first_channel + c, 2*h + i, 2*w + j] = cols[n, c*4 + i*2 + j, h*W + w] + bias[c].

    col2im_gather for a 2x2 kernel at stride 2 with no padding, whose windows do not
    overlap (the U-Net's up-conv forward), with the bias added in the same pass. out:
    (N, C_out, 2H, 2W) with C_out >= first_channel + C; writing from ``first_channel``
    on lets the up-conv land straight in its channels of the U-Net's concatenation.
    Each parallel step fills one (image, channel) plane, indexing the arrays directly
    (cheaper than taking row views for each pair of rows, the more so on narrow maps).
    """
    n_img, c_up = cols.shape[0], cols.shape[1] // 4
    h, w = out.shape[2] // 2, out.shape[3] // 2
    for task in prange(n_img * c_up):
        n = task // c_up
        c = task % c_up
        b = bias[c]
        plane = first_channel + c
        for r in range(h):
            base = r * w
            for q in range(w):
                out[n, plane, 2 * r, 2 * q] = cols[n, 4 * c, base + q] + b
                out[n, plane, 2 * r, 2 * q + 1] = cols[n, 4 * c + 1, base + q] + b
                out[n, plane, 2 * r + 1, 2 * q] = cols[n, 4 * c + 2, base + q] + b
                out[n, plane, 2 * r + 1, 2 * q + 1] = cols[n, 4 * c + 3, base + q] + b


@kernel()
def col2im_gather(cols, kh, kw, sh, sw, top, left, dh, dw, ho, wo, dx):
    """dx (N, C, H, W) = the adjoint of im2col applied to ``cols`` (N, C*kh*kw, ho*wo).

    Input pixel (h, w) receives the entry of tap (i, j) at output (oh, ow) when
    oh*sh = h + top - i*dh and ow*sw = w + left - j*dw. Each parallel step owns one
    input row (n, c, h) and sums everything that lands in it, taps in (i, j) order, so
    no two steps write the same pixel and no atomics are needed.
    """
    n_img, c_in, h, w = dx.shape
    for task in prange(n_img * c_in * h):
        n = task // (c_in * h)
        c = (task // h) % c_in
        ih = task % h
        for iw in range(w):
            dx[n, c, ih, iw] = 0
        for i in range(kh):
            oh_scaled = ih + top - i * dh
            if oh_scaled < 0 or oh_scaled % sh != 0 or oh_scaled // sh >= ho:
                continue
            oh = oh_scaled // sh
            for j in range(kw):
                row = (c * kh + i) * kw + j
                shift = j * dw - left
                ow_lo, ow_hi = valid_outputs(shift, sw, w, wo)
                for ow in range(ow_lo, ow_hi):
                    dx[n, c, ih, ow * sw + shift] += cols[n, row, oh * wo + ow]


@kernel()
def row_shift_sum(z, count, rows_in, dh, y, n0, r0):
    """y[n0 + k, o, r0 + r] = sum over i of z[i*O + o, row (k*rows_in + r + i*dh)].

    z: (kH*O, count*rows_in*Wo), the product of the weight's kernel rows with columns
    of the kernel's width over ``rows_in`` input rows per image (rows of Wo pixels);
    kernel row i sees those rows shifted by i*dh. y: (N, O, Ho, Wo); the band has
    rows_in - dh*(kH - 1) output rows. One parallel step per output row.
    """
    o_ch, wo = y.shape[1], y.shape[3]
    kh = z.shape[0] // o_ch
    rows = rows_in - dh * (kh - 1)
    for task in prange(count * o_ch * rows):
        k = task // (o_ch * rows)
        o = (task // rows) % o_ch
        r = task % rows
        dest = y[n0 + k, o, r0 + r]
        start = (k * rows_in + r) * wo
        dest[:] = z[o, start : start + wo]
        for i in range(1, kh):
            shifted = start + i * dh * wo
            source = z[i * o_ch + o]
            for q in range(wo):
                dest[q] += source[shifted + q]



@kernel()
def pad_images(x, top, left, xp):
    """xp (N, C, Hp, Wp) = x (N, C, H, W) placed at (top, left) in a zero border."""
    n_img, c_in, h, w = x.shape
    hp = xp.shape[2]
    for plane in prange(n_img * c_in):
        n = plane // c_in
        c = plane % c_in
        for r in range(hp):
            ih = r - top
            if ih < 0 or ih >= h:
                xp[n, c, r, :] = 0
                continue
            xp[n, c, r, :left] = 0
            xp[n, c, r, left : left + w] = x[n, c, ih]
            xp[n, c, r, left + w :] = 0
