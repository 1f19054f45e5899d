"""numba kernels of a synchronized training step, on either side of its all-reduce.

A synchronized forward cannot normalise before every replica's sums are in, and its
backward cannot form dx before the summed [Σdy, Σdy·x̂]; so each is two compiled calls
around the collective (`distbn.ops.fused.local_packed_sums`, `normalize_from_sums`,
`backward_sums`, `input_grad_from_sums`). Each call does what `distbn.ops.sync` did in
several numpy steps of a few microseconds each, which at the small inputs of a
network's later stages cost more than the passes over the data. The arithmetic is the
numpy reference's, step for step (the same bits; tests/test_train_step.py). The last
kernels are `distbn.ops.step.TrainStep`'s: one replica's forward and the synchronized
forward's second half with PyTorch's running update and 1/√(var + ε) in the same call.

Imported with `distbn.ops.fused`, only when numba is installed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distbn.ops._fused_kernels import (
    _constants_of_sums,
    planes_grad_sums,
    planes_input_grad,
    planes_moments,
    planes_normalize,
    planes_train_forward,
    rows_grad_sums,
    rows_input_grad_wide,
    rows_moments,
    rows_normalize_wide,
    rows_train_forward,
)
from distbn.ops.batch_norm import CONDITION_LIMIT

__all__ = ["pack_shifted", "moments_of_sums", "rows_packed_sums", "planes_packed_sums",
           "rows_normalize_from_sums", "planes_normalize_from_sums", "rows_grad_sums_hat",
           "planes_grad_sums_hat", "rows_input_grad_from_sums", "planes_input_grad_from_sums",
           "update_running", "rows_train_forward_running", "planes_train_forward_running",
           "rows_finish_forward_running", "planes_finish_forward_running"]


@njit(cache=True, error_model="numpy")
def pack_shifted(count, mean, m2, shift):
    """`pack_moments(count, *shifted_sums(count, mean, m2, shift))`: float64 (3, C)
    [S1, S2, n] with S1 = n(mean − K), S2 = M2 + S1(mean − K)."""
    nch = count.shape[0]
    buf = np.empty((3, nch))
    for c in range(nch):
        d = mean[c] - shift[c]
        s1 = count[c] * d
        buf[0, c] = s1
        buf[1, c] = m2[c] + s1 * d
        buf[2, c] = count[c]
    return buf


@njit(cache=True, error_model="numpy")
def moments_of_sums(summed, shift, epsilon):
    """`moments_from_sums` of a summed [S1, S2, n] buffer, and `ill_conditioned`.

    Returns:
        (mean, var, total, ill): float64 (C,) arrays and a bool.
    """
    nch = shift.shape[0]
    mean = np.empty(nch)
    var = np.empty(nch)
    total = np.empty(nch)
    ill = False
    for c in range(nch):
        n = summed[2, c]
        nn = max(n, 1.0)
        d = summed[0, c] / nn
        ex2 = summed[1, c] / nn
        ex2 -= d * d
        m = shift[c] + d
        v = 0.0 if ex2 < 0.0 else ex2  # NaN stays NaN, as np.maximum
        mean[c] = m
        var[c] = v
        total[c] = n
        offset = m - shift[c]
        if n > 0 and offset * offset > CONDITION_LIMIT * (v + epsilon):
            ill = True
    return mean, var, total, ill


@njit(cache=True)
def rows_packed_sums(x2, rows_per_block, shift):
    """`rows_moments` of (R, C) rows and their packed shifted sums.

    Returns:
        (packed, count, mean, m2): the (3, C) buffer to all-reduce and the local
        float64 (count, mean, M2) (for the corrective pass, when one is needed).
    """
    count, mean, m2 = rows_moments(x2, None, rows_per_block)
    return pack_shifted(count, mean, m2, shift), count, mean, m2


@njit(cache=True)
def planes_packed_sums(x3, outer_per_block, chan_per_block, shift):
    """`rows_packed_sums` of (O, C, I) planes (`planes_moments`)."""
    count, mean, m2 = planes_moments(x3, None, outer_per_block, chan_per_block)
    return pack_shifted(count, mean, m2, shift), count, mean, m2


@njit(cache=True, error_model="numpy")
def rows_normalize_from_sums(x2, summed, shift, gamma, beta, epsilon, use_gamma, use_beta,
                             out, wide_rows_per_block):
    """The global moments of `summed`, then (unless ill-conditioned) the normalisation of
    (R, C) rows into y's widened view `out`.

    Returns:
        (mean, var, total, ill); `out` is left unwritten when `ill`.
    """
    mean, var, total, ill = moments_of_sums(summed, shift, epsilon)
    if not ill:
        rows_normalize_wide(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out,
                            wide_rows_per_block)
    return mean, var, total, ill


@njit(cache=True, error_model="numpy")
def planes_normalize_from_sums(x2, summed, shift, gamma, beta, epsilon, use_gamma,
                               use_beta, out, nch, rows_per_block):
    """`rows_normalize_from_sums` of (O*C, I) rows whose channel is `row % nch`."""
    mean, var, total, ill = moments_of_sums(summed, shift, epsilon)
    if not ill:
        planes_normalize(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out, nch,
                         rows_per_block)
    return mean, var, total, ill


@njit(cache=True, error_model="numpy")
def _hat(sums, inv_std):
    """[Σdy, Σdy·(x−mu)] -> [Σdy, Σdy·x̂] in place, as `backward_sums` scales them."""
    for c in range(sums.shape[1]):
        sums[1, c] *= inv_std[c]
    return sums


@njit(cache=True)
def rows_grad_sums_hat(dy2, x2, mean, inv_std, rows_per_block):
    """`backward_sums` of (R, C) rows: float64 (2, C) [Σdy, Σdy·x̂]."""
    return _hat(rows_grad_sums(dy2, x2, mean, rows_per_block), inv_std)


@njit(cache=True)
def planes_grad_sums_hat(dy3, x3, mean, inv_std, outer_per_block, chan_per_block):
    """`backward_sums` of (O, C, I) planes."""
    return _hat(planes_grad_sums(dy3, x3, mean, outer_per_block, chan_per_block), inv_std)


@njit(cache=True, error_model="numpy")
def _grad_constants(summed, mean, inv_std, gamma, use_gamma, count, dtype):
    """(4, C) [a, mu, k, c1] in x's dtype from the summed [Σdy, Σdy·x̂]."""
    nch = mean.shape[0]
    consts = np.empty((4, nch), dtype=dtype)
    for c in range(nch):
        _constants_of_sums(summed[0, c], summed[1, c], mean[c], inv_std[c],
                           gamma[c] if use_gamma else 1.0, use_gamma, count[c], consts, c)
    return consts


