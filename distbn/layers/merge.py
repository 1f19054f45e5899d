"""Merge layers that take a list of inputs: Add and Concatenate (Keras 3 semantics).

Multi-input contract (what a graph model relies on): `layer(inputs, training=None,
mask=None)` takes a list of arrays and returns one array; `layer.backward(dy)` returns
the list of input gradients in input order; `build` and `compute_output_shape` take a
list of shapes; `multi_input = True`. Masks are accepted and, as Keras does for the
values, not applied.
"""

from __future__ import annotations

import numpy as np

from distbn.checks import check_int
from distbn.layers import _common
from distbn.layers.base import Layer

__all__ = ["Add", "Concatenate"]


def _shape_list(input_shapes, layer) -> list[tuple]:
    if (not isinstance(input_shapes, (list, tuple)) or not input_shapes
            or not all(isinstance(s, (list, tuple)) for s in input_shapes)):
        raise ValueError(f"{type(layer).__name__} {layer.name!r} takes a non-empty list of "
                         f"input shapes, got {input_shapes!r}")
    return [tuple(s) for s in input_shapes]


class _Merge(Layer):
    """Shared calling convention of the merge layers."""

    multi_input = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._shapes = None

    def build(self, input_shape) -> None:
        shapes = _shape_list(input_shape, self)
        self.compute_output_shape(shapes)  # validates
        self.input_shape = shapes
        self.built = True

    def __call__(self, inputs, training=None, mask=None):
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise ValueError(f"{type(self).__name__} {self.name!r} takes a non-empty list of "
                             f"arrays, got {type(inputs).__name__}")
        xs = [_common.cast(x, self.compute_dtype) for x in inputs]
        if not self.built:
            self.build([x.shape for x in xs])
        return self.call(xs, training=training, mask=mask)

    def get_config(self) -> dict:
        return super().get_config()


class Add(_Merge):
    """Elementwise sum of the inputs, with Keras' broadcasting.

    Non-batch axes broadcast where one side is 1; an input of lower rank gets new axes
    after the batch axis (so its trailing axes line up). The batch sizes must agree.

    Args:
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def compute_output_shape(self, input_shape):
        shapes = _shape_list(input_shape, self)
        batches = {s[0] for s in shapes if s} - {None}
        if len(batches) > 1:
            raise ValueError(f"Add {self.name!r}: cannot add inputs with different batch "
                             f"sizes, got shapes {shapes}")
        rank = max(len(s) for s in shapes)
        out = [None if not batches else batches.pop()]
        for k in range(1, rank):
            dims = {s[k - rank + len(s)] for s in shapes if k - rank + len(s) >= 1}
            known = dims - {None, 1}
            if len(known) > 1:
                raise ValueError(f"Add {self.name!r}: inputs have incompatible shapes "
                                 f"{shapes}")
            out.append(known.pop() if known else (None if None in dims else 1))
        return tuple(out)

    def call(self, inputs, training=None, mask=None):
        """Forward pass; keeps the input shapes for `backward`."""
        shapes = [x.shape for x in inputs]
        self.compute_output_shape(shapes)
        rank = max(len(s) for s in shapes)
        # Keras: lower-rank inputs get new axes at 1 (after the batch axis).
        xs = [x.reshape(x.shape[:1] + (1,) * (rank - x.ndim) + x.shape[1:]) for x in inputs]
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        if len(xs) == 1:
            y = y.copy()
        self._shapes = shapes
        return y

    def backward(self, dy):
        """Input gradients: dy summed over each input's broadcast axes."""
        if self._shapes is None:
            raise RuntimeError(f"Add {self.name!r}: backward called before a forward call")
        dy = _common.cast(dy, self.compute_dtype)
        grads = []
        for shape in self._shapes:
            expanded = shape[:1] + (1,) * (dy.ndim - len(shape)) + shape[1:]
            axes = tuple(k for k, (n, m) in enumerate(zip(expanded, dy.shape, strict=True))
                         if n == 1 and m != 1)
            g = dy.sum(axis=axes, keepdims=True) if axes else dy.copy()
            grads.append(g.reshape(shape))
        return grads


class Concatenate(_Merge):
    """Join the inputs along `axis`; every other axis must match.

    Args:
        axis: the axis to join along (default -1); all inputs have the same rank.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = check_int(axis, "axis")
        self._sizes = None

    def compute_output_shape(self, input_shape):
        shapes = _shape_list(input_shape, self)
        rank = len(shapes[0])
        if any(len(s) != rank for s in shapes):
            raise ValueError(f"Concatenate {self.name!r}: inputs must have the same rank, got "
                             f"shapes {shapes}")
        if not -rank <= self.axis < rank:
            raise ValueError(f"Concatenate {self.name!r}: axis={self.axis} is out of range for "
                             f"inputs of rank {rank} (shapes {shapes})")
        axis = self.axis % rank
        out = []
        for k in range(rank):
            dims = [s[k] for s in shapes]
            if k == axis:
                out.append(None if None in dims else sum(dims))
                continue
            known = set(dims) - {None}
            if len(known) > 1:
                raise ValueError(f"Concatenate {self.name!r}: inputs must match on every axis "
                                 f"but axis={self.axis}, got shapes {shapes}")
            out.append(known.pop() if known else None)
        return tuple(out)

    def call(self, inputs, training=None, mask=None):
        """Forward pass; keeps the sizes along `axis` for `backward`."""
        self.compute_output_shape([x.shape for x in inputs])
        axis = self.axis % inputs[0].ndim
        self._sizes = [x.shape[axis] for x in inputs]
        return np.concatenate(inputs, axis=axis)

    def backward(self, dy):
        """Input gradients: dy split along `axis`."""
        if self._sizes is None:
            raise RuntimeError(
                f"Concatenate {self.name!r}: backward called before a forward call")
        dy = _common.cast(dy, self.compute_dtype)
        cuts = np.cumsum(self._sizes)[:-1]
        return [np.ascontiguousarray(g) for g in np.split(dy, cuts, axis=self.axis % dy.ndim)]

    def get_config(self) -> dict:
        config = super().get_config()
        config["axis"] = self.axis
        return config
