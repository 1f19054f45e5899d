"""numba kernels behind `distbn.ops.activation`: the ReLU family forward and backward and
the other activations' backward, one pass each.

Flat C-contiguous views. Every kernel splits the elements into fixed blocks (the same at
any thread count) and does the numpy reference's arithmetic in the same order and dtype
(constants come in `consts`, an array of x's dtype, so float32 stays float32), so the
elementwise results equal the reference's up to the last ulp of the transcendental
functions (libm's vs numpy's).

ReLU-type mask codes (one uint8 per element): 0 below the threshold (slope
`negative_slope`), 1 linear (slope 1), 2 saturated at max_value (slope 0).
"""

from __future__ import annotations

from numba import njit, prange

__all__ = ["BLOCK", "relu_forward", "relu_backward", "unary_backward", "CODES",
           "rows_affine_relu"]

#: Elements per parallel task.
BLOCK = 1 << 15

#: Activation name -> the code `unary_backward` switches on (outside its loops). Only
#: backward passes without a transcendental function: numba calls libm's scalar tanh,
#: exp, expm1, ten to fifty times slower than numpy's vectorised ones (measured at
#: 64x16x16x16 float32, one thread), so forward passes and the backward passes that
#: recompute a sigmoid (softplus, silu) stay with numpy.
CODES = {"sigmoid": 0, "tanh": 1, "softsign": 3, "elu": 5, "selu": 6, "exponential": 7}


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
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        # Block views: loops over a view's own range vectorise; loops over an offset
        # range of the whole array did not (measured ten times slower).
        xs, ys, ms = x[lo:hi], y[lo:hi], mask[lo:hi]
        for i in range(hi - lo):
            v = xs[i]
            if has_max and v >= m:
                ys[i] = m
                ms[i] = 2
            elif v < t:
                ys[i] = 0 if zero_slope else s * (v - t)
                ms[i] = 0
            else:
                ys[i] = v
                ms[i] = 1 if (not strict or v > t) else 0


@njit(parallel=True, cache=True)
def relu_backward(dy, mask, coef, dx):
    """dx = dy * coef[mask]: coef = [s, 1, 0] in dy's dtype (a product, as the reference,
    so NaN and inf in dy propagate the same way)."""
    s, one, zero = coef[0], coef[1], coef[2]
    n = dy.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        ds, ms, os = dy[lo:hi], mask[lo:hi], dx[lo:hi]
        for i in range(hi - lo):
            c = ms[i]  # selects between constants vectorise, a table lookup does not
            os[i] = ds[i] * (one if c == 1 else (s if c == 0 else zero))


@njit(parallel=True, cache=True)
def unary_backward(dy, saved, code, consts, dx):
    """dx from dy and what forward saved: y (sigmoid, tanh, elu, selu, exponential) or
    x (softsign); the reference's formulas in its order. consts = [1, SELU scale, 0,
    scale * alpha] in dy's dtype."""
    one, scale, zero, scale_alpha = consts[0], consts[1], consts[2], consts[3]
    n = dy.size
    nb = (n + BLOCK - 1) // BLOCK
    for b in prange(nb):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        _unary_backward_block(dy[lo:hi], saved[lo:hi], dx[lo:hi], code, one, scale, zero,
                              scale_alpha)


@njit(inline="always")
def _unary_backward_block(dy, saved, dx, code, one, scale, zero, scale_alpha):
    """One block of `unary_backward` (views of the block)."""
    lo, hi = 0, dy.size
    if code == 0:
        for i in range(lo, hi):
            v = saved[i]
            dx[i] = dy[i] * v * (one - v)
    elif code == 1:
        for i in range(lo, hi):
            v = saved[i]
            dx[i] = dy[i] * (one - v * v)
    elif code == 3:
        for i in range(lo, hi):
            d = one + abs(saved[i])
            dx[i] = dy[i] / (d * d)
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


@njit(parallel=True, cache=True)
def rows_affine_relu(x, scale, offset, y, mask, consts, has_max, zero_slope):
    """BatchNormalization's element-wise step and a ReLU in one pass over channels-last
    data: `v = x * scale + offset` per channel (as `fused.rows_affine`: a multiply, then
    an add, no fused multiply-add, so the same bits), then `relu_forward`'s rule on v
    (consts = [s, t, m]; the ReLU layer's convention: v == t is linear).

    x, y, mask: flat views; scale, offset: the channel coefficients tiled to a length L
    that is a multiple of the channel count, so every L-element chunk of the flat data
    starts at channel 0 and its loop is long enough to vectorise (rows of a few channels
    are not: measured 2.5x slower with 16 channels).
    """
    s, t, m = consts[0], consts[1], consts[2]
    n, tile = x.size, scale.size
    nt = (n + tile - 1) // tile
    per_task = max(1, BLOCK // tile)
    ntask = (nt + per_task - 1) // per_task
    for task in prange(ntask):
        for ck in range(task * per_task, min(nt, (task + 1) * per_task)):
            lo, hi = ck * tile, min(n, (ck + 1) * tile)
            xs, ys, ms = x[lo:hi], y[lo:hi], mask[lo:hi]
            for i in range(hi - lo):
                v = xs[i] * scale[i] + offset[i]
                if has_max and v >= m:
                    ys[i] = m
                    ms[i] = 2
                elif v < t:
                    ys[i] = 0 if zero_slope else s * (v - t)
                    ms[i] = 0
                else:
                    ys[i] = v
                    ms[i] = 1
