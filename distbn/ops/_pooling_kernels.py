"""numba kernels behind `distbn.ops.pooling`: 2-D pooling on NHWC arrays, one pass each.

Padding is implicit (taps outside the input read as -inf for max, are skipped for the
average) and the channels are the innermost loop, so LLVM vectorises over them. The
parallel loop is over the batch (max_forward: over output rows): every element's
arithmetic is the same at any thread count.

The backward kernels gather instead of scattering: each input position sums, in the
kernel taps' row-major order, what the windows that cover it send back, which is the
order the numpy reference's per-tap scatter adds them in, so the sums are the same
bits, overlapping windows included, and dx is written once. Windows that do not overlap
(strides >= pool, the usual max pooling) scatter instead: one window per input at most,
nothing to order, and no per-position search (measured about twice as fast).

Geometry scalars: pool (ph, pw), strides (sh, sw), top/left pads (pt, pl), output
(ho, wo).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["max_forward", "max_backward", "avg_forward", "avg_backward", "gap_forward",
           "gap_backward"]


@njit(parallel=True, cache=True)
def max_forward(x, y, idx, fill, ph, pw, sh, sw, pt, pl):
    """y = max of each window, idx = its row-major tap (the first maximum; the first NaN
    once there is one, as np.argmax). fill = [-inf] in x's dtype (what padding reads).

    One task per output row (b, oh): its running maxima and taps live in two row-long
    buffers that each window tap updates for every column at once. Per-pixel channel
    loops (16 values at the quickstart's first pooling) spent more time forming views
    than comparing (measured 5x slower); the tap is kept as int32 beside the values,
    so the compare-and-select loop vectorises, and narrowed to idx's dtype once.
    """
    n, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    ninf = fill[0]
    x2 = x.reshape(n * h, w * c)
    y2 = y.reshape(n * ho, wo * c)
    idx2 = idx.reshape(n * ho, wo * c)
    m = wo * c
    for r in prange(n * ho):
        b = r // ho
        oh = r - b * ho
        best = np.full(m, ninf, dtype=y.dtype)  # a padded tap reads -inf: never wins
        arg = np.zeros(m, dtype=np.int32)
        for i in range(ph):
            hi = oh * sh + i - pt
            if hi < 0 or hi >= h:
                continue
            src = x2[b * h + hi]
            for j in range(pw):
                k = np.int32(i * pw + j)
                for ow in range(wo):
                    wj = ow * sw + j - pl
                    if wj < 0 or wj >= w:
                        continue
                    s0, d0 = wj * c, ow * c
                    for ch in range(c):
                        v, cur = src[s0 + ch], best[d0 + ch]
                        # v > cur, or the first NaN: a select, not a branch
                        take = (v > cur) | ((v != v) & (cur == cur))
                        best[d0 + ch] = v if take else cur
                        arg[d0 + ch] = k if take else arg[d0 + ch]
        yr, ir = y2[r], idx2[r]
        for q in range(m):
            yr[q] = best[q]
            ir[q] = arg[q]


@njit(parallel=True, cache=True)
def max_backward(dy, idx, dx, th, tw):
    """dx[position] = sum of dy over the windows whose chosen tap is that position.

    th (H, ph) and tw (W, pw): the output row (column) whose window puts tap i (j) on
    input row (column) h (w), or -1: lookups instead of a division per tap.
    """
    n, h, w, c = dx.shape
    ph, pw = th.shape[1], tw.shape[1]
    for b in prange(n):
        for hh in range(h):
            for ww in range(w):
                out = dx[b, hh, ww]  # channel rows as 1-D views: their loops vectorise
                for ch in range(c):
                    out[ch] = 0
                for i in range(ph):
                    oh = th[hh, i]
                    if oh < 0:
                        continue
                    for j in range(pw):
                        ow = tw[ww, j]
                        if ow < 0:
                            continue
                        k = i * pw + j
                        g, ir = dy[b, oh, ow], idx[b, oh, ow]
                        for ch in range(c):  # a select, not a branch: it vectorises
                            out[ch] = out[ch] + g[ch] if ir[ch] == k else out[ch]


@njit(parallel=True, cache=True)
def max_backward_disjoint(dy, idx, dx, zeros, ph, pw, sh, sw, pt, pl):
    """`max_backward` for windows that do not overlap (strides >= pool): each input gets
    at most one window's gradient, so each window writes its taps directly (one pass
    over dy; dx zeroed first for the positions no window covers). zeros = [0] in dy's
    dtype."""
    n, h, w, c = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    zero = zeros[0]
    for b in prange(n):
        dxb = dx[b]
        dxb[:] = 0
        for oh in range(ho):
            for ow in range(wo):
                g, ir = dy[b, oh, ow], idx[b, oh, ow]
                for i in range(ph):
                    hi = oh * sh + i - pt
                    if hi < 0 or hi >= h:
                        continue
                    for j in range(pw):
                        wj = ow * sw + j - pl
                        if wj < 0 or wj >= w:
                            continue
                        k = i * pw + j
                        out = dxb[hi, wj]
                        for ch in range(c):
                            # + 0, as the reference's sum into zeros: -0.0 becomes 0.0.
                            out[ch] = g[ch] + zero if ir[ch] == k else zero


@njit(parallel=True, cache=True)
def avg_forward(x, y, counts, ph, pw, sh, sw, pt, pl):
    """y = sum of each window's real inputs (row-major) / counts[oh, ow]."""
    n, h, w, c = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for b in prange(n):
        for oh in range(ho):
            for ow in range(wo):
                yr = y[b, oh, ow]  # channel rows as 1-D views: their loops vectorise
                first = True
                for i in range(ph):
                    hi = oh * sh + i - pt
                    if hi < 0 or hi >= h:
                        continue
                    for j in range(pw):
                        wj = ow * sw + j - pl
                        if wj < 0 or wj >= w:
                            continue
                        xr = x[b, hi, wj]
                        if first:
                            for ch in range(c):
                                yr[ch] = xr[ch]
                            first = False
                        else:
                            for ch in range(c):
                                yr[ch] += xr[ch]
                cnt = counts[oh, ow]
                for ch in range(c):
                    yr[ch] = yr[ch] / cnt


