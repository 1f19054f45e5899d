"""Element-wise activations by Keras name, each with its backward.

`get("relu")` returns an `ActivationFn` whose `__call__(x)` gives y and whose
`backward(dy, x, y)` gives dL/dx; layers keep x and y from the forward pass.
"""

from __future__ import annotations

import difflib

import numpy as np

__all__ = ["ActivationFn", "get", "serialize", "names"]

# SELU constants (Klambauer et al. 2017), as Keras uses them.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu default negative_slope


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


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def _silu_backward(dy, x, y):
    s = _sigmoid(x)
    return dy * s * (1 + x * (1 - s))


def _relu_fwd(x):
    return np.maximum(x, 0)


_TABLE = {
    "linear": (lambda x: x, lambda dy, x, y: dy),
    "relu": (_relu_fwd, lambda dy, x, y: dy * (x > 0)),
    "relu6": (lambda x: np.clip(x, 0, 6), lambda dy, x, y: dy * ((x > 0) & (x < 6))),
    "leaky_relu": (lambda x: np.where(x > 0, x, _LEAKY_SLOPE * x),
                   lambda dy, x, y: dy * np.where(x > 0, 1.0, _LEAKY_SLOPE).astype(dy.dtype)),
    "sigmoid": (_sigmoid, lambda dy, x, y: dy * y * (1 - y)),
    "tanh": (np.tanh, lambda dy, x, y: dy * (1 - y * y)),
    "softmax": (_softmax, lambda dy, x, y: y * (dy - np.sum(dy * y, axis=-1, keepdims=True))),
    "log_softmax": (_log_softmax,
                    lambda dy, x, y: dy - np.exp(y) * np.sum(dy, axis=-1, keepdims=True)),
    "softplus": (lambda x: np.logaddexp(0, x), lambda dy, x, y: dy * _sigmoid(x)),
    "softsign": (lambda x: x / (1 + np.abs(x)), lambda dy, x, y: dy / (1 + np.abs(x)) ** 2),
    "silu": (lambda x: x * _sigmoid(x), _silu_backward),
    "elu": (_elu, lambda dy, x, y: dy * np.where(x > 0, 1, y + 1)),
    "selu": (lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0))),
             lambda dy, x, y: dy * np.where(x > 0, _SELU_SCALE, y + _SELU_SCALE * _SELU_ALPHA)),
    "exponential": (np.exp, lambda dy, x, y: dy * y),
}
_ALIASES = {"swish": "silu", None: "linear"}


class ActivationFn:
    """A named activation: `fn(x) -> y`, `fn.backward(dy, x, y) -> dx`."""

    def __init__(self, name: str):
        self.name = name
        self._forward, self._backward = _TABLE[name]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._forward(x)).astype(x.dtype, copy=False)

    def backward(self, dy: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """dL/dx from dL/dy, the forward input x and output y."""
        return np.asarray(self._backward(dy, x, y)).astype(dy.dtype, copy=False)

    def __repr__(self) -> str:
        return f"<activation {self.name}>"


def names() -> list[str]:
    """Every accepted activation name (aliases included)."""
    return sorted(list(_TABLE) + [a for a in _ALIASES if a is not None])


def get(identifier) -> ActivationFn:
    """Resolve a Keras activation identifier.

    Args:
        identifier: None (linear), a Keras name ("relu", "softmax", ...), or an
            ActivationFn. Arbitrary callables are refused: they have no backward.

    Returns:
        The ActivationFn.

    Raises:
        ValueError: quoting the identifier, with the closest known names.
    """
    if isinstance(identifier, ActivationFn):
        return identifier
    if identifier is None or isinstance(identifier, str):
        name = _ALIASES.get(identifier, identifier)
        if name in _TABLE:
            return ActivationFn(name)
        close = difflib.get_close_matches(str(identifier), names(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown activation {identifier!r} (known: {', '.join(names())}){hint}"
        )
    raise ValueError(
        f"activation must be a name or None (a callable has no backward), got {identifier!r}"
    )


def serialize(fn: ActivationFn) -> str:
    """The Keras config form of an activation: its name."""
    return fn.name
