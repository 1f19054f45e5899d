"""Batch-normalization kernels: pure numpy functions, no state, no MPI.

Per-channel quantities ("channel arrays") have the parameter shape: the input's sizes
along its channel axes, i.e. `x.shape` without `reduce_axes`. Statistics and gradient
sums are float64 whatever the input dtype; full-size temporaries stay in `x.dtype`
(float32 or float64: the layer upcasts float16 before calling these).

Forward, training, one replica: `y, count, mean, var = train_forward(...)`, which is
`local_mean_m2`, `var = m2 / max(count, 1)`, `update_moving` and `normalize` in one
call (numba's version runs them in one compiled function).

Forward, training (the synchronized layer inserts one all-reduce at step 3):
    1. `count, mean, m2 = local_mean_m2(x, reduce_axes, mask)`   exact two-pass
    2. `s1, s2 = shifted_sums(count, mean, m2, shift)`; `buf = pack_moments(count, s1, s2)`
    3. (sync) `buf` summed over replicas
    4. `mean, var = moments_from_sums(*unpack_moments(buf), shift)`
    5. `y = normalize(x, mean, var, gamma, beta, epsilon, reduce_axes)`
Backward, training, one replica: `sums, dx = train_backward(...)`, which is
`backward_sums` then `input_grad` with those sums (numba's version runs them in one
compiled function for channels-first inputs).

`distbn.ops.sync.synchronized_train_forward` runs steps 1-2 as `local_packed_sums` and
steps 4-5 as `normalize_from_sums` (one compiled call each in numba's version).

Backward, training (one all-reduce at step 2):
    1. `sums = backward_sums(dy, x, mean, inv_std, reduce_axes)`   [Σdy, Σdy·x̂]
       (local: these are also beta's and gamma's gradients)
    2. (sync) `sums` summed over replicas
    3. `dx = input_grad(dy, x, mean, inv_std, gamma, sums[0], sums[1], count, ...)`
       (`input_grad_from_sums(dy, x, mean, inv_std, gamma, sums, count, ...)`)

Masks (statistics over unmasked positions, every position normalised). With M the
0/1 mask, N = ΣM, x̂ = (x − μ)·r, r = (σ² + ε)^-½ and y = γx̂ + β at *every* position,
    ∂L/∂x_i = γ r [g_i − (M_i / N)(Σ_j g_j + x̂_i Σ_j g_j x̂_j)],   g = ∂L/∂y,
where both sums run over ALL positions (every output depends on μ and σ²), so they are
exactly β's and γ's gradients; the mask only gates the correction term. Without a
mask this is the usual formula.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "reduce_axes_for", "local_mean_m2", "shifted_sums", "local_moments", "pack_moments",
    "unpack_moments", "moments_from_sums", "inverse_std", "normalize", "backward_sums",
    "input_grad", "update_moving", "train_forward", "train_backward", "CONDITION_LIMIT",
    "ill_conditioned", "local_packed_sums", "normalize_from_sums", "input_grad_from_sums",
    "update_running",
]

_F64 = np.float64


def reduce_axes_for(ndim: int, channel_axes) -> tuple:
    """The axes statistics reduce over: every axis of an `ndim` input but the channel axes.

    Args:
        ndim: the input's rank.
        channel_axes: non-negative channel axes.

    Returns:
        Sorted tuple of the other axes.
    """
    keep = set(channel_axes)
    return tuple(a for a in range(ndim) if a not in keep)


def _expand(v, reduce_axes):
    """A channel array reshaped to broadcast against the input (size 1 on reduce axes)."""
    return np.expand_dims(v, tuple(reduce_axes)) if reduce_axes else v


def _count(x_shape, reduce_axes, mask):
    """Per-channel float64 number of positions that enter the statistics."""
    param_shape = tuple(d for a, d in enumerate(x_shape) if a not in reduce_axes)
    if mask is None:
        n = math.prod(x_shape[a] for a in reduce_axes)
        return np.full(param_shape, n, dtype=_F64)
    n = np.sum(mask, axis=reduce_axes, keepdims=True, dtype=_F64)
    # A mask axis of size 1 broadcast over a longer input axis counts that many times.
    n *= math.prod(x_shape[a] for a in reduce_axes if mask.shape[a] == 1)
    keep_shape = tuple(1 if a in reduce_axes else d for a, d in enumerate(x_shape))
    return np.broadcast_to(n, keep_shape).reshape(param_shape).copy()


def local_mean_m2(x, reduce_axes, mask=None):
    """Exact per-channel count, mean and centred sum of squares M2 of the local data.

    Two passes: the mean, then the centred squares; the residual sum of the second pass
    corrects the mean's rounding, so float32 data with a large mean stays accurate.

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        mask: None, or a boolean array with x's rank, broadcastable to x: True where a
            position enters the statistics.

    Returns:
        (count, mean, m2): float64 channel arrays; mean = 0 and m2 = 0 where count = 0.
    """
    reduce_axes = tuple(reduce_axes)
    count = _count(x.shape, reduce_axes, mask)
    if mask is None:
        total = np.sum(x, axis=reduce_axes, dtype=_F64)
        work = None
    else:
        work = np.multiply(x, mask, dtype=x.dtype)  # the one full-size temporary
        total = np.sum(work, axis=reduce_axes, dtype=_F64)
    nonzero = count > 0
    mean = np.divide(total, count, out=np.zeros_like(total), where=nonzero)
    mean_w = mean.astype(x.dtype)  # centre in x's dtype: no float64 full-size copy
    work = np.subtract(x, _expand(mean_w, reduce_axes), out=work)
    if mask is not None:
        work *= mask
    resid = np.sum(work, axis=reduce_axes, dtype=_F64)
    np.square(work, out=work)
    sq = np.sum(work, axis=reduce_axes, dtype=_F64)
    shift = np.divide(resid, count, out=np.zeros_like(resid), where=nonzero)
    mean = mean_w.astype(_F64) + shift
    m2 = np.maximum(sq - resid * shift, 0.0)
    return count, mean, m2


def shifted_sums(count, mean, m2, shift):
    """Shifted sums S1 = Σ(x−K), S2 = Σ(x−K)² from exact local (count, mean, M2).

    Args:
        count, mean, m2: float64 channel arrays from `local_mean_m2`.
        shift: channel array K, identical on every replica that sums these.

    Returns:
        (s1, s2): float64 channel arrays, 0 where count = 0.
    """
    d = np.subtract(mean, shift, dtype=_F64)
    s1 = count * d
    return s1, m2 + s1 * d


def local_moments(x, reduce_axes, shift, mask=None):
    """Per-channel float64 (count n, S1 = Σ(x−K), S2 = Σ(x−K)²) over unmasked positions.

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        shift: channel array K (the moving mean in a synchronized layer).
        mask: None or a boolean array with x's rank, broadcastable to x.

    Returns:
        (count, s1, s2): float64 channel arrays.
    """
    count, mean, m2 = local_mean_m2(x, reduce_axes, mask)
    s1, s2 = shifted_sums(count, mean, m2, shift)
    return count, s1, s2


def pack_moments(count, s1, s2) -> np.ndarray:
    """One contiguous float64 buffer [S1, S2, n] (shape (3, *channel shape)) to all-reduce."""
    buf = np.empty((3,) + np.shape(count), dtype=_F64)
    buf[0], buf[1], buf[2] = s1, s2, count
    return buf


def unpack_moments(buf):
    """(count, s1, s2) views of a buffer made by `pack_moments`."""
    return buf[2], buf[0], buf[1]


def moments_from_sums(count, s1, s2, shift):
    """Mean and biased variance from (possibly globally summed) shifted sums.

    Args:
        count, s1, s2: float64 channel arrays (total count N, S1, S2).
        shift: the channel array K the sums were taken about.

    Returns:
        (mean, var): `K + S1/N` and `max(S2/N − (S1/N)², 0)`; where N = 0, K and 0
        (the caller then keeps and uses the moving statistics).
    """
    # N = 0 means S1 = S2 = 0 (no position): dividing by max(N, 1) gives the 0s.
    n = np.maximum(count, 1.0)
    d = np.divide(s1, n, dtype=_F64)
    ex2 = np.divide(s2, n, dtype=_F64)
    mean = np.add(shift, d, dtype=_F64)
    ex2 -= d * d
    var = np.maximum(ex2, 0.0, out=ex2)  # rounding can make it slightly negative
    return mean, var


# Above this (mean - shift)² / (var + epsilon), the shifted float64 sums lose more than
# about 1e-10 of the accuracy of var + epsilon, which is what the output depends on (the
# loss is ~2^-53 times the ratio). Counting epsilon keeps constant channels (var = 0)
# from triggering the corrective pass at every step.
CONDITION_LIMIT = 1e6


def ill_conditioned(count, offset, var, epsilon) -> bool:
    """Whether any channel's shifted variance may have lost accuracy to cancellation."""
    seen = count > 0
    return bool(np.any(seen & (np.square(offset) > CONDITION_LIMIT * (var + epsilon))))


