"""Element-wise activations by Keras name, each with its backward.

`get("relu")` returns an `ActivationFn`. The one-pass form: `y, saved = fn.forward(x)`
then `fn.backward_from(dy, saved)`, where `saved` is what backward needs and no more (a
uint8 mask for the ReLU family; y or x for the others; see `distbn.ops.activation`,
whose kernels do the work). The older form `fn(x) -> y`, `fn.backward(dy, x, y)` stays
for layers that keep x and y anyway.
"""

from __future__ import annotations

import difflib

import numpy as np

from distbn.ops import activation as _ops

__all__ = ["ActivationFn", "get", "serialize", "names"]

_ALIASES = {"swish": "silu", None: "linear"}


class ActivationFn:
    """A named activation: `forward(x) -> (y, saved)`, `backward_from(dy, saved) -> dx`;
    also `fn(x) -> y` and `backward(dy, x, y) -> dx`."""

    def __init__(self, name: str):
        if name not in _ops.NAMES:
            raise ValueError(f"unknown activation {name!r}")
        self.name = name

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, object]:
        """(y, what `backward_from` needs), in one pass over x."""
        return _ops.forward(self.name, x)

    def backward_from(self, dy: np.ndarray, saved) -> np.ndarray:
        """dL/dx from dL/dy and `forward`'s saved value, in one pass."""
        return _ops.backward(self.name, dy, saved)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def backward(self, dy: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """dL/dx from dL/dy, the forward input x and output y."""
        return _ops.backward(self.name, dy, self._saved(x, y))

    def _saved(self, x, y):
        """`forward`'s saved value from x and y (the ReLU family's mask: one pass)."""
        if self.name == "linear":
            return None
        if self.name in ("relu", "relu6", "leaky_relu"):
            return _ops.forward(self.name, x)[1]
        return x if self.name in ("softplus", "softsign", "silu") else y

    def __repr__(self) -> str:
        return f"<activation {self.name}>"


def names() -> list[str]:
    """Every accepted activation name (aliases included)."""
    return sorted(list(_ops.NAMES) + [a for a in _ALIASES if a is not None])


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
        if name in _ops.NAMES:
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
