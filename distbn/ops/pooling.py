"""2-D pooling on channels-last (NHWC) arrays: pure forward/backward functions.

    y, idx = max_pool2d_forward(x, pool_size, strides, pads, out_hw)
    dx = max_pool2d_backward(dy, idx, input_hw, pool_size, strides, pads)
    y, counts = avg_pool2d_forward(x, pool_size, strides, pads, out_hw)
    dx = avg_pool2d_backward(dy, counts, input_hw, pool_size, strides, pads)
    y = global_avg_pool2d_forward(x)          # (N, C)
    dx = global_avg_pool2d_backward(dy, input_shape)

`pads` is ((top, bottom), (left, right)), `out_hw` the output's (ho, wo): the layers work
them out from Keras' padding rules. Max pooling pads with -inf (padding never wins) and
keeps, per output, the row-major index of the window's first maximum (`idx`, uint8 for
windows of up to 256 taps); average pooling does not count padded positions (as TF and
Keras), `counts` (ho, wo) says how many real inputs each window has.

Kernel backends (`DISTBN_KERNELS`): numpy (the reference below: a strided window view,
argmax, and one strided add per kernel tap for the gradients) and numba
(`_pooling_kernels`: one pass each, padding implicit, gradients gathered in the
reference's tap order), with the same results: max pooling's bitwise, the sums of average
pooling in the same order. float16, non-contiguous or non-float inputs use the reference.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distbn.ops.backend import backend_name

__all__ = ["max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
           "avg_pool2d_backward", "global_avg_pool2d_forward", "global_avg_pool2d_backward",
           "window_counts"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _numba_ok(*arrays) -> bool:
    return (backend_name() == "numba"
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)
            and arrays[0].dtype in _FLOATS)


def _run(kernel, name, size, *args):
    """A numba kernel through the fused backend's first-call lock and small-input rule."""
    from distbn.ops.fused import run_kernel

    run_kernel(kernel, (name, args[0].dtype.char), size, *args)


def _check_4d(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name}: expects an NHWC array, got shape {x.shape}")


def _idx_dtype(pool_size):
    return np.uint8 if pool_size[0] * pool_size[1] <= 256 else np.int32


def _tap_windows(n, k, s, before, out):
    """(n, k) int64: the output index whose window puts tap t on input position p (padded
    by `before`), or -1; the gather kernels' lookup table for one axis."""
    d = np.arange(n)[:, None] + before - np.arange(k)[None, :]
    o = d // s
    return np.where((d >= 0) & (d % s == 0) & (o < out), o, -1).astype(np.int64)


def _tables(input_hw, pool_size, strides, pads, out_hw):
    return tuple(_tap_windows(n, k, s, p[0], o) for n, k, s, p, o in
                 zip(input_hw, pool_size, strides, pads, out_hw, strict=True))


def _geometry(pool_size, strides, pads):
    (ph, pw), (sh, sw) = pool_size, strides
    return int(ph), int(pw), int(sh), int(sw), int(pads[0][0]), int(pads[1][0])


def _windows(x, pool_size, strides, pads, out_hw, fill):
    """numpy: the padded input's window view (n, ho, wo, c, ph, pw)."""
    xp = (np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=fill)
          if any(sum(p) for p in pads) else x)
    (sh, sw), (ho, wo) = strides, out_hw
    return sliding_window_view(xp, tuple(pool_size), axis=(1, 2))[:, ::sh, ::sw][:, :ho, :wo]


def _scatter(per_tap, dtype, shape, pool_size, strides, pads):
    """numpy: sum per-tap gradients (n, ho, wo, c) into the input, one strided add per tap."""
    (ph, pw), (sh, sw) = pool_size, strides
    n, h, w, c = shape
    padded = (n, h + sum(pads[0]), w + sum(pads[1]), c)
    dxp = np.zeros(padded, dtype=dtype)
    for i in range(ph):
        for j in range(pw):
            g = per_tap(i, j)
            ho, wo = g.shape[1], g.shape[2]
            dxp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] += g
    (pt, _), (pl, _) = pads
    return np.ascontiguousarray(dxp[:, pt:pt + h, pl:pl + w, :])


def max_pool2d_forward(x, pool_size, strides, pads, out_hw):
    """Max over each window, and which tap held it.

    Args:
        x: (N, H, W, C) float array.
        pool_size, strides: (ph, pw), (sh, sw).
        pads: ((top, bottom), (left, right)).
        out_hw: (ho, wo).

    Returns:
        (y, idx): y (N, ho, wo, C) of x's dtype; idx the same shape, the row-major tap
        index (i * pw + j) of the first maximum (of the first NaN, if any).
    """
    _check_4d("max_pool2d_forward", x)
    n, _, _, c = x.shape
    ho, wo = out_hw
    if _numba_ok(x):
        from distbn.ops import _pooling_kernels as _k

        y = np.empty((n, ho, wo, c), dtype=x.dtype)
        idx = np.empty((n, ho, wo, c), dtype=_idx_dtype(pool_size))
        _run(_k.max_forward, "max_forward", x.size, x, y, idx,
             np.array([-np.inf], dtype=x.dtype), *_geometry(pool_size, strides, pads))
        return y, idx
    win = _windows(x, pool_size, strides, pads, out_hw, -np.inf)
    flat = win.reshape(n, ho, wo, c, pool_size[0] * pool_size[1])
    idx = np.argmax(flat, axis=-1)
    y = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
    return y, idx.astype(_idx_dtype(pool_size))