def local_packed_sums(x, reduce_axes, shift):
    """Steps 1-2 of the synchronized forward: the buffer to all-reduce, and the local
    moments (for `distbn.ops.sync`'s corrective pass).

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        shift: channel array K, identical on every replica.

    Returns:
        (packed, count, mean, m2): `pack_moments`' (3, *channel shape) [S1, S2, n] and
        `local_mean_m2`'s float64 channel arrays.
    """
    count, mean, m2 = local_mean_m2(x, reduce_axes)
    return pack_moments(count, *shifted_sums(count, mean, m2, shift)), count, mean, m2


def normalize_from_sums(x, reduce_axes, summed, shift, gamma, beta, epsilon):
    """Steps 4-5 of the synchronized forward, from the summed `local_packed_sums` buffer.

    Returns:
        (y, mean, var, total): y is None when `ill_conditioned` (the caller repairs the
        variance and normalises); mean, var and the global count are float64.
    """
    total, s1, s2 = unpack_moments(summed)
    mean, var = moments_from_sums(total, s1, s2, shift)
    if ill_conditioned(total, mean - shift, var, epsilon):
        return None, mean, var, total
    return normalize(x, mean, var, gamma, beta, epsilon, reduce_axes), mean, var, total


def inverse_std(var, epsilon):
    """Per-channel float64 `1 / sqrt(var + epsilon)`."""
    return 1.0 / np.sqrt(np.asarray(var, dtype=_F64) + epsilon)


