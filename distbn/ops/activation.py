"""Element-wise activations as pure functions: one pass forward, one pass backward.

    y, mask = relu_forward(x, negative_slope=0.0, threshold=0.0, max_value=None, strict=False)
    dx = relu_backward(dy, mask, negative_slope=0.0)
    y, mask = normalize_relu(x, mean, var, gamma, beta, epsilon, reduce_axes, ...)  # BN+ReLU
    y, saved = forward(name, x)          # any name in NAMES ("relu", "sigmoid", ...)
    dx = backward(name, dy, saved)

What backward needs is kept small: the ReLU family keeps a uint8 mask (`MASK_BELOW`,
`MASK_LINEAR`, `MASK_SATURATED` per element: a quarter of a float32 slope array), the
others keep y (sigmoid, tanh, elu, selu, exponential, softmax, log_softmax) or x
(softplus, softsign, silu), never both. "linear" keeps nothing and returns x itself.

Both kernel backends (`DISTBN_KERNELS`): numpy (the reference, below) and numba
(`_activation_kernels`: one read of each input and one write of each output, the
reference's arithmetic in its order and dtype, the same bits): the ReLU family forward
and backward, and the backward of sigmoid, tanh, softsign, elu, selu and exponential.
The other passes use numpy on both backends: they call exp, tanh or log1p, which numpy
vectorises and a numba loop does not (ten to fifty times slower, measured); so do
float16, non-contiguous and non-float inputs, and softmax/log_softmax (a reduction per
row).

Conventions (kept from the layers that use them): the ReLU layer's gradient is 1 at
x == threshold, the "relu" activation's is 0 at 0 (`strict=True`); with a zero slope a
value below the threshold gives 0, even -inf; NaN propagates to y.
"""

from __future__ import annotations

import numpy as np

from distbn.ops.backend import backend_name

__all__ = ["NAMES", "MASK_BELOW", "MASK_LINEAR", "MASK_SATURATED", "relu_forward",
           "relu_backward", "forward", "backward", "normalize_relu", "LEAKY_SLOPE",
           "SELU_ALPHA", "SELU_SCALE"]

MASK_BELOW, MASK_LINEAR, MASK_SATURATED = 0, 1, 2

# SELU constants (Klambauer et al. 2017), as Keras uses them.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu default negative_slope

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_UNARY = ("sigmoid", "tanh", "softplus", "softsign", "silu", "elu", "selu", "exponential")
_SAVES_X = ("softplus", "softsign", "silu")
# Backward passes the numba kernel does (see `_activation_kernels.CODES` for why not all).
_NUMBA_BACKWARD = ("sigmoid", "tanh", "softsign", "elu", "selu", "exponential")
# The ReLU family: (negative_slope, max_value) of the strict relu kernel.
_RELU_LIKE = {"relu": (0.0, None), "relu6": (0.0, 6.0), "leaky_relu": (LEAKY_SLOPE, None)}
NAMES = ("linear", *_RELU_LIKE, *_UNARY, "softmax", "log_softmax")


def _numba_ok(*arrays) -> bool:
    """Whether the numba kernels take these arrays (float32/64 of one dtype, contiguous)."""
    return (backend_name() == "numba"
            and all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)
            and arrays[0].dtype in _FLOATS and len({a.dtype for a in arrays}) == 1)


def _run(kernel, name, size, *args):
    """A numba kernel through the fused backend's first-call lock and small-input rule."""
    from distbn.ops.fused import run_kernel

    run_kernel(kernel, (name, args[0].dtype.char), size, *args)


# --- the ReLU family ---------------------------------------------------------------------------

def _check_relu(negative_slope, threshold, max_value):
    for name, value in (("negative_slope", negative_slope), ("threshold", threshold),
                        ("max_value", max_value)):
        if value is not None and not np.isfinite(value):
            raise ValueError(f"relu_forward: {name} must be finite, got {name}={value!r}")


