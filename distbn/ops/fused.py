"""Fused batch-norm kernels (numba): the reference functions' signatures, one pass each.

Drop-in for `distbn.ops.batch_norm` (same functions, arguments and results):
`local_mean_m2` reads x once (float64 sums, as accurate as the reference's two passes),
`normalize` reads x once and writes y, `backward_sums` reads dy and x once, `input_grad`
reads dy and x once and writes dx. `normalize` and `input_grad` do the reference's
per-channel arithmetic and elementwise operations in the same order: the same bits.
No temporary has the input's size.

Fused where the input is a C-contiguous float32/float64 array whose channel axes are
consecutive (one axis, or a list/tuple of adjacent ones: channels-last, channels-first,
anything in between) and the mask, if any, is constant along whatever the kernel treats
as one row: across the channels for channels-last, across the reduced axes after the
channels otherwise (Keras masks broadcast along the last axis, so sequences of either
layout qualify). Everything else (non-adjacent channel axes, strided views, float16,
masks that vary inside a row, empty inputs) goes to the numpy reference unchanged.

Importing this module imports numba; `distbn.ops.backend` decides whether to.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time

import numba
import numpy as np

from distbn.ops import _fused_kernels as _k
from distbn.ops import _sync_kernels as _sk
from distbn.ops import batch_norm as _ref

__all__ = [
    "local_mean_m2", "normalize", "backward_sums", "input_grad", "inverse_std",
    "reduce_axes_for", "shifted_sums", "pack_moments", "unpack_moments", "moments_from_sums",
    "local_moments", "compile_seconds", "lock_wait_seconds", "fused_geometry", "cache_is_warm",
    "update_moving", "train_forward", "train_backward", "local_packed_sums",
    "normalize_from_sums", "input_grad_from_sums", "update_running",
]

# Channel-array helpers are per-channel and cheap: shared with the reference.
inverse_std = _ref.inverse_std
reduce_axes_for = _ref.reduce_axes_for
shifted_sums = _ref.shifted_sums
pack_moments = _ref.pack_moments
unpack_moments = _ref.unpack_moments
moments_from_sums = _ref.moments_from_sums
update_moving = _ref.update_moving

_F64 = np.float64
# Stands in for gamma or beta when there is none: the kernels then never read it, and
# one compiled specialisation serves both cases.
_UNUSED = np.zeros(0)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# About 512 KiB of float32 per reduction block: 32 tasks for the threads in 16 MiB, few
# enough that merging the blocks costs little, and the per-block partial sums (32 bytes
# per block and channel) stay small: < 0.1% of a float32 input up to 2048 channels, at
# most 1/8 of it (64-row blocks) beyond.
_BLOCK_ELEMS = 1 << 17
_MIN_BLOCK_ROWS = 64
# Below this many elements one thread is faster than waking the others (a parallel
# region costs microseconds, and milliseconds when another process holds the cores).
# The blocks do not depend on the thread count, so neither do the results.
PARALLEL_MIN_ELEMS = 1 << 17


class _Geometry:
    """How a supported input is viewed: rows (R, C) or planes (O, C, I), and the blocks."""

    __slots__ = ("kind", "outer", "nch", "inner", "param_shape", "ch_start", "ch_stop",
                 "rows_per_block", "reduce_blocks", "shape2", "reps", "wide2",
                 "elementwise_args")

    def __init__(self, shape, ch_start, ch_stop):
        self.ch_start, self.ch_stop = ch_start, ch_stop
        self.outer = math.prod(shape[:ch_start])
        self.param_shape = tuple(shape[ch_start:ch_stop])
        self.nch = math.prod(self.param_shape)
        self.inner = math.prod(shape[ch_stop:])
        self.kind = "rows" if self.inner == 1 else "planes"
        # The elementwise kernels' 2-D view: (R, C) rows, or (O*C, I) planes.
        self.shape2 = ((self.outer, self.nch) if self.kind == "rows"
                       else (self.outer * self.nch, self.inner))
        # Block sizes depend on the shape only: the reductions' summation order is fixed.
        self.rows_per_block = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMS // max(self.nch, 1))
        # Planes reductions: (outer positions, channels) per block, ~_BLOCK_ELEMS each.
        slab = self.nch * self.inner
        self.reduce_blocks = ((max(1, _BLOCK_ELEMS // slab), self.nch) if slab < _BLOCK_ELEMS
                              else (1, max(1, _BLOCK_ELEMS // self.inner)))
        # Rows of few channels: the elementwise kernels see `reps` rows as one (R/reps,
        # reps*C) row, with the channel vectors tiled reps times (the same arithmetic per
        # element, so the same bits). A loop over 16 channels spends more time in its
        # prologue and epilogue than in its vector body: the quickstart's first
        # normalisation and input gradient ran 4-9x faster on 256-wide rows (measured at
        # 64x16x16x16 float32, one thread). The reductions keep (R, C): their
        # accumulators are per channel.
        self.reps = _widening(self.outer, self.nch) if self.kind == "rows" else 1
        self.wide2 = (self.shape2 if self.reps == 1
                      else (self.outer // self.reps, self.nch * self.reps))
        # The elementwise kernels' last arguments: rows per task (and C for planes).
        self.elementwise_args = (
            (max(_MIN_BLOCK_ROWS, _BLOCK_ELEMS // max(self.wide2[1], 1)),)
            if self.kind == "rows" else (self.nch, max(1, _BLOCK_ELEMS // self.inner)))


# Elementwise rows are widened to at least this many elements (see `_Geometry.reps`).
_WIDE_ROW = 256


def _widening(outer, nch) -> int:
    """How many (outer, nch) rows the elementwise kernels take as one: the smallest power
    of two that makes a row of at least _WIDE_ROW elements, halved until it divides
    `outer` (1: no widening)."""
    if nch <= 0 or nch >= _WIDE_ROW:
        return 1
    reps = 1 << (-(-_WIDE_ROW // nch) - 1).bit_length()
    while outer % reps:
        reps //= 2
    return reps


@functools.lru_cache(maxsize=256)
def _geometry_for(shape, reduce_axes):
    """`_Geometry` for a shape and reduce axes, or None when the channels are not adjacent."""
    channels = [a for a in range(len(shape)) if a not in reduce_axes]
    if not channels or channels[-1] - channels[0] + 1 != len(channels):
        return None
    return _Geometry(shape, channels[0], channels[-1] + 1)


def fused_geometry(x, reduce_axes):
    """The fused view of `x` reduced over `reduce_axes`, or None when numpy must do it.

    Args:
        x: the input array.
        reduce_axes: tuple of axes statistics reduce over.

    Returns:
        A `_Geometry`, or None (not a C-contiguous float32/float64 array with elements,
        or channel axes that are not adjacent).
    """
    if (not isinstance(x, np.ndarray) or x.dtype not in _FLOATS or x.size == 0
            or not x.flags.c_contiguous):
        return None
    return _geometry_for(x.shape, tuple(reduce_axes))


# --- first-use compilation, serialised across processes --------------------------------
_ready: set = set()
_first_call = {"run": 0.0, "wait": 0.0}


def compile_seconds() -> float:
    """Seconds this process spent in kernels' first calls: compiling or loading them from
    numba's disk cache (and running them once), not counting waits for the lock."""
    return _first_call["run"]