def max_pool2d_backward(dy, idx, input_hw, pool_size, strides, pads):
    """Input gradient of max pooling: dy routed to each window's chosen tap.

    Args:
        dy: (N, ho, wo, C) output gradient.
        idx: `max_pool2d_forward`'s taps.
        input_hw: the forward input's (H, W).
        pool_size, strides, pads: the forward's.

    Returns:
        dx (N, H, W, C) of dy's dtype.
    """
    _check_4d("max_pool2d_backward", dy)
    if idx.shape != dy.shape:
        raise ValueError(f"max_pool2d_backward: idx shape {idx.shape} differs from dy's "
                         f"{dy.shape}")
    n, _, _, c = dy.shape
    shape = (n, *input_hw, c)
    if _numba_ok(dy) and idx.flags.c_contiguous:
        from distbn.ops import _pooling_kernels as _k

        dx = np.empty(shape, dtype=dy.dtype)
        if strides[0] >= pool_size[0] and strides[1] >= pool_size[1]:
            _run(_k.max_backward_disjoint, "max_backward_disjoint", dx.size, dy, idx, dx,
                 np.zeros(1, dtype=dy.dtype), *_geometry(pool_size, strides, pads))
        else:
            _run(_k.max_backward, "max_backward", dx.size, dy, idx, dx,
                 *_tables(input_hw, pool_size, strides, pads, dy.shape[1:3]))
        return dx
    pw = pool_size[1]
    zero = dy.dtype.type(0)
    return _scatter(lambda i, j: np.where(idx == i * pw + j, dy, zero), dy.dtype, shape,
                    pool_size, strides, pads)


def window_counts(input_hw, pool_size, strides, pads, out_hw) -> np.ndarray:
    """How many real (unpadded) inputs each output window covers, shape (ho, wo), int64."""
    per_axis = []
    for n, k, s, (before, _), o in zip(input_hw, pool_size, strides, pads, out_hw,
                                       strict=True):
        start = np.arange(o) * s  # window start in padded coordinates
        per_axis.append(np.minimum(start + k, before + n) - np.maximum(start, before))
    return np.multiply.outer(per_axis[0], per_axis[1])


def avg_pool2d_forward(x, pool_size, strides, pads, out_hw):
    """Mean over each window's real inputs.

    Args:
        x, pool_size, strides, pads, out_hw: as `max_pool2d_forward`.

    Returns:
        (y, counts): y (N, ho, wo, C) of x's dtype; counts (ho, wo) in x's dtype, for
        `avg_pool2d_backward`.
    """
    _check_4d("avg_pool2d_forward", x)
    n, h, w, c = x.shape
    counts = window_counts((h, w), pool_size, strides, pads, out_hw).astype(x.dtype)
    if _numba_ok(x):
        from distbn.ops import _pooling_kernels as _k

        y = np.empty((n, *out_hw, c), dtype=x.dtype)
        _run(_k.avg_forward, "avg_forward", x.size, x, y, counts,
             *_geometry(pool_size, strides, pads))
        return y, counts
    win = _windows(x, pool_size, strides, pads, out_hw, 0)
    y = win.sum(axis=(-2, -1)) / counts[..., None]
    return y.astype(x.dtype, copy=False), counts


def avg_pool2d_backward(dy, counts, input_hw, pool_size, strides, pads):
    """Input gradient of average pooling: dy / count spread over each window.

    Args:
        dy: (N, ho, wo, C) output gradient.
        counts: `avg_pool2d_forward`'s counts.
        input_hw, pool_size, strides, pads: the forward's.

    Returns:
        dx (N, H, W, C) of dy's dtype.
    """
    _check_4d("avg_pool2d_backward", dy)
    n, _, _, c = dy.shape
    shape = (n, *input_hw, c)
    counts = np.asarray(counts).astype(dy.dtype, copy=False)
    if _numba_ok(dy):
        from distbn.ops import _pooling_kernels as _k

        dx = np.empty(shape, dtype=dy.dtype)
        _run(_k.avg_backward, "avg_backward", dx.size, dy, dx, np.ascontiguousarray(counts),
             *_tables(input_hw, pool_size, strides, pads, dy.shape[1:3]))
        return dx
    g = dy / counts[..., None]
    return _scatter(lambda i, j: g, dy.dtype, shape, pool_size, strides, pads)


def global_avg_pool2d_forward(x):
    """Mean over H and W of an NHWC array: (N, C)."""
    _check_4d("global_avg_pool2d_forward", x)
    n, h, w, c = x.shape
    if _numba_ok(x) and h * w > 0:
        from distbn.ops import _pooling_kernels as _k

        y = np.empty((n, c), dtype=x.dtype)
        _run(_k.gap_forward, "gap_forward", x.size, x.reshape(n, h * w, c), y, h * w)
        return y
    return x.mean(axis=(1, 2))


def global_avg_pool2d_backward(dy, input_shape):
    """Input gradient of `global_avg_pool2d_forward`: dy / (H*W) at every position.

    Args:
        dy: (N, C) output gradient.
        input_shape: the forward input's (N, H, W, C).

    Returns:
        dx of `input_shape`, dy's dtype.
    """
    n, h, w, c = input_shape
    if dy.shape != (n, c):
        raise ValueError(f"global_avg_pool2d_backward: dy must have shape {(n, c)} for "
                         f"input shape {tuple(input_shape)}, got {dy.shape}")
    if _numba_ok(dy):
        from distbn.ops import _pooling_kernels as _k

        dx = np.empty((n, h * w, c), dtype=dy.dtype)
        _run(_k.gap_backward, "gap_backward", dx.size, dy, dx, h * w)
        return dx.reshape(n, h, w, c)
    return np.broadcast_to((dy / (h * w))[:, None, None, :], tuple(input_shape)).copy()