@njit(parallel=True, cache=True)
def avg_backward(dy, dx, counts, th, tw):
    """dx[position] = sum of dy / count over the windows covering it (tap order); th, tw
    as `max_backward`'s."""
    n, h, w, c = dx.shape
    ph, pw = th.shape[1], tw.shape[1]
    for b in prange(n):
        for hh in range(h):
            for ww in range(w):
                out = dx[b, hh, ww]
                for ch in range(c):
                    out[ch] = 0
                for i in range(ph):
                    oh = th[hh, i]
                    if oh < 0:
                        continue
                    for j in range(pw):
                        ow = tw[ww, j]
                        if ow < 0:
                            continue
                        cnt = counts[oh, ow]
                        g = dy[b, oh, ow]
                        for ch in range(c):
                            out[ch] += g[ch] / cnt


@njit(parallel=True, cache=True)
def gap_forward(x3, y, count):
    """y[b, c] = the mean over the (H*W) rows of x3[b] (summed in row order, x's dtype,
    as numpy reduces a non-contiguous axis)."""
    n, m, c = x3.shape
    for b in prange(n):
        yr = y[b]
        for ch in range(c):
            yr[ch] = x3[b, 0, ch]
        for r in range(1, m):
            xr = x3[b, r]
            for ch in range(c):
                yr[ch] += xr[ch]
        for ch in range(c):
            yr[ch] = yr[ch] / count


@njit(parallel=True, cache=True)
def gap_backward(dy, dx3, count):
    """dx3[b, r, c] = dy[b, c] / count for every row r."""
    n, m, c = dx3.shape
    for b in prange(n):
        g = dy[b]
        for r in range(m):
            out = dx3[b, r]
            for ch in range(c):
                out[ch] = g[ch] / count