def lock_wait_seconds() -> float:
    """Seconds this process waited for other processes compiling the same kernels."""
    return _first_call["wait"]


def cache_is_warm() -> bool:
    """Whether numba's disk cache holds compiled kernels of this install; False means
    the first calls compile them (about 12 s on one core, once per install)."""
    try:  # numba internals: the directory its cache index files go to
        cache_dir = _k.rows_moments._cache._cache_path
        return any(n.endswith(".nbi") for n in os.listdir(cache_dir))
    except (AttributeError, OSError):
        return False


def _lock_path(kernel) -> str:
    """A lock file beside numba's cache for `kernel` (the temp dir if that is unknown)."""
    try:  # numba internals; fall back to a per-user temp file
        cache_dir = kernel._cache._cache_path
    except AttributeError:
        cache_dir = None
    try:  # numba creates it on its first save; create it now so every process agrees
        os.makedirs(cache_dir, exist_ok=True)
        usable = os.access(cache_dir, os.W_OK)
    except (OSError, TypeError):
        usable = False
    if not usable:
        cache_dir = tempfile.gettempdir()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(cache_dir, f"distbn-kernels-{uid}.lock")


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive advisory lock on `path` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: numba's own atomic writes are all we have
        yield
        return
    try:
        f = open(path, "a")
    except OSError:  # an unwritable cache: compile unlocked, as numba alone would
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_kernel(kernel, key, size, *args):
    """Run `kernel(*args)` on an input of `size` elements.

    Small inputs run on one thread. The first call per `key` (kernel and argument
    types) holds a file lock: numba's cache writes its index and data files separately,
    and processes compiling the same kernel at once on a cold cache have crashed
    (numba issues #4807, #10128); under the lock one process compiles and saves, the
    others then load what it saved.

    Before that first call numba's thread pool is started. A cached kernel that calls
    a parallel one which was itself loaded from the cache when the outer one compiled
    (rows_packed_sums over rows_moments, say) does not start the pool when it loads,
    and its first parallel region then jumps through an unset pointer: a segfault
    (numba issue #8578, reproduced with numba 0.68.1 in
    tests/test_fused_kernels.py::test_a_kernel_cached_over_a_cached_parallel_one_loads).
    """
    # (numba.get_num_threads costs a microsecond or more per call; with a pool of one
    # thread there is nothing to switch)
    if size < PARALLEL_MIN_ELEMS and numba.config.NUMBA_NUM_THREADS > 1:
        threads = numba.get_num_threads()
        if threads > 1:
            numba.set_num_threads(1)
            try:
                return run_kernel(kernel, key, PARALLEL_MIN_ELEMS, *args)
            finally:
                numba.set_num_threads(threads)
    if key in _ready:
        return kernel(*args)
    numba.get_num_threads()  # starts the pool (numba's own fix for loads: _reload_parfor)
    start = time.perf_counter()
    with _file_lock(_lock_path(kernel)):
        locked = time.perf_counter()
        out = kernel(*args)
    _first_call["wait"] += locked - start
    _first_call["run"] += time.perf_counter() - locked
    _ready.add(key)
    return out


