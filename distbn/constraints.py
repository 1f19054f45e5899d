"""Weight constraints with Keras 3 names, defaults, formulas and configs.

A constraint is `callable(value) -> projected value`; optimizers apply it to a weight
after each update (a Variable exposes it as `.constraint`).
"""

from __future__ import annotations

import numpy as np

from distbn import _objects

__all__ = ["Constraint", "NonNeg", "MaxNorm", "MinMaxNorm", "UnitNorm", "get", "serialize"]

_MODULE = "keras.constraints"
_EPSILON = 1e-7  # keras.backend.epsilon(): keeps the rescaling finite at zero norm


def _axis(axis):
    # JSON turns a tuple axis into a list; numpy wants a tuple.
    return tuple(axis) if isinstance(axis, list) else axis


class Constraint(_objects.Configurable):
    """Base class: `projected = constraint(w)`; the identity by default."""

    def __call__(self, w) -> np.ndarray:
        return np.asarray(w)


def _norms(w, axis):
    return np.sqrt(np.sum(np.square(w), axis=axis, keepdims=True))


class NonNeg(Constraint):
    """`max(w, 0)`."""

    def __call__(self, w):
        w = np.asarray(w)
        return np.maximum(w, 0).astype(w.dtype, copy=False)


class MaxNorm(Constraint):
    """Rescale so the norm along `axis` is at most `max_value` (Keras: 2, axis 0)."""

    def __init__(self, max_value=2, axis=0):
        self.max_value, self.axis = max_value, _axis(axis)

    def __call__(self, w):
        w = np.asarray(w)
        norms = _norms(w, self.axis)
        desired = np.clip(norms, 0, self.max_value)
        return (w * (desired / (_EPSILON + norms))).astype(w.dtype, copy=False)

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(Constraint):
    """Move the norm along `axis` toward [min_value, max_value] at `rate` (Keras)."""

    def __init__(self, min_value=0.0, max_value=1.0, rate=1.0, axis=0):
        self.min_value, self.max_value = min_value, max_value
        self.rate, self.axis = rate, _axis(axis)

    def __call__(self, w):
        w = np.asarray(w)
        norms = _norms(w, self.axis)
        desired = (self.rate * np.clip(norms, self.min_value, self.max_value)
                   + (1 - self.rate) * norms)
        return (w * (desired / (_EPSILON + norms))).astype(w.dtype, copy=False)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value,
                "rate": self.rate, "axis": self.axis}


class UnitNorm(Constraint):
    """Divide by the norm along `axis` (Keras default axis 0)."""

    def __init__(self, axis=0):
        self.axis = _axis(axis)

    def __call__(self, w):
        w = np.asarray(w)
        return (w / (_EPSILON + _norms(w, self.axis))).astype(w.dtype, copy=False)

    def get_config(self):
        return {"axis": self.axis}


_TABLE = {"NonNeg": NonNeg, "MaxNorm": MaxNorm, "MinMaxNorm": MinMaxNorm,
          "UnitNorm": UnitNorm, "non_neg": NonNeg, "max_norm": MaxNorm,
          "min_max_norm": MinMaxNorm, "unit_norm": UnitNorm, "Constraint": Constraint}


def get(identifier):
    """Resolve a constraint identifier.

    Args:
        identifier: None, a name ("non_neg", "MaxNorm", ...), a Keras serialized dict,
            a Constraint, or a callable `(value) -> projected value`.

    Returns:
        The constraint, or None.

    Raises:
        ValueError: quoting the identifier, when it names no constraint.
    """
    return _objects.resolve(identifier, _TABLE, "constraint", _MODULE)


def serialize(constraint):
    """The Keras 3 dict of a constraint (None stays None)."""
    return _objects.serialize(constraint, _MODULE)
