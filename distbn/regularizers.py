"""Weight regularizers with Keras 3 names, formulas and configs, plus their gradients.

A regularizer is `callable(value) -> float` penalty; distbn adds `.gradient(value)`
(the penalty's derivative, added to the weight's grad in `backward`). Keras' formulas:
L1 `l1 * sum(|x|)`, L2 `l2 * sum(x**2)` (no 1/2), L1L2 their sum.
"""

from __future__ import annotations

import numpy as np

from distbn import _objects
from distbn.checks import check_number

__all__ = ["Regularizer", "L1", "L2", "L1L2", "get", "serialize"]

_MODULE = "keras.regularizers"


def _factor(value, name: str) -> float:
    return check_number(value, name, low=0)


class Regularizer(_objects.Configurable):
    """Base class: `penalty = reg(value)`, `reg.gradient(value)`, `get_config()`."""

    def __call__(self, x) -> float:
        return 0.0

    def gradient(self, x) -> np.ndarray:
        """d penalty / d x, same shape and dtype as `x`."""
        return np.zeros_like(np.asarray(x))


class L1L2(Regularizer):
    """`l1 * sum(|x|) + l2 * sum(x**2)`; Keras defaults l1=0.0, l2=0.0 (None means 0)."""

    def __init__(self, l1=0.0, l2=0.0):
        self.l1 = _factor(0.0 if l1 is None else l1, "l1")
        self.l2 = _factor(0.0 if l2 is None else l2, "l2")

    def __call__(self, x) -> float:
        # Accumulate in float64: the penalty is a loss term, not a weight-dtype tensor.
        x = np.asarray(x, dtype=np.float64)
        penalty = 0.0
        if self.l1:
            penalty += self.l1 * float(np.abs(x).sum())
        if self.l2:
            penalty += self.l2 * float(np.square(x).sum())
        return penalty

    def gradient(self, x) -> np.ndarray:
        """`l1 * sign(x) + 2 * l2 * x` (subgradient 0 at x = 0)."""
        x = np.asarray(x)
        return (self.l1 * np.sign(x) + 2.0 * self.l2 * x).astype(x.dtype, copy=False)

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    """`l1 * sum(|x|)`; Keras default l1=0.01."""

    def __init__(self, l1=0.01):
        super().__init__(l1=0.01 if l1 is None else l1, l2=0.0)

    def get_config(self):
        return {"l1": self.l1}


class L2(L1L2):
    """`l2 * sum(x**2)`; Keras default l2=0.01."""

    def __init__(self, l2=0.01):
        super().__init__(l1=0.0, l2=0.01 if l2 is None else l2)

    def get_config(self):
        return {"l2": self.l2}


def _l1_l2_shortcut():
    # Keras documents the "l1_l2" string as l1=0.01, l2=0.01 (the class defaults are 0).
    return L1L2(l1=0.01, l2=0.01)


_TABLE = {"L1": L1, "L2": L2, "L1L2": L1L2, "l1": L1, "l2": L2, "l1l2": L1L2,
          "l1_l2": _l1_l2_shortcut, "Regularizer": Regularizer}


def get(identifier):
    """Resolve a regularizer identifier.

    Args:
        identifier: None, "l1", "l2", "l1_l2", a class name ("L2"), a Keras serialized
            dict, a Regularizer, or a callable `(value) -> float` (with `.gradient` if it
            is to be used in `backward`).

    Returns:
        The regularizer, or None.

    Raises:
        ValueError: quoting the identifier, when it names no regularizer.
    """
    return _objects.resolve(identifier, _TABLE, "regularizer", _MODULE)


def serialize(regularizer):
    """The Keras 3 dict of a regularizer (None stays None)."""
    return _objects.serialize(regularizer, _MODULE)