# --- the four kernels -------------------------------------------------------------------
def local_mean_m2(x, reduce_axes, mask=None):
    """Exact per-channel count, mean and centred sum of squares M2, in one read of x.

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        mask: None, or a boolean array with x's rank, broadcastable to x.

    Returns:
        (count, mean, m2): float64 channel arrays; mean = 0 and m2 = 0 where count = 0.
    """
    geo = fused_geometry(x, reduce_axes)
    flags = None if geo is None else _flags(geo, x, mask)
    if geo is None or flags is False:
        return _ref.local_mean_m2(x, tuple(reduce_axes), mask)
    key = _key("moments", geo, x, flags is None)
    if geo.kind == "rows":
        count, mean, m2 = run_kernel(_k.rows_moments, key, x.size, x.reshape(geo.shape2), flags,
                                geo.rows_per_block)
    else:
        x3 = x.reshape(geo.outer, geo.nch, geo.inner)
        pflags = None if flags is None else flags.reshape(geo.outer, geo.nch)
        count, mean, m2 = run_kernel(_k.planes_moments, key, x.size, x3, pflags,
                                *geo.reduce_blocks)
    shape = geo.param_shape
    if len(shape) == 1:
        return count, mean, m2
    return count.reshape(shape), mean.reshape(shape), m2.reshape(shape)


def local_moments(x, reduce_axes, shift, mask=None):
    """Per-channel float64 (count n, S1 = Σ(x−K), S2 = Σ(x−K)²) over unmasked positions.

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        shift: channel array K.
        mask: None or a boolean array with x's rank, broadcastable to x.

    Returns:
        (count, s1, s2): float64 channel arrays.
    """
    count, mean, m2 = local_mean_m2(x, reduce_axes, mask)
    s1, s2 = shifted_sums(count, mean, m2, shift)
    return count, s1, s2