@njit(cache=True)
def rows_input_grad_from_sums(dy2, x2, summed, mean, inv_std, gamma, use_gamma, count,
                              dxw, wide_rows_per_block):
    """`input_grad` (no mask) of (R, C) rows from the summed [Σdy, Σdy·x̂], into dx's
    widened view `dxw`."""
    consts = _grad_constants(summed, mean, inv_std, gamma, use_gamma, count, x2.dtype)
    rows_input_grad_wide(dy2, x2, consts, dxw, wide_rows_per_block)


@njit(cache=True)
def planes_input_grad_from_sums(dy2, x2, summed, mean, inv_std, gamma, use_gamma, count,
                                dx2, nch, rows_per_block):
    """`input_grad` (no mask) of (O*C, I) rows whose channel is `row % nch`."""
    consts = _grad_constants(summed, mean, inv_std, gamma, use_gamma, count, x2.dtype)
    planes_input_grad(dy2, x2, consts[0], consts[1], consts[2], consts[3], None, dx2, nch,
                      rows_per_block)


@njit(cache=True, error_model="numpy")
def update_running(running_mean, running_var, use_mean, use_var, n, mean, var, factor):
    """`distbn.ops.batch_norm.update_running` (n > 0), with its float64 steps."""
    bessel = n / (n - 1.0)
    for c in range(mean.shape[0]):
        if use_mean:
            running_mean[c] = (1.0 - factor) * np.float64(running_mean[c]) + factor * mean[c]
        if use_var:
            running_var[c] = ((1.0 - factor) * np.float64(running_var[c])
                              + factor * (var[c] * bessel))