def normalize(x, mean, var, gamma, beta, epsilon, reduce_axes):
    """`gamma * (x − mean) / sqrt(var + epsilon) + beta`, in one multiply-add pass.

    Args:
        x: float32 or float64 array.
        mean, var: channel arrays.
        gamma, beta: channel arrays, or None (scale 1, offset 0).
        epsilon: positive float.
        reduce_axes: tuple of axes the channel arrays broadcast over.

    Returns:
        y with x's shape and dtype.
    """
    scale = inverse_std(var, epsilon)
    if gamma is not None:
        scale = scale * gamma
    offset = -np.asarray(mean, dtype=_F64) * scale
    if beta is not None:
        offset = offset + beta
    y = np.multiply(x, _expand(scale.astype(x.dtype), reduce_axes))
    y += _expand(offset.astype(x.dtype), reduce_axes)
    return y


def update_moving(moving_mean, moving_var, count, mean, var, momentum):
    """`moving = moving * momentum + batch * (1 - momentum)`, in place, where it is safe.

    Channels with no position (count 0) keep their moving statistics and are
    normalised with them. Non-finite batch statistics (a NaN or inf in the batch) never
    reach the moving ones: those channels keep theirs too.

    Args:
        moving_mean, moving_var: the moving-statistics arrays, updated in place (the
            float64 results are rounded to their dtype).
        count, mean, var: float64 channel arrays of the batch.
        momentum: float in [0, 1].

    Returns:
        (mean, var): float64 statistics to normalise with.
    """
    old_mean = moving_mean.astype(_F64)
    old_var = moving_var.astype(_F64)
    seen = count > 0
    if not seen.all():
        mean = np.where(seen, mean, old_mean)
        var = np.where(seen, var, old_var)
    new_mean = old_mean * momentum + mean * (1.0 - momentum)
    new_var = old_var * momentum + var * (1.0 - momentum)
    update = seen & np.isfinite(mean) & np.isfinite(var)
    if not update.all():  # the common case needs no select
        new_mean = np.where(update, new_mean, old_mean)
        new_var = np.where(update, new_var, old_var)
    moving_mean[...] = new_mean
    moving_var[...] = new_var
    return mean, var