def normalize(x, mean, var, gamma, beta, epsilon, reduce_axes):
    """`gamma * (x − mean) / sqrt(var + epsilon) + beta`: one read of x, one write of y.

    Args:
        x: float32 or float64 array.
        mean, var: channel arrays.
        gamma, beta: channel arrays, or None (scale 1, offset 0).
        epsilon: positive float.
        reduce_axes: tuple of axes the channel arrays broadcast over.

    Returns:
        y with x's shape and dtype.
    """
    geo = fused_geometry(x, reduce_axes)
    if geo is None:
        return _ref.normalize(x, mean, var, gamma, beta, epsilon, tuple(reduce_axes))
    # The per-channel coefficients are computed inside the kernel: numpy calls between
    # two passes over x run with cold caches, at several microseconds each.
    mean, var = _wide(_vec64(mean, geo), geo), _wide(_vec64(var, geo), geo)
    g = var if gamma is None else _wide(_vec64(gamma, geo), geo)
    b = var if beta is None else _wide(_vec64(beta, geo), geo)
    out = np.empty_like(x)
    kernel = _k.rows_normalize if geo.kind == "rows" else _k.planes_normalize
    run_kernel(kernel, _key("normalize", geo, x), x.size, x.reshape(geo.wide2), mean, var,
               g, b, float(epsilon), gamma is not None, beta is not None,
               out.reshape(geo.wide2), *geo.elementwise_args)
    return out


def train_forward(x, reduce_axes, mask, gamma, beta, epsilon, moving_mean, moving_var,
                  momentum):
    """One replica's training forward (`distbn.ops.batch_norm.train_forward`), one call.

    Without a mask, on a fused input, with float32/float64 moving arrays: one compiled
    function computes the statistics, updates the moving averages and normalises, with
    the separate kernels' arithmetic (the same bits). Rows (channels last): the
    statistics pass, then the normalisation pass. Planes (channels first): a few
    channels at a time, each group normalised while its planes are still in cache, so
    x is read from memory about once. Otherwise the same steps through `local_mean_m2`
    and `normalize`.
    """
    geo = fused_geometry(x, reduce_axes)
    if geo is None or mask is not None or not (_moving_ok(moving_mean, geo)
                                               and _moving_ok(moving_var, geo)):
        return _ref.compose_train_forward(local_mean_m2, normalize, x, reduce_axes, mask,
                                          gamma, beta, epsilon, moving_mean, moving_var,
                                          momentum)
    g = _UNUSED if gamma is None else _vec64(gamma, geo)
    b = _UNUSED if beta is None else _vec64(beta, geo)
    out = np.empty_like(x)
    args = (g, b, float(epsilon), gamma is not None, beta is not None,
            moving_mean.reshape(geo.nch), moving_var.reshape(geo.nch), float(momentum))
    key = _key("train_forward", geo, x, moving_mean.dtype.char, moving_var.dtype.char)
    if geo.kind == "rows":
        count, mean, var = run_kernel(_k.rows_train_forward, key, x.size,
                                      x.reshape(geo.shape2), geo.rows_per_block, *args,
                                      out.reshape(geo.wide2), *geo.elementwise_args)
    else:
        shape3 = (geo.outer, geo.nch, geo.inner)
        count, mean, var = run_kernel(_k.planes_train_forward, key, x.size, x.reshape(shape3),
                                 *geo.reduce_blocks, *args, out.reshape(shape3))
    shape = geo.param_shape
    if len(shape) > 1:
        count, mean, var = count.reshape(shape), mean.reshape(shape), var.reshape(shape)
    return out, count, mean, var


def train_backward(dy, x, mean, inv_std, gamma, count, reduce_axes, mask=None):
    """One replica's training backward (`distbn.ops.batch_norm.train_backward`).

    Without a mask, one compiled function (the separate kernels' bits): channels first,
    it sums and forms dx channel by channel, each channel's dy and x read again while
    still in cache; channels last, the two passes with the per-channel constants
    between them compiled too. Otherwise `backward_sums` then `input_grad`.
    """
    geo = fused_geometry(x, reduce_axes)
    if geo is None or mask is not None or not _like(dy, x):
        return _ref.compose_train_backward(backward_sums, input_grad, dy, x, mean, inv_std,
                                           gamma, count, reduce_axes, mask)
    dx = np.empty_like(x)
    key = _key("train_backward", geo, x, dy.flags.writeable)
    if geo.kind == "rows":
        sums = run_kernel(_k.rows_train_backward, key, x.size, dy.reshape(geo.shape2),
                          x.reshape(geo.shape2), _vec64(mean, geo), _vec64(inv_std, geo),
                          _UNUSED if gamma is None else _vec64(gamma, geo), gamma is not None,
                          _vec64(count, geo), geo.rows_per_block, dx.reshape(geo.wide2),
                          *geo.elementwise_args)
        return sums.reshape((2,) + geo.param_shape), dx
    shape3 = (geo.outer, geo.nch, geo.inner)
    sums = run_kernel(_k.planes_train_backward, key, x.size, dy.reshape(shape3), x.reshape(shape3),
                 _vec64(mean, geo), _vec64(inv_std, geo),
                 _UNUSED if gamma is None else _vec64(gamma, geo), gamma is not None,
                 _vec64(count, geo), geo.reduce_blocks[0], dx.reshape(shape3))
    return sums.reshape((2,) + geo.param_shape), dx


