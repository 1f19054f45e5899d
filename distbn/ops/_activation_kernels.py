"""numba kernels behind `distbn.ops.activation`: each activation in one pass.

Flat C-contiguous views. Every kernel splits the elements into fixed blocks (the same at
any thread count) and does the numpy reference's arithmetic in the same order and dtype
(constants come in `consts`, an array of x's dtype, so float32 stays float32), so the
elementwise results equal the reference's up to the last ulp of the transcendental
functions (libm's vs numpy's).

ReLU-type mask codes (one uint8 per element): 0 below the threshold (slope
`negative_slope`), 1 linear (slope 1), 2 saturated at max_value (slope 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["BLOCK", "relu_forward", "relu_backward", "unary_forward", "unary_backward",
           "CODES"]

#: Elements per parallel task.
BLOCK = 1 << 15

#: Activation name -> the code the unary kernels switch on (outside their loops).
CODES = {"sigmoid": 0, "tanh": 1, "softplus": 2, "softsign": 3, "silu": 4, "elu": 5,
         "selu": 6, "exponential": 7}


@njit(parallel=True, cache=True)
def relu_forward(x, y, mask, consts, has_max, strict, zero_slope):
    """y and mask codes of a Keras ReLU (threshold t, negative slope s, max m).

    consts = [s, t, m] in x's dtype. `strict`: a value equal to t counts as below
    (the "relu" activation's gradient is 0 at 0); else as linear (the ReLU layer's).
    NaN goes to the linear branch's y (it propagates) with code `1 - strict`.
    `zero_slope` (s == 0): below t gives 0, not 0 * (x - t) (-0.0, or NaN for -inf).
    """
    s, t, m = consts[0], consts[1], consts[2]
    n = x.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            v = x[i]
            if has_max and v >= m:
                y[i] = m
                mask[i] = 2
            elif v < t:
                y[i] = 0 if zero_slope else s * (v - t)
                mask[i] = 0
            else:
                y[i] = v
                mask[i] = 1 if (not strict or v > t) else 0


@njit(parallel=True, cache=True)
def relu_backward(dy, mask, coef, dx):
    """dx = dy * coef[mask]: coef = [s, 1, 0] in dy's dtype (a product, as the reference,
    so NaN and inf in dy propagate the same way)."""
    n = dy.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            dx[i] = dy[i] * coef[mask[i]]


@njit(inline="always")
def _sigmoid(v, half, one):
    return half * (one + np.tanh(half * v))


@njit(parallel=True, cache=True)
def unary_forward(x, y, code, consts):
    """y = activation(x) for one of `CODES`; consts = [0.5, 1, ln 2, alpha, scale, 0,
    scale * alpha] in x's dtype (alpha, scale: SELU's)."""
    half, one, ln2, alpha, scale, zero = (consts[0], consts[1], consts[2], consts[3],
                                         consts[4], consts[5])
    n = x.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        if code == 0:
            for i in range(lo, hi):
                y[i] = _sigmoid(x[i], half, one)
        elif code == 1:
            for i in range(lo, hi):
                y[i] = np.tanh(x[i])
        elif code == 2:  # numpy's logaddexp(0, x), branch for branch
            for i in range(lo, hi):
                v = x[i]
                if v == zero:
                    y[i] = ln2
                elif v < zero:
                    y[i] = np.log1p(np.exp(v))
                elif v > zero:
                    y[i] = v + np.log1p(np.exp(-v))
                else:
                    y[i] = v  # NaN
        elif code == 3:
            for i in range(lo, hi):
                v = x[i]
                y[i] = v / (one + abs(v))
        elif code == 4:
            for i in range(lo, hi):
                v = x[i]
                y[i] = v * _sigmoid(v, half, one)
        elif code == 5:
            for i in range(lo, hi):
                v = x[i]
                y[i] = v if v > zero else np.expm1(min(v, zero))
        elif code == 6:
            for i in range(lo, hi):
                v = x[i]
                y[i] = scale * (v if v > zero else alpha * np.expm1(min(v, zero)))
        else:
            for i in range(lo, hi):
                y[i] = np.exp(x[i])


@njit(parallel=True, cache=True)
def unary_backward(dy, saved, code, consts, dx):
    """dx from dy and what forward saved: y (sigmoid, tanh, elu, selu, exponential) or
    x (softplus, softsign, silu); the reference's formulas in its order."""
    half, one, scale, zero, scale_alpha = (consts[0], consts[1], consts[4], consts[5],
                                           consts[6])
    n = dy.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        if code == 0:
            for i in range(lo, hi):
                v = saved[i]
                dx[i] = dy[i] * v * (one - v)
        elif code == 1:
            for i in range(lo, hi):
                v = saved[i]
                dx[i] = dy[i] * (one - v * v)
        elif code == 2:
            for i in range(lo, hi):
                dx[i] = dy[i] * _sigmoid(saved[i], half, one)
        elif code == 3:
            for i in range(lo, hi):
                d = one + abs(saved[i])
                dx[i] = dy[i] / (d * d)
        elif code == 4:
            for i in range(lo, hi):
                v = saved[i]
                s = _sigmoid(v, half, one)
                dx[i] = dy[i] * s * (one + v * (one - s))
        elif code == 5:  # y > 0 exactly where x > 0
            for i in range(lo, hi):
                v = saved[i]
                dx[i] = dy[i] * (one if v > zero else v + one)
        elif code == 6:
            for i in range(lo, hi):
                v = saved[i]
                dx[i] = dy[i] * (scale if v > zero else v + scale_alpha)
        else:
            for i in range(lo, hi):
                dx[i] = dy[i] * saved[i]
