"""numba kernels behind `distbn.ops.conv`: im2col and col2im in one pass each.

Imported only when the numba backend is active. Both work on channels-last views
(n, h, w, c) of any strides, so a channels-first array is read and written in place
through `moveaxis` (numba compiles one specialisation per layout). The im2col matrix
has one row per output pixel (n, ho, wo) and columns ordered (kh, kw, c), like the
Keras kernel flattened to (kh*kw*c, filters); padding is applied here (zeros), so the
input is never copied into a padded array.

Both parallelise over the batch: a sample's rows and its input gradient belong to one
task, so col2im's sums run in one fixed order (taps i, then j, as the numpy
reference) whatever the thread count: the same bits at any thread count.
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["im2col", "col2im"]


@njit(parallel=True, cache=True)
def im2col(x, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, cols):
    """Fill `cols` (n*ho*wo, kh*kw*c) from `x` (n, h, w, c); out-of-image taps are 0."""
    n, h, w, c = x.shape
    zero = cols.dtype.type(0)
    for b in prange(n):
        for oh in range(ho):
            for ow in range(wo):
                row = (b * ho + oh) * wo + ow
                for i in range(kh):
                    hi = oh * sh + i * dh - pt
                    for j in range(kw):
                        wi = ow * sw + j * dw - pl
                        base = (i * kw + j) * c
                        if 0 <= hi < h and 0 <= wi < w:
                            for ch in range(c):
                                cols[row, base + ch] = x[b, hi, wi, ch]
                        else:
                            for ch in range(c):
                                cols[row, base + ch] = zero


@njit(parallel=True, cache=True)
def col2im(dcols, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, dx):
    """`dx` (n, h, w, c) = the sum of `dcols`' entries over the taps that read each pixel.

    dx is overwritten (zeroed first, per sample). Taps that fall in the padding are
    dropped, so no padded gradient is formed and sliced.
    """
    n, h, w, c = dx.shape
    zero = dx.dtype.type(0)
    for b in prange(n):
        for hi in range(h):
            for wi in range(w):
                for ch in range(c):
                    dx[b, hi, wi, ch] = zero
        # Tap-major like the reference's scatter loop: the same summation order.
        for i in range(kh):
            for j in range(kw):
                base = (i * kw + j) * c
                for oh in range(ho):
                    hi = oh * sh + i * dh - pt
                    if hi < 0 or hi >= h:
                        continue
                    for ow in range(wo):
                        wi = ow * sw + j * dw - pl
                        if wi < 0 or wi >= w:
                            continue
                        row = (b * ho + oh) * wo + ow
                        for ch in range(c):
                            dx[b, hi, wi, ch] += dcols[row, base + ch]