def train_forward(x, reduce_axes, mask, gamma, beta, epsilon, moving_mean, moving_var,
                  momentum):
    """One replica's training forward: batch statistics, moving averages, normalisation.

    Args:
        x: float32 or float64 array.
        reduce_axes: tuple of axes to reduce over.
        mask: None or a boolean array with x's rank, broadcastable to x.
        gamma, beta: float64 channel arrays, or None (scale 1, offset 0).
        epsilon: positive float.
        moving_mean, moving_var: moving-statistics arrays, updated in place
            (`update_moving`).
        momentum: float in [0, 1].

    Returns:
        (y, count, mean, var): y in x's dtype; float64 channel arrays of the count and
        the statistics y was normalised with.
    """
    return compose_train_forward(local_mean_m2, normalize, x, reduce_axes, mask, gamma,
                                 beta, epsilon, moving_mean, moving_var, momentum)


def compose_train_forward(moments_fn, normalize_fn, x, reduce_axes, mask, gamma, beta,
                          epsilon, moving_mean, moving_var, momentum):
    """`train_forward` from a backend's `local_mean_m2` and `normalize` (same arguments)."""
    count, mean, m2 = moments_fn(x, reduce_axes, mask)
    mean, var = update_moving(moving_mean, moving_var, count, mean,
                              m2 / np.maximum(count, 1.0), momentum)
    y = normalize_fn(x, mean, var, gamma, beta, epsilon, reduce_axes)
    return y, count, mean, var


def train_backward(dy, x, mean, inv_std, gamma, count, reduce_axes, mask=None):
    """One replica's training backward: local sums are the batch's.

    Args:
        dy, x, mean, inv_std, gamma, count, reduce_axes, mask: as `input_grad` (count
            not None: training mode).

    Returns:
        (sums, dx): `backward_sums`' float64 [Σdy, Σdy·x̂] (also beta's and gamma's
        gradients) and `input_grad`'s dx.
    """
    return compose_train_backward(backward_sums, input_grad, dy, x, mean, inv_std, gamma,
                                  count, reduce_axes, mask)


def compose_train_backward(sums_fn, input_grad_fn, dy, x, mean, inv_std, gamma, count,
                           reduce_axes, mask=None):
    """`train_backward` from a backend's `backward_sums` and `input_grad`."""
    sums = sums_fn(dy, x, mean, inv_std, reduce_axes)
    dx = input_grad_fn(dy, x, mean, inv_std, gamma, sums[0], sums[1], count, reduce_axes,
                       mask)
    return sums, dx


