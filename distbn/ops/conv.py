"""2-D convolution (cross-correlation, as Keras) on channels-last views: pure functions.

`conv2d_forward(x, kernel, ...) -> (z, cache)` and `conv2d_backward(dz, cache, kernel)
-> (dx, dkernel)`. Both kernel backends compute z = im2col(x) @ kernel.reshape(-1, F)
with one BLAS GEMM; they differ in how the im2col matrix is formed and how the input
gradient is scattered back:

* numpy (the reference): pad, `sliding_window_view`, a reshape copy; the input
  gradient is one small GEMM per kernel tap added into strided views of a padded array.
* numba (`_conv_kernels`): im2col in one pass with the padding applied in place; the
  input gradient is one GEMM, dz @ kernel.T (the im2col matrix's gradient), summed back
  onto the input in one col2im pass. The kernels take C-contiguous NHWC arrays: a
  channels-first layer's `moveaxis` view is copied once going in (and its gradient
  once coming out), a fraction of the im2col matrix's size.

The forward results are the same bits (the same copy, the same GEMM); the input
gradient agrees to rounding (one GEMM instead of kh*kw, summed in the same tap order).
Inputs the numba kernels do not take (float16, not a float array) use the reference.

Memory (`keep_im2col`): the cache keeps the input; backward forms the im2col matrix
again unless the matrix is at most twice the output's size (kh*kw*c <= 2*f). The
matrix is kh*kw times the input; the GEMMs' work per matrix element grows with f, the
copy's does not, so recomputing costs little where the matrix is large against the
output and much where it is small (few input channels: the first layer of an image
model).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distbn.ops.backend import backend_name

__all__ = ["conv2d_forward", "conv2d_backward", "im2col", "col2im", "keep_im2col",
           "window_slice"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def window_slice(offset: int, stride: int, out: int) -> slice:
    """The input positions kernel tap `offset` touches for `out` outputs at `stride`."""
    return slice(offset, offset + stride * (out - 1) + 1, stride)


class _Geometry:
    """One convolution's sizes: kernel (kh, kw), strides, dilation, (top, left) pads and
    the output size. Plain tuples of ints, so the numba kernels take them as scalars."""

    __slots__ = ("kh", "kw", "sh", "sw", "dh", "dw", "pt", "pl", "ho", "wo")

    def __init__(self, kernel_hw, strides, dilation, pads, out_hw):
        self.kh, self.kw = (int(k) for k in kernel_hw)
        self.sh, self.sw = (int(s) for s in strides)
        self.dh, self.dw = (int(d) for d in dilation)
        self.pt, self.pl = int(pads[0][0]), int(pads[1][0])
        self.ho, self.wo = (int(o) for o in out_hw)

    def scalars(self) -> tuple:
        return (self.kh, self.kw, self.sh, self.sw, self.dh, self.dw, self.pt, self.pl,
                self.ho, self.wo)


def _use_numba(*arrays) -> bool:
    return (backend_name() == "numba"
            and all(isinstance(a, np.ndarray) and a.dtype in _FLOATS for a in arrays)
            and len({a.dtype for a in arrays}) == 1)


def _im2col_reference(x, geo, pads):
    """numpy: pad, strided window view, copy with channels innermost."""
    n = x.shape[0]
    cin = x.shape[3]
    xp = np.pad(x, [(0, 0), *pads, (0, 0)]) if any(sum(p) for p in pads) else x
    win = sliding_window_view(xp, ((geo.kh - 1) * geo.dh + 1, (geo.kw - 1) * geo.dw + 1),
                              axis=(1, 2))
    win = win[:, ::geo.sh, ::geo.sw, :, ::geo.dh, ::geo.dw][:, :geo.ho, :geo.wo]
    # Rows ordered (kh, kw, cin) like the Keras kernel: no kernel transpose. Channels
    # innermost: contiguous runs to copy.
    return win.transpose(0, 1, 2, 4, 5, 3).reshape(n * geo.ho * geo.wo,
                                                   geo.kh * geo.kw * cin)


def im2col(x, kernel_hw, strides, dilation, pads, out_hw):
    """The im2col matrix of a channels-last input.

    Args:
        x: (n, h, w, c) array (any strides: a `moveaxis` view of NCHW works).
        kernel_hw: (kh, kw).
        strides, dilation: (sh, sw), (dh, dw).
        pads: ((top, bottom), (left, right)) zero padding.
        out_hw: (ho, wo), the output size these give.

    Returns:
        (n*ho*wo, kh*kw*c) C-contiguous array of x's dtype; columns ordered (kh, kw, c).
    """
    geo = _Geometry(kernel_hw, strides, dilation, pads, out_hw)
    return _im2col(x, geo, pads)


def _im2col(x, geo, pads):
    if not _use_numba(x):
        return np.ascontiguousarray(_im2col_reference(x, geo, pads))
    from distbn.ops import _conv_kernels as _k
    from distbn.ops.fused import run_kernel

    n, h, w, c = x.shape
    cols = np.empty((n * geo.ho * geo.wo, geo.kh * geo.kw * c), dtype=x.dtype)
    # A channels-first input's NHWC view is copied once: kh*kw times smaller than the
    # matrix, and the flat-row kernel is several times faster than 4-D strided indexing.
    x = np.ascontiguousarray(x)
    run_kernel(_k.im2col_rows, ("im2col_rows", x.dtype.char), cols.size,
               x.reshape(n * h, w * c), h, w, c, *geo.scalars(), cols)
    return cols


def col2im(dcols, input_shape, kernel_hw, strides, dilation, pads, out_hw, out=None):
    """The adjoint of `im2col`: sum each column entry back onto the pixel it was read from.

    Args:
        dcols: (n*ho*wo, kh*kw*c) array, the gradient of the im2col matrix.
        input_shape: (n, h, w, c), the channels-last input's shape.
        kernel_hw, strides, dilation, pads, out_hw: as for `im2col`.
        out: optional (n, h, w, c) array (any strides) to write into; overwritten.

    Returns:
        The (n, h, w, c) input gradient (`out` when given).
    """
    geo = _Geometry(kernel_hw, strides, dilation, pads, out_hw)
    if out is None:
        out = np.empty(tuple(input_shape), dtype=dcols.dtype)
    if _use_numba(dcols, out):
        from distbn.ops import _conv_kernels as _k
        from distbn.ops.fused import run_kernel

        n, h, w, c = out.shape
        # Into a C-contiguous gradient, copied into a strided `out` (an NCHW array's view).
        dx = out if out.flags.c_contiguous else np.empty(out.shape, dtype=out.dtype)
        run_kernel(_k.col2im_rows, ("col2im_rows", out.dtype.char), dcols.size,
                   np.ascontiguousarray(dcols), h, w, c, *geo.scalars(),
                   dx.reshape(n * h, w * c))
        if dx is not out:
            out[...] = dx
        return out
    n, h, w, c = input_shape
    (pt, pb), (pl, pr) = pads
    d6 = dcols.reshape(n, geo.ho, geo.wo, geo.kh, geo.kw, c)
    dxp = np.zeros((n, h + pt + pb, w + pl + pr, c), dtype=dcols.dtype)
    for i in range(geo.kh):
        for j in range(geo.kw):
            dxp[:, window_slice(i * geo.dh, geo.sh, geo.ho),
                window_slice(j * geo.dw, geo.sw, geo.wo), :] += d6[:, :, :, i, j, :]
    out[...] = dxp[:, pt:pt + h, pl:pl + w, :]
    return out


def keep_im2col(kernel_shape) -> bool:
    """Whether forward keeps the im2col matrix for backward instead of recomputing it.

    Args:
        kernel_shape: (kh, kw, c, f).

    Returns:
        True when the matrix (kh*kw*c columns) is at most twice the output (f columns).
    """
    kh, kw, cin, f = kernel_shape
    return kh * kw * cin <= 2 * f


def conv2d_forward(x, kernel, strides, dilation, pads, out_hw, keep_cols=None):
    """z = conv(x, kernel) (no bias, no activation), channels last.

    Args:
        x: (n, h, w, c) input of the compute dtype (any strides).
        kernel: (kh, kw, c, f) Keras-shaped kernel, same dtype.
        strides, dilation: (sh, sw), (dh, dw).
        pads: ((top, bottom), (left, right)).
        out_hw: (ho, wo).
        keep_cols: keep the im2col matrix in the cache for backward instead of forming
            it again there (kh*kw times the input's memory, held until backward); None
            decides by `keep_im2col`.

    Returns:
        (z, cache): z is the C-contiguous (n, ho, wo, f) output; cache is what
        `conv2d_backward` needs (the input, the geometry, and the im2col matrix only
        with keep_cols).
    """
    kh, kw, cin, f = kernel.shape
    geo = _Geometry((kh, kw), strides, dilation, pads, out_hw)
    cols = _im2col(x, geo, pads)
    z = cols @ kernel.reshape(kh * kw * cin, f)
    if keep_cols is None:
        keep_cols = keep_im2col(kernel.shape)
    return z.reshape(x.shape[0], geo.ho, geo.wo, f), (x, geo, pads,
                                                       cols if keep_cols else None)


def conv2d_backward(dz, cache, kernel, dx_out=None, input_grad=True):
    """Gradients of `conv2d_forward` for dL/dz.

    Args:
        dz: (n, ho, wo, f) gradient of z, the compute dtype.
        cache: the forward's cache.
        kernel: the forward's (kh, kw, c, f) kernel.
        dx_out: optional (n, h, w, c) array (any strides, e.g. a channels-last view of a
            channels-first array) that receives the input gradient.
        input_grad: False skips the input gradient (dx is None): a model's first layer
            needs only its kernel's, and at the quickstart's first layer (3 input
            channels) the input gradient is most of the backward's time.

    Returns:
        (dx, dkernel): dx is (n, h, w, c) (`dx_out` when given) or None, dkernel
        (kh, kw, c, f), both of dz's dtype.
    """
    x, geo, pads, cols = cache
    kh, kw, cin, f = kernel.shape
    dz2 = dz.reshape(-1, f)
    wmat = kernel.reshape(kh * kw * cin, f)
    if cols is None:
        cols = _im2col(x, geo, pads)
    dkernel = (cols.T @ dz2).reshape(kh, kw, cin, f)
    del cols  # its memory serves the next array of its size
    if not input_grad:
        return None, dkernel
    if _use_numba(dz, x):
        dx = col2im(dz2 @ wmat.T, x.shape, (kh, kw), (geo.sh, geo.sw), (geo.dh, geo.dw),
                    pads, (geo.ho, geo.wo), out=dx_out)
        return dx, dkernel
    return _scatter_taps(dz, kernel, geo, pads, x.shape, dx_out), dkernel


def _scatter_taps(dz, kernel, geo, pads, input_shape, dx_out):
    """The reference input gradient: one GEMM per tap, added into a padded array."""
    n, h, w, c = input_shape
    (pt, pb), (pl, pr) = pads
    dxp = np.zeros((n, h + pt + pb, w + pl + pr, c), dtype=dz.dtype)
    for i in range(geo.kh):
        for j in range(geo.kw):
            dxp[:, window_slice(i * geo.dh, geo.sh, geo.ho),
                window_slice(j * geo.dw, geo.sw, geo.wo), :] += dz @ kernel[i, j].T
    dx = dxp[:, pt:pt + h, pl:pl + w, :]
    if dx_out is None:
        return np.ascontiguousarray(dx)
    dx_out[...] = dx
    return dx_out