def backward_sums(dy, x, mean, inv_std, reduce_axes) -> np.ndarray:
    """Local per-channel float64 [Σdy, Σdy·x̂] over ALL positions, in one read of dy and x.

    Args:
        dy: gradient of the output, x's shape.
        x: the input (float32 or float64).
        mean, inv_std: channel arrays x̂ was formed with.
        reduce_axes: tuple of axes to reduce over.

    Returns:
        float64 array of shape (2, *channel shape): [Σdy, Σdy·x̂].
    """
    geo = fused_geometry(x, reduce_axes)
    if geo is None or not _like(dy, x):
        return _ref.backward_sums(dy, x, mean, inv_std, tuple(reduce_axes))
    mu, r = _vec64(mean, geo), _vec64(inv_std, geo)
    key = _key("grad_sums", geo, x, dy.flags.writeable)
    if geo.kind == "rows":
        out = run_kernel(_sk.rows_grad_sums_hat, key, x.size, dy.reshape(geo.shape2),
                         x.reshape(geo.shape2), mu, r, geo.rows_per_block)
    else:
        shape3 = (geo.outer, geo.nch, geo.inner)
        out = run_kernel(_sk.planes_grad_sums_hat, key, x.size, dy.reshape(shape3),
                         x.reshape(shape3), mu, r, *geo.reduce_blocks)
    return out.reshape((2,) + geo.param_shape)


def input_grad(dy, x, mean, inv_std, gamma, sum_dy, sum_dy_xhat, count, reduce_axes,
               mask=None):
    """Exact input gradient of batch normalization: one read of dy and x, one write.

    Args:
        dy: gradient of the output, x's shape.
        x: the input (float32 or float64).
        mean, inv_std: channel arrays the forward pass normalised with.
        gamma: channel array or None (scale 1).
        sum_dy, sum_dy_xhat: channel arrays Σdy and Σdy·x̂ over the whole (global) batch;
            ignored when `count` is None.
        count: float64 channel array N (global); None in inference mode.
        reduce_axes: tuple of axes to reduce over.
        mask: None or the boolean forward mask (x's rank, broadcastable to x).

    Returns:
        dx in x's dtype, as `distbn.ops.batch_norm.input_grad`.
    """
    geo = fused_geometry(x, reduce_axes)
    flags = None if geo is None or count is None else _flags(geo, x, mask)
    if geo is None or flags is False or not _like(dy, x):
        return _ref.input_grad(dy, x, mean, inv_std, gamma, sum_dy, sum_dy_xhat, count,
                               tuple(reduce_axes), mask)
    a = np.asarray(inv_std, dtype=_F64)
    if gamma is not None:
        a = a * gamma
    if count is None:  # inference: the gradient of the affine map
        return _affine(dy, geo, _channel_vec(a, x.dtype, geo), np.zeros(geo.nch, x.dtype))
    # The reference's per-channel constants and casts: both round the same way.
    coef = np.divide(a, count, out=np.zeros_like(a), where=count > 0)
    c1 = coef * sum_dy
    k = coef * sum_dy_xhat * inv_std
    vecs = [_channel_vec(v, x.dtype, geo) for v in (a, mean, k, c1)]
    out = np.empty_like(x)
    kernel = _k.rows_input_grad if geo.kind == "rows" else _k.planes_input_grad
    key = _key("input_grad", geo, x, dy.flags.writeable, flags is None)
    if flags is None:  # a mask flags (R, C) rows: only an unmasked input is widened
        run_kernel(kernel, key, x.size, dy.reshape(geo.wide2), x.reshape(geo.wide2),
                   *(_wide(v, geo) for v in vecs), flags, out.reshape(geo.wide2),
                   *geo.elementwise_args)
    else:
        run_kernel(kernel, key, x.size, dy.reshape(geo.shape2), x.reshape(geo.shape2),
                   *vecs, flags, out.reshape(geo.shape2), *_narrow_args(geo))
    return out