# --- one call per step with PyTorch's running statistics (`distbn.ops.step.TrainStep`) ----
@njit(cache=True, error_model="numpy")
def _running_and_inverse(count, mean, var, epsilon, running_mean, running_var, use_running,
                         factor):
    """`update_running` (when use_running and the batch is not empty), then the float64
    1/√(var + ε) of `distbn.ops.batch_norm.inverse_std`."""
    n = count[0] if count.shape[0] else 0.0
    if use_running and n > 0:
        update_running(running_mean, running_var, True, True, n, mean, var, factor)
    inv_std = np.empty(mean.shape[0])
    for c in range(mean.shape[0]):
        inv_std[c] = 1.0 / np.sqrt(var[c] + epsilon)
    return inv_std


@njit(cache=True, error_model="numpy")
def rows_train_forward_running(x2, rows_per_block, gamma, beta, epsilon, use_gamma,
                               use_beta, running_mean, running_var, use_running, factor,
                               out, wide_rows_per_block):
    """One replica's forward of (R, C) rows in one call: `rows_train_forward` (its
    moving update on scratch arrays, standing in for nothing: R > 0), PyTorch's running
    update and the inverse standard deviation.

    Returns:
        (count, mean, var, inv_std): float64 (C,); `out` (y's widened view) holds y.
    """
    nch = x2.shape[1]
    count, mean, var = rows_train_forward(x2, rows_per_block, gamma, beta, epsilon,
                                          use_gamma, use_beta, np.zeros(nch), np.ones(nch),
                                          1.0, out, wide_rows_per_block)
    inv_std = _running_and_inverse(count, mean, var, epsilon, running_mean, running_var,
                                   use_running, factor)
    return count, mean, var, inv_std


@njit(cache=True, error_model="numpy")
def planes_train_forward_running(x3, outer_per_block, chan_per_block, gamma, beta, epsilon,
                                 use_gamma, use_beta, running_mean, running_var,
                                 use_running, factor, out3):
    """`rows_train_forward_running` of (O, C, I) planes (`planes_train_forward`)."""
    nch = x3.shape[1]
    count, mean, var = planes_train_forward(x3, outer_per_block, chan_per_block, gamma,
                                            beta, epsilon, use_gamma, use_beta,
                                            np.zeros(nch), np.ones(nch), 1.0, out3)
    inv_std = _running_and_inverse(count, mean, var, epsilon, running_mean, running_var,
                                   use_running, factor)
    return count, mean, var, inv_std


@njit(cache=True, error_model="numpy")
def rows_finish_forward_running(x2, summed, shift, gamma, beta, epsilon, use_gamma,
                                use_beta, running_mean, running_var, use_running, factor,
                                out, wide_rows_per_block):
    """`rows_normalize_from_sums`, then (unless ill-conditioned) PyTorch's running update
    with the global count and the inverse standard deviation.

    Returns:
        (mean, var, total, inv_std, ill); nothing is written when `ill`.
    """
    mean, var, total, ill = rows_normalize_from_sums(x2, summed, shift, gamma, beta,
                                                     epsilon, use_gamma, use_beta, out,
                                                     wide_rows_per_block)
    inv_std = mean
    if not ill:
        inv_std = _running_and_inverse(total, mean, var, epsilon, running_mean,
                                       running_var, use_running, factor)
    return mean, var, total, inv_std, ill


@njit(cache=True, error_model="numpy")
def planes_finish_forward_running(x2, summed, shift, gamma, beta, epsilon, use_gamma,
                                  use_beta, running_mean, running_var, use_running, factor,
                                  out, nch, rows_per_block):
    """`rows_finish_forward_running` of (O*C, I) rows whose channel is `row % nch`."""
    mean, var, total, ill = planes_normalize_from_sums(x2, summed, shift, gamma, beta,
                                                       epsilon, use_gamma, use_beta, out,
                                                       nch, rows_per_block)
    inv_std = mean
    if not ill:
        inv_std = _running_and_inverse(total, mean, var, epsilon, running_mean,
                                       running_var, use_running, factor)
    return mean, var, total, inv_std, ill
