"""Synchronized batch statistics and their backward, over any all-reduce.

The maths every synchronized BatchNorm shares (distbn's layer, the PyTorch and Keras
adapters): local shifted sums, one summed buffer, global moments; and the backward's
[Σdy, Σdy·x̂]. The collective is a callable the caller passes in (`reduce(buf)` sums a
contiguous float64 buffer in place over the replicas and returns it), so this module
stays free of state and of MPI.
"""

from __future__ import annotations

import numpy as np

from distbn.ops.backend import kernels
from distbn.ops.batch_norm import (
    CONDITION_LIMIT,
    ill_conditioned,
    moments_from_sums,
    pack_moments,
    shifted_sums,
    unpack_moments,
)

__all__ = ["centred_var", "ill_conditioned", "pooled_moments", "pooled_moments_compiled",
           "synchronized_backward", "synchronized_moments", "synchronized_train_forward"]

def synchronized_moments(x, reduce_axes, mask, shift, epsilon, reduce):
    """Batch (mean, biased var, count) per channel over every replica, in float64.

    Args:
        x: this replica's shard (may be empty along the batch axes).
        reduce_axes: the axes that are not channels.
        mask: None, or a boolean array broadcasting to x (True = counted).
        shift: per-channel float64 K, identical on every replica (a moving mean).
        epsilon: the layer's epsilon (decides when the shifted variance is trusted).
        reduce: `reduce(buf)` sums a float64 buffer in place over the replicas.

    Returns:
        (mean, var, count): float64 per-channel arrays over the global batch. One call of
        `reduce` on the packed [S1, S2, n], a second only when the shift is far from the
        mean relative to the spread (every replica sees the same sums, so all take it).
    """
    count, local_mean, m2 = kernels().local_mean_m2(x, reduce_axes, mask)
    return pooled_moments(count, local_mean, m2, shift, epsilon, reduce)


def pooled_moments(count, local_mean, m2, shift, epsilon, reduce):
    """`synchronized_moments` from this replica's local float64 (count, mean, M2), for
    callers that compute those elsewhere (the Keras adapter does, inside XLA).

    Returns:
        (mean, var, count) over the global batch, as `synchronized_moments`.
    """
    s1, s2 = shifted_sums(count, local_mean, m2, shift)
    total, s1, s2 = unpack_moments(reduce(pack_moments(count, s1, s2)))
    mean, var = moments_from_sums(total, s1, s2, shift)
    if ill_conditioned(total, mean - shift, var, epsilon):
        var = centred_var(count, local_mean, m2, mean, total, reduce)
    return mean, var, total


def centred_var(count, local_mean, m2, mean, total, reduce):
    """The global variance by the corrective pass (one more `reduce`).

    S2/N − (S1/N)² cancels when the shift is far from the mean, so this sums the exact
    centred sums M2_r + n_r (mean_r − mean)² over the replicas instead.
    """
    centred = np.ascontiguousarray(m2 + count * np.square(local_mean - mean))
    return reduce(centred) / np.maximum(total, 1.0)


def synchronized_train_forward(x, reduce_axes, shift, gamma, beta, epsilon, reduce):
    """A synchronized training forward: the global statistics and the normalised x.

    `synchronized_moments` then `normalize`, as two kernel calls around `reduce`
    (`local_packed_sums`, `normalize_from_sums`; compiled in numba's backend); the
    corrective second `reduce` when the shift is far from the mean, on every replica
    alike.

    Args:
        x, reduce_axes, shift, epsilon, reduce: as `synchronized_moments` (no mask).
        gamma, beta: float64 channel arrays, or None (scale 1, offset 0).

    Returns:
        (y, mean, var, count): y in x's dtype, float64 statistics over the global batch.
    """
    kern = kernels()
    packed, count, local_mean, m2 = kern.local_packed_sums(x, reduce_axes, shift)
    y, mean, var, total = kern.normalize_from_sums(x, reduce_axes, reduce(packed), shift,
                                                   gamma, beta, epsilon)
    if y is None:
        var = centred_var(count, local_mean, m2, mean, total, reduce)
        y = kern.normalize(x, mean, var, gamma, beta, epsilon, reduce_axes)
    return y, mean, var, total


_COMPILED = []


def pooled_moments_compiled():
    """`pooled_moments` as a numba function, for compiled callers (XLA FFI handlers).

    `fn(count, local_mean, m2, shift, moving_var, epsilon, reduce, desc)` on float64
    1-D arrays, where `reduce(desc, buf)` returns the sum of `buf` over the replicas,
    gives (mean, var, total): the steps of `pooled_moments` in the same order (the same
    bits; tests/test_sync_compiled.py), plus the moving statistics where the global
    batch is empty, as the Keras adapter's host path does.
    """
    if not _COMPILED:
        _COMPILED.append(_make_pooled_moments_compiled())
    return _COMPILED[0]


def _make_pooled_moments_compiled():
    from numba import njit

    @njit
    def pooled(count, local_mean, m2, shift, moving_var, epsilon, reduce, desc):
        c = count.size
        d = local_mean - shift
        s1 = count * d
        buf = np.empty(3 * c)
        buf[:c], buf[c:2 * c], buf[2 * c:] = s1, m2 + s1 * d, count
        summed = reduce(desc, buf)
        total, gs1, gs2 = summed[2 * c:], summed[:c], summed[c:2 * c]
        n = np.maximum(total, 1.0)
        dd = gs1 / n
        ex2 = gs2 / n - dd * dd
        mean = shift + dd
        var = np.maximum(ex2, 0.0)
        offset = mean - shift
        if np.any((total > 0) & (np.square(offset) > CONDITION_LIMIT * (var + epsilon))):
            centred = m2 + count * np.square(local_mean - mean)
            var = reduce(desc, centred) / n
        for i in range(c):
            if total[i] == 0:
                mean[i], var[i] = shift[i], moving_var[i]
        return mean, var, total

    return pooled


def synchronized_backward(dy, x, mean, inv_std, gamma, count, reduce_axes, mask, reduce):
    """Backward of a synchronized training forward.

    Returns:
        (local_sums, dx): `local_sums` is this replica's (2, C) [Σdy, Σdy·x̂] (beta's and
        gamma's gradients, left local for the gradient all-reduce); dx uses the sums over
        every replica, from one call of `reduce`.
    """
    kern = kernels()
    sums = kern.backward_sums(dy, x, mean, inv_std, reduce_axes)
    local = sums.copy()
    sums = reduce(sums)
    if mask is None:
        dx = kern.input_grad_from_sums(dy, x, mean, inv_std, gamma, sums, count,
                                       reduce_axes)
    else:
        dx = kern.input_grad(dy, x, mean, inv_std, gamma, sums[0], sums[1], count,
                             reduce_axes, mask)
    return local, dx