def relu_forward(x, negative_slope=0.0, threshold=0.0, max_value=None, strict=False):
    """Keras ReLU in one pass: `max_value` at or above it, x from `threshold` up,
    `negative_slope * (x - threshold)` below.

    Args:
        x: float array.
        negative_slope, threshold: floats.
        max_value: float or None (no saturation).
        strict: x == threshold counts as below (slope `negative_slope`), as the "relu"
            activation's gradient; else as linear (slope 1), as the ReLU layer's.

    Returns:
        (y, mask): y of x's dtype and shape; mask a uint8 array of codes (`MASK_BELOW`,
        `MASK_LINEAR`, `MASK_SATURATED`) for `relu_backward`.
    """
    _check_relu(negative_slope, threshold, max_value)
    x = np.asarray(x)
    dt = x.dtype.type
    if _numba_ok(x):
        from distbn.ops import _activation_kernels as _k

        y = np.empty_like(x)
        mask = np.empty(x.shape, dtype=np.uint8)
        consts = np.array([negative_slope, threshold,
                           0 if max_value is None else max_value], dtype=x.dtype)
        _run(_k.relu_forward, "relu_forward", x.size, x.reshape(-1), y.reshape(-1),
             mask.reshape(-1), consts, max_value is not None, bool(strict),
             negative_slope == 0)
        return y, mask
    below = x < threshold
    linear = x > threshold if strict else ~below
    with np.errstate(invalid="ignore", over="ignore"):
        low = (np.zeros_like(x) if negative_slope == 0
               else (negative_slope * (x - threshold)).astype(x.dtype, copy=False))
    y = np.where(below, low, x)
    mask = np.where(below, MASK_BELOW, np.where(linear, MASK_LINEAR, MASK_BELOW))
    if max_value is not None:
        above = x >= max_value
        y = np.where(above, dt(max_value), y)
        mask = np.where(above, MASK_SATURATED, mask)
    return y.astype(x.dtype, copy=False), mask.astype(np.uint8)


def relu_backward(dy, mask, negative_slope=0.0):
    """dx = dy times the slope each mask code stands for: `negative_slope`, 1 or 0.

    A product (not a select), so NaN or inf in dy propagate as `dy * slope` would.

    Args:
        dy: float array, the output gradient.
        mask: the uint8 codes `relu_forward` returned (dy's shape).
        negative_slope: the forward's.

    Returns:
        dx, dy's dtype and shape.
    """
    dy = np.asarray(dy)
    mask = np.asarray(mask)
    if mask.shape != dy.shape:
        raise ValueError(f"relu_backward: mask shape {mask.shape} differs from dy's "
                         f"{dy.shape}")
    coef = np.array([negative_slope, 1, 0], dtype=dy.dtype if dy.dtype in _FLOATS
                    else np.float32)
    if _numba_ok(dy) and mask.flags.c_contiguous and mask.dtype == np.uint8:
        from distbn.ops import _activation_kernels as _k

        dx = np.empty_like(dy)
        _run(_k.relu_backward, "relu_backward", dy.size, dy.reshape(-1), mask.reshape(-1),
             coef, dx.reshape(-1))
        return dx
    return (dy * coef.astype(dy.dtype)[mask]).astype(dy.dtype, copy=False)


# --- every activation by name ------------------------------------------------------------------

def _sigmoid(x):
    # tanh form: no overflow warning for large |x|, exact symmetry.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x):
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def _log_softmax(x):
    z = x - np.max(x, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


_REF_FORWARD = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "softplus": lambda x: np.logaddexp(0, x),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "silu": lambda x: x * _sigmoid(x),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    "selu": lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
    "exponential": np.exp,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}


def _silu_backward(dy, x):
    s = _sigmoid(x)
    return dy * s * (1 + x * (1 - s))


# dL/dx from dy and what forward saved (y, or x for _SAVES_X).
_REF_BACKWARD = {
    "sigmoid": lambda dy, y: dy * y * (1 - y),
    "tanh": lambda dy, y: dy * (1 - y * y),
    "softplus": lambda dy, x: dy * _sigmoid(x),
    "softsign": lambda dy, x: dy / (1 + np.abs(x)) ** 2,
    "silu": _silu_backward,
    # y > 0 exactly where x > 0 (elu and selu keep the sign), so y is enough.
    "elu": lambda dy, y: dy * np.where(y > 0, 1, y + 1),
    "selu": lambda dy, y: dy * np.where(y > 0, SELU_SCALE, y + SELU_SCALE * SELU_ALPHA),
    "exponential": lambda dy, y: dy * y,
    "softmax": lambda dy, y: y * (dy - np.sum(dy * y, axis=-1, keepdims=True)),
    "log_softmax": lambda dy, y: dy - np.exp(y) * np.sum(dy, axis=-1, keepdims=True),
}


def _consts(dtype):
    """`unary_backward`'s constants in dy's dtype (the reference's weak scalars)."""
    return np.array([1.0, SELU_SCALE, 0.0, SELU_SCALE * SELU_ALPHA], dtype=dtype)


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(NAMES)}")