# --- the synchronized step's halves, either side of its all-reduce ----------------------
def local_packed_sums(x, reduce_axes, shift):
    """`distbn.ops.batch_norm.local_packed_sums` in one compiled call (same bits)."""
    geo = fused_geometry(x, reduce_axes)
    if geo is None:
        return _ref.local_packed_sums(x, reduce_axes, shift)
    k = _vec64(shift, geo)
    key = _key("packed_sums", geo, x)
    if geo.kind == "rows":
        packed, count, mean, m2 = run_kernel(_sk.rows_packed_sums, key, x.size,
                                             x.reshape(geo.shape2), geo.rows_per_block, k)
    else:
        packed, count, mean, m2 = run_kernel(
            _sk.planes_packed_sums, key, x.size, x.reshape(geo.outer, geo.nch, geo.inner),
            *geo.reduce_blocks, k)
    shape = geo.param_shape
    if len(shape) > 1:
        packed = packed.reshape((3,) + shape)
        count, mean, m2 = count.reshape(shape), mean.reshape(shape), m2.reshape(shape)
    return packed, count, mean, m2


def normalize_from_sums(x, reduce_axes, summed, shift, gamma, beta, epsilon):
    """`distbn.ops.batch_norm.normalize_from_sums` in one compiled call (same bits)."""
    geo = fused_geometry(x, reduce_axes)
    if geo is None:
        return _ref.normalize_from_sums(x, reduce_axes, summed, shift, gamma, beta, epsilon)
    summed = np.ascontiguousarray(summed, dtype=_F64).reshape(3, geo.nch)
    g = _UNUSED if gamma is None else _vec64(gamma, geo)  # rows: the kernel tiles them
    b = _UNUSED if beta is None else _vec64(beta, geo)
    out = np.empty_like(x)
    args = (summed, _vec64(shift, geo))
    flags = (float(epsilon), gamma is not None, beta is not None)
    key = _key("normalize_from_sums", geo, x)
    if geo.kind == "rows":
        mean, var, total, ill = run_kernel(_sk.rows_normalize_from_sums, key, x.size,
                                           x.reshape(geo.shape2), *args, g, b, *flags,
                                           out.reshape(geo.wide2), *geo.elementwise_args)
    else:
        mean, var, total, ill = run_kernel(_sk.planes_normalize_from_sums, key, x.size,
                                           x.reshape(geo.shape2), *args, g, b, *flags,
                                           out.reshape(geo.shape2), *geo.elementwise_args)
    shape = geo.param_shape
    if len(shape) > 1:
        mean, var, total = mean.reshape(shape), var.reshape(shape), total.reshape(shape)
    return (None if ill else out), mean, var, total


def input_grad_from_sums(dy, x, mean, inv_std, gamma, summed, count, reduce_axes):
    """`distbn.ops.batch_norm.input_grad_from_sums` in one compiled call (same bits)."""
    geo = fused_geometry(x, reduce_axes)
    if geo is None or not _like(dy, x):
        return _ref.input_grad_from_sums(dy, x, mean, inv_std, gamma, summed, count,
                                         reduce_axes)
    summed = np.ascontiguousarray(summed, dtype=_F64).reshape(2, geo.nch)
    args = (summed, _vec64(mean, geo), _vec64(inv_std, geo),
            _UNUSED if gamma is None else _vec64(gamma, geo), gamma is not None,
            _vec64(count, geo))
    dx = np.empty_like(x)
    key = _key("input_grad_from_sums", geo, x, dy.flags.writeable)
    if geo.kind == "rows":
        run_kernel(_sk.rows_input_grad_from_sums, key, x.size, dy.reshape(geo.shape2),
                   x.reshape(geo.shape2), *args, dx.reshape(geo.wide2),
                   *geo.elementwise_args)
    else:
        run_kernel(_sk.planes_input_grad_from_sums, key, x.size, dy.reshape(geo.shape2),
                   x.reshape(geo.shape2), *args, dx.reshape(geo.shape2),
                   *geo.elementwise_args)
    return dx


