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
from distbn.ops.batch_norm import moments_from_sums, pack_moments, shifted_sums, unpack_moments

__all__ = ["ill_conditioned", "pooled_moments", "pooled_moments_compiled",
           "synchronized_backward", "synchronized_moments"]

# Above this (mean - shift)² / (var + epsilon), the shifted float64 sums lose more than
# about 1e-10 of the accuracy of var + epsilon, which is what the output depends on (the
# loss is ~2^-53 times the ratio). Counting epsilon keeps constant channels (var = 0)
# from triggering the corrective pass at every step.
_CONDITION_LIMIT = 1e6


def ill_conditioned(count, offset, var, epsilon) -> bool:
    """Whether any channel's shifted variance may have lost accuracy to cancellation."""
    seen = count > 0
    return bool(np.any(seen & (np.square(offset) > _CONDITION_LIMIT * (var + epsilon))))


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
        # S2/N - (S1/N)² cancels when the shift is far from the mean: sum the exact
        # centred sums M2_r + n_r (mean_r - mean)² instead.
        centred = np.ascontiguousarray(m2 + count * np.square(local_mean - mean))
        var = reduce(centred) / np.maximum(total, 1.0)
    return mean, var, total


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
        if np.any((total > 0) & (np.square(offset) > _CONDITION_LIMIT * (var + epsilon))):
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
    dx = kern.input_grad(dy, x, mean, inv_std, gamma, sums[0], sums[1], count, reduce_axes,
                         mask)
    return local, dx