def forward(name, x):
    """Activation `name` of x in one pass, and what its backward needs.

    Args:
        name: one of `NAMES`.
        x: float array.

    Returns:
        (y, saved): y of x's dtype; saved the mask (ReLU family), y, x, or None (linear).
    """
    _check_name(name)
    x = np.asarray(x)
    if name == "linear":
        return x, None
    if name in _RELU_LIKE:
        slope, top = _RELU_LIKE[name]
        return relu_forward(x, negative_slope=slope, max_value=top, strict=True)
    # numpy on both backends: its vectorised exp/tanh beat a numba loop's libm calls.
    with np.errstate(over="ignore"):
        y = np.asarray(_REF_FORWARD[name](x)).astype(x.dtype, copy=False)
    return y, (x if name in _SAVES_X else y)


def backward(name, dy, saved):
    """dL/dx of activation `name` from dL/dy and `forward`'s `saved`.

    Args:
        name: one of `NAMES`.
        dy: float array, the output gradient.
        saved: the second value `forward` returned.

    Returns:
        dx, dy's dtype.
    """
    _check_name(name)
    dy = np.asarray(dy)
    if name == "linear":
        return dy
    if name in _RELU_LIKE:
        return relu_backward(dy, saved, negative_slope=_RELU_LIKE[name][0])
    saved = np.asarray(saved)
    if name in _NUMBA_BACKWARD and _numba_ok(dy, saved) and dy.shape == saved.shape:
        from distbn.ops import _activation_kernels as _k

        dx = np.empty_like(dy)
        _run(_k.unary_backward, "unary_backward", dy.size, dy.reshape(-1),
             saved.reshape(-1), _k.CODES[name], _consts(dy.dtype), dx.reshape(-1))
        return dx
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(_REF_BACKWARD[name](dy, saved)).astype(dy.dtype, copy=False)


# --- BatchNormalization's element-wise step fused with a ReLU -------------------------------

def normalize_relu(x, mean, var, gamma, beta, epsilon, reduce_axes, negative_slope=0.0,
                   threshold=0.0, max_value=None):
    """`relu_forward(batch_norm.normalize(x, ...))` in one pass where the kernels allow.

    Normalise, scale, shift and clamp: one read of x, one write of y and of the mask,
    with the separate steps' arithmetic (the same bits as normalising, then applying
    the ReLU layer's `relu_forward`). The one-pass kernel takes channels-last inputs
    (the channel axis last, every other axis reduced) on the numba backend; anything
    else runs the two steps.

    Args:
        x: float32 or float64 array.
        mean, var, gamma, beta, epsilon, reduce_axes: as `distbn.ops.batch_norm.normalize`
            (mean and var float64 channel arrays; gamma, beta may be None).
        negative_slope, threshold, max_value: the ReLU's (`relu_forward`).

    Returns:
        (y, mask): as `relu_forward`.
    """
    _check_relu(negative_slope, threshold, max_value)
    rows = (tuple(reduce_axes) == tuple(range(x.ndim - 1)) and x.ndim >= 1
            and np.shape(mean) == x.shape[-1:])
    if not (rows and _numba_ok(x) and x.size):
        from distbn.ops.backend import kernels

        y = kernels().normalize(x, mean, var, gamma, beta, epsilon, reduce_axes)
        return relu_forward(y, negative_slope, threshold, max_value)
    from distbn.ops import _activation_kernels as _k
    from distbn.ops.batch_norm import inverse_std

    # The per-channel coefficients by the reference's float64 arithmetic, cast once.
    scale = inverse_std(var, epsilon)
    if gamma is not None:
        scale = scale * gamma
    offset = -np.asarray(mean, dtype=np.float64) * scale
    if beta is not None:
        offset = offset + beta
    nch = x.shape[-1]
    y = np.empty_like(x)
    mask = np.empty(x.shape, dtype=np.uint8)
    consts = np.array([negative_slope, threshold, 0 if max_value is None else max_value],
                      dtype=x.dtype)
    # The coefficients tiled to whole rows of about 256 elements (see the kernel).
    reps = max(1, 256 // nch)
    _run(_k.rows_affine_relu, "rows_affine_relu", x.size, x.reshape(-1),
         np.tile(scale.astype(x.dtype), reps), np.tile(offset.astype(x.dtype), reps),
         y.reshape(-1), mask.reshape(-1), consts, max_value is not None, negative_slope == 0)
    return y, mask