def update_running(running_mean, running_var, count, mean, var, factor):
    """`distbn.ops.batch_norm.update_running`, compiled for float32/float64 (C,) arrays."""
    arrays = [a for a in (running_mean, running_var) if a is not None]
    if not arrays or not all(type(a) is np.ndarray and a.dtype in _FLOATS and a.ndim == 1
                             and a.flags.c_contiguous and a.flags.writeable
                             for a in arrays):
        return _ref.update_running(running_mean, running_var, count, mean, var, factor)
    n = float(np.ravel(count)[0]) if np.size(count) else 0.0
    if n <= 0:
        return
    stand_in = arrays[0]  # for a missing array: passed, never written (its flag is off)
    _sk.update_running(stand_in if running_mean is None else running_mean,
                       stand_in if running_var is None else running_var,
                       running_mean is not None, running_var is not None, n, np.ravel(mean),
                       np.ravel(var), float(factor))


# --- helpers ----------------------------------------------------------------------------
def _flags(geo, x, mask):
    """The mask as one flag per kernel row: None (no mask), or False when it varies in a row.

    A row is an outer position for "rows" (the flag may not vary across the channels),
    an (outer, channel) pair for "planes" (it may not vary along the axes after them).
    """
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != x.ndim:
        return False
    varying = (range(geo.ch_start, geo.ch_stop) if geo.kind == "rows"
               else range(geo.ch_stop, x.ndim))
    if any(mask.shape[a] != 1 for a in varying):
        return False
    stop = geo.ch_start if geo.kind == "rows" else geo.ch_stop
    head = np.broadcast_to(mask.reshape(mask.shape[:stop]), x.shape[:stop])
    # One flag per kernel row (the input has C or I elements per row): a small copy.
    return np.ascontiguousarray(head, dtype=bool).reshape(-1)


def _affine(x, geo, scale, offset):
    """`x * scale + offset` per channel (the channel vectors already in x's dtype)."""
    out = np.empty_like(x)
    kernel = _k.rows_affine if geo.kind == "rows" else _k.planes_affine
    run_kernel(kernel, _key("affine", geo, x), x.size, x.reshape(geo.wide2),
               _wide(scale, geo), _wide(offset, geo), out.reshape(geo.wide2),
               *geo.elementwise_args)
    return out


def _wide(v, geo):
    """A (C,) channel vector tiled for the widened rows (itself when they are not)."""
    return v if geo.reps == 1 else np.concatenate((v,) * geo.reps)  # 3x np.tile's speed


def _narrow_args(geo):
    """`elementwise_args` for the unwidened (R, C) rows view."""
    if geo.kind != "rows":
        return geo.elementwise_args
    return (geo.rows_per_block,)


def _key(name, geo, x, *more):
    """What selects a numba specialisation: kernel, view, dtype, read-only-ness, mask."""
    return (name, geo.kind, x.dtype.char, x.flags.writeable) + more


def _vec64(v, geo):
    """A channel array as a contiguous float64 (C,) vector (no copy when it is one)."""
    if (type(v) is np.ndarray and v.dtype == _F64 and v.ndim == 1 and v.shape[0] == geo.nch
            and v.flags.c_contiguous):
        return v
    return _channel_vec(v, _F64, geo)


def _channel_vec(v, dtype, geo):
    """A channel array (or scalar) as a contiguous (C,) vector of `dtype`."""
    v = np.asarray(v)
    if v.size != geo.nch:
        v = np.broadcast_to(v, geo.param_shape)
    return np.ascontiguousarray(v, dtype=dtype).reshape(geo.nch)


def _moving_ok(v, geo) -> bool:
    """Whether a moving-statistics array can be updated in place by the kernel."""
    return (type(v) is np.ndarray and v.dtype in _FLOATS and v.size == geo.nch
            and v.flags.c_contiguous and v.flags.writeable)


def _like(dy, x) -> bool:
    """Whether dy can share x's fused view (same shape and dtype, C-contiguous)."""
    return (isinstance(dy, np.ndarray) and dy.shape == x.shape and dy.dtype == x.dtype
            and dy.flags.c_contiguous)
