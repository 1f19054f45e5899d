"""numba kernels behind `distbn.ops.conv`: im2col and col2im in one pass each.

Imported only when the numba backend is active. The im2col matrix has one row per
output pixel (n, ho, wo) and columns ordered (kh, kw, c), like the Keras kernel
flattened to (kh*kw*c, filters); padding is applied here (zeros), so the input is never
copied into a padded array.

Both index C-contiguous arrays as flat rows with unsigned offsets: numba wraps a
negative signed index around, a compare and add per access that stops LLVM vectorising
a copy loop (measured 4-8x slower at the quickstart's shapes); an unsigned offset,
formed after the bounds test, has none. With dilation 1 a tap row of the window (kw*c
values) is one contiguous run of the input. `distbn.ops.conv` hands them other layouts
(a `moveaxis` view of NCHW) as a C-contiguous copy.

Both parallelise over the batch: a sample's rows and its input gradient belong to one
task, so col2im's sums run in one fixed order (taps i, then j, as the numpy
reference) whatever the thread count: the same bits at any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["im2col_rows", "col2im_rows"]


@njit(parallel=True, cache=True)
def im2col_rows(x2, h, w, c, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, cols):
    """`im2col` of a C-contiguous input seen as x2 (n*h, w*c), into cols (n*ho*wo,
    kh*kw*c) seen flat."""
    n = x2.shape[0] // h if h > 0 else 0
    xf = x2.reshape(x2.size)
    cf = cols.reshape(cols.size)
    zero = cols.dtype.type(0)
    uc = np.uint64(c)
    urun = np.uint64(kw * c)
    uk = np.uint64(kh * kw * c)
    for b in prange(n):
        for oh in range(ho):
            for ow in range(wo):
                row = np.uint64((b * ho + oh) * wo + ow) * uk
                w0 = ow * sw - pl
                whole_run = dw == 1 and w0 >= 0 and w0 + kw <= w
                for i in range(kh):
                    hi = oh * sh + i * dh - pt
                    dst = row + np.uint64(i) * urun
                    if hi < 0 or hi >= h:
                        for q in range(urun):
                            cf[dst + q] = zero
                        continue
                    line = np.uint64((b * h + hi) * w) * uc
                    if whole_run:  # the kw taps are kw*c adjacent values of one row
                        src = line + np.uint64(w0) * uc
                        for q in range(urun):
                            cf[dst + q] = xf[src + q]
                        continue
                    for j in range(kw):
                        wi = w0 + j * dw
                        d = dst + np.uint64(j) * uc
                        if wi < 0 or wi >= w:
                            for q in range(uc):
                                cf[d + q] = zero
                        else:
                            src = line + np.uint64(wi) * uc
                            for q in range(uc):
                                cf[d + q] = xf[src + q]


@njit(parallel=True, cache=True)
def col2im_rows(dcols, h, w, c, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, dx2):
    """`col2im` into a C-contiguous gradient seen as dx2 (n*h, w*c), overwritten."""
    n = dx2.shape[0] // h if h > 0 else 0
    df = dx2.reshape(dx2.size)
    gf = dcols.reshape(dcols.size)
    zero = dx2.dtype.type(0)
    uc = np.uint64(c)
    uk = np.uint64(kh * kw * c)
    usample = np.uint64(h * w * c)
    for b in prange(n):
        start = np.uint64(b) * usample
        for q in range(usample):
            df[start + q] = zero
        # Tap-major like the reference's scatter loop: the same summation order.
        for i in range(kh):
            for j in range(kw):
                tap = np.uint64((i * kw + j) * c)
                for oh in range(ho):
                    hi = oh * sh + i * dh - pt
                    if hi < 0 or hi >= h:
                        continue
                    for ow in range(wo):
                        wi = ow * sw + j * dw - pl
                        if wi < 0 or wi >= w:
                            continue
                        src = np.uint64((b * ho + oh) * wo + ow) * uk + tap
                        dst = np.uint64((b * h + hi) * w + wi) * uc
                        for q in range(uc):
                            df[dst + q] += gf[src + q]