def backward_sums(dy, x, mean, inv_std, reduce_axes) -> np.ndarray:
    """Local per-channel float64 [Σdy, Σdy·x̂] over ALL positions, packed in one buffer.

    These are beta's and gamma's gradients, and (summed over replicas) the two sums
    the input gradient needs. Masked positions are included: they are normalised with
    the batch statistics, so their outputs depend on them too.

    Args:
        dy: gradient of the output, x's shape.
        x: the input (float32 or float64).
        mean, inv_std: channel arrays x̂ was formed with.
        reduce_axes: tuple of axes to reduce over.

    Returns:
        float64 array of shape (2, *channel shape): [Σdy, Σdy·x̂].
    """
    reduce_axes = tuple(reduce_axes)
    out = np.empty((2,) + tuple(np.shape(inv_std)), dtype=_F64)
    np.sum(dy, axis=reduce_axes, dtype=_F64, out=out[0])
    centred = np.subtract(x, _expand(np.asarray(mean).astype(x.dtype), reduce_axes))
    centred *= dy
    np.sum(centred, axis=reduce_axes, dtype=_F64, out=out[1])
    out[1] *= inv_std
    return out


def input_grad(dy, x, mean, inv_std, gamma, sum_dy, sum_dy_xhat, count, reduce_axes,
               mask=None):
    """Exact input gradient of batch normalization.

    Args:
        dy: gradient of the output, x's shape.
        x: the input (float32 or float64).
        mean, inv_std: channel arrays the forward pass normalised with.
        gamma: channel array or None (scale 1).
        sum_dy, sum_dy_xhat: channel arrays Σdy and Σdy·x̂ over all positions of the
            whole (global) batch; ignored when `count` is None.
        count: float64 channel array N, the global number of positions in the
            statistics; None in inference mode (the statistics are constants).
        reduce_axes: tuple of axes to reduce over.
        mask: None or the boolean forward mask (x's rank, broadcastable to x).

    Returns:
        dx in x's dtype: `γr·dy − (M γr / N)(Σdy + x̂ Σdy·x̂)` in training mode, `γr·dy`
        in inference mode (and for channels with N = 0).
    """
    reduce_axes = tuple(reduce_axes)
    a = np.asarray(inv_std, dtype=_F64)
    if gamma is not None:
        a = a * gamma
    dx = np.multiply(dy, _expand(a.astype(x.dtype), reduce_axes), dtype=x.dtype)
    if count is None:
        return dx
    coef = np.divide(a, count, out=np.zeros_like(a), where=count > 0)
    c1 = coef * sum_dy
    k = coef * sum_dy_xhat * inv_std
    # k·(x − μ) + c1 with x − μ formed first: no cancellation when |μ| >> σ.
    corr = np.subtract(x, _expand(np.asarray(mean).astype(x.dtype), reduce_axes))
    corr *= _expand(k.astype(x.dtype), reduce_axes)
    corr += _expand(c1.astype(x.dtype), reduce_axes)
    if mask is not None:
        corr *= mask
    dx -= corr
    return dx


def input_grad_from_sums(dy, x, mean, inv_std, gamma, summed, count, reduce_axes):
    """`input_grad` (training, no mask) from a (2, *channel shape) [Σdy, Σdy·x̂] buffer."""
    return input_grad(dy, x, mean, inv_std, gamma, summed[0], summed[1], count,
                      reduce_axes)


def update_running(running_mean, running_var, count, mean, var, factor):
    """PyTorch's running statistics: `running = (1 − f)·running + f·stat`, in place.

    The variance that enters is the unbiased one, var·N/(N − 1) with the batch's count
    N; an empty batch (N = 0) leaves both untouched. Non-finite statistics propagate,
    as in PyTorch. The arithmetic is float64, rounded once to the arrays' dtype.

    Args:
        running_mean, running_var: float arrays updated in place, or None (skipped).
        count: the batch's count (a channel array; every channel has the same).
        mean, var: float64 channel arrays of the batch (var biased).
        factor: the exponential average factor f.
    """
    n = float(np.ravel(count)[0]) if np.size(count) else 0.0
    if n <= 0:
        return
    for running, stat in ((running_mean, mean), (running_var, var * (n / (n - 1.0)))):
        if running is not None:
            running[...] = (1.0 - factor) * running.astype(_F64) + factor * stat
