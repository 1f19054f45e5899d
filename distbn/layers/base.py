"""`Variable` and `Layer`: the small Keras-vocabulary base every distbn layer builds on.

A layer stores and validates hyperparameters in `__init__`, creates weights in `build`,
computes in `call` (numpy in, numpy out) and keeps what `backward` needs from the last
call. `backward(dy)` returns the input gradient and sets `.grad` on trainable weights.
"""

from __future__ import annotations

import collections
import re

import numpy as np

__all__ = ["Variable", "Layer", "snake_case", "unique_name"]


class Variable:
    """A named numpy array owned by a layer, with an optional gradient.

    Args:
        value: initial value (copied, cast to `dtype`).
        name: the weight's name inside its layer, e.g. "gamma".
        trainable: whether optimizers update it (moving statistics are not trainable).
        dtype: numpy dtype; default: that of `value`.
        regularizer: callable(value) -> float penalty, with `.gradient(value)`; or None.
        constraint: callable(value) -> projected value, applied after updates; or None.
    """

    def __init__(self, value, name, trainable=True, dtype=None, regularizer=None,
                 constraint=None):
        self._value = np.array(value, dtype=dtype, copy=True)
        self.name = str(name)
        self.trainable = bool(trainable)
        self.regularizer = regularizer
        self.constraint = constraint
        self.grad = None
        self.path = self.name  # "<layer name>/<weight name>" once the layer attaches it

    @property
    def value(self) -> np.ndarray:
        """The live array (not a copy): kernels read it without copying."""
        return self._value

    @property
    def shape(self) -> tuple:
        return self._value.shape

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype

    def numpy(self) -> np.ndarray:
        """A copy of the value."""
        return self._value.copy()

    def assign(self, value) -> None:
        """Overwrite the value in place; the shape must match exactly."""
        value = np.asarray(value)
        if value.shape != self._value.shape:
            raise ValueError(
                f"cannot assign a value of shape {value.shape} to variable {self.path!r} "
                f"of shape {self._value.shape}"
            )
        self._value[...] = value

    def __array__(self, dtype=None, copy=None):
        return self._value if dtype is None else self._value.astype(dtype)

    def __repr__(self) -> str:
        return f"<Variable {self.path!r} shape={self.shape} dtype={self.dtype}>"


def snake_case(name: str) -> str:
    """Keras' naming rule for a class name: "Conv2D" -> "conv2d", "MaxPooling2D" ->
    "max_pooling2d" (layer names, and the config builder's per-model names)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


_NAME_COUNTS: collections.Counter = collections.Counter()


def unique_name(base: str) -> str:
    """Keras-style automatic names, process-wide: 'dense', 'dense_1', 'dense_2', ...
    (layers and models)."""
    n = _NAME_COUNTS[base]
    _NAME_COUNTS[base] += 1
    return base if n == 0 else f"{base}_{n}"


class Layer:
    """Base class: weights, build-on-first-call, config, and the backward contract.

    Subclasses implement `build(input_shape)`, `call(x, training=None, mask=None)`,
    `backward(dy)` and extend `get_config()`.

    Args:
        name: the layer's name; default a unique snake_case name of the class.
        dtype: the variables' dtype ("float32" default, "float64", "float16"), or a Keras
            DTypePolicy config dict, or "mixed_float16" where the layer supports it.
        trainable: whether the layer's weights are trained.
    """

    #: True on layers called with a list of inputs (merge layers), whose backward
    #: returns a list of input gradients.
    multi_input = False
    #: True on layers that keep moving statistics of their inputs (BatchNormalization):
    #: such a layer has `synchronized`, `moving_mean`, `moving_variance`, `epsilon` and
    #: `batch_moments`. The trainer and tools ask this, never the class name.
    has_moving_statistics = False
    #: True on layers whose `backward(dy, input_grad=False)` sets the weights' gradients
    #: and skips the input gradient (returning None): a model's first layer needs only its
    #: weights' (the input is data), and for a convolution on a few input channels the
    #: input gradient is most of its backward.
    input_grad_optional = False

    def __init__(self, name=None, dtype=None, trainable=True, **kwargs):
        if kwargs:
            raise TypeError(
                f"{type(self).__name__}: unexpected keyword argument(s) "
                f"{', '.join(repr(k) for k in kwargs)}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name if name is not None else unique_name(snake_case(type(self).__name__))
        self.dtype_policy = _parse_dtype(dtype)
        self._trainable = bool(trainable)
        self._weights: list[Variable] = []
        self.built = False
        self.input_shape = None
        self.losses: list[float] = []

    # --- dtype -----------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The variables' dtype name (Keras: `layer.dtype` is the variable dtype)."""
        return self.dtype_policy[1]

    @property
    def compute_dtype(self) -> str:
        return self.dtype_policy[0]

    @property
    def variable_dtype(self) -> str:
        return self.dtype_policy[1]

    # --- weights ---------------------------------------------------------------------------
    def add_weight(self, name, shape, initializer, trainable=True, regularizer=None,
                   constraint=None, dtype=None) -> Variable:
        """Create, register and return a weight; `initializer(shape, dtype)` gives its value."""
        dtype = np.dtype(dtype or self.variable_dtype)
        value = np.asarray(initializer(tuple(shape), dtype), dtype=dtype)
        if value.shape != tuple(shape):
            raise ValueError(
                f"initializer of weight {name!r} of layer {self.name!r} returned shape "
                f"{value.shape}, expected {tuple(shape)}"
            )
        var = Variable(value, name, trainable=trainable, dtype=dtype,
                       regularizer=regularizer, constraint=constraint)
        var.path = f"{self.name}/{name}"
        self._weights.append(var)
        return var

    @property
    def weights(self) -> list[Variable]:
        return list(self._weights)

    @property
    def trainable_weights(self) -> list[Variable]:
        return [w for w in self._weights if w.trainable] if self.trainable else []

    @property
    def non_trainable_weights(self) -> list[Variable]:
        if not self.trainable:
            return list(self._weights)
        return [w for w in self._weights if not w.trainable]

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)

    def get_weights(self) -> list[np.ndarray]:
        """Copies of the weights, in creation order (Keras order)."""
        return [w.numpy() for w in self._weights]

    def set_weights(self, weights) -> None:
        """Assign every weight, in `get_weights` order; checks count and each shape first."""
        weights = list(weights)
        if len(weights) != len(self._weights):
            raise ValueError(
                f"layer {self.name!r} expects {len(self._weights)} weights "
                f"({', '.join(w.name for w in self._weights)}), got {len(weights)}"
            )
        for var, value in zip(self._weights, weights, strict=True):
            if np.shape(value) != var.shape:
                raise ValueError(
                    f"layer {self.name!r}: weight {var.name!r} has shape {var.shape}, "
                    f"got a value of shape {np.shape(value)}"
                )
        for var, value in zip(self._weights, weights, strict=True):
            var.assign(value)

    def regularization_losses(self) -> list[float]:
        """Penalties of the trainable weights' regularizers at their current values.

        As Keras: a frozen layer (or a non-trainable weight) contributes no penalty.
        """
        return [float(w.regularizer(w.value)) for w in self.trainable_weights
                if w.regularizer is not None]

    def add_regularization_grads(self) -> None:
        """Add each regularizer's gradient to its (trainable) weight's grad."""
        for w in self.trainable_weights:
            if w.regularizer is not None and w.grad is not None:
                w.grad = w.grad + w.regularizer.gradient(w.value)

    # --- calling ---------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        self.input_shape = tuple(input_shape)
        self.built = True

    def __call__(self, x, training=None, mask=None):
        x = np.asarray(x)
        if not self.built:
            self.build(x.shape)
            self.built = True
        return self.call(x, training=training, mask=mask)

    def call(self, x, training=None, mask=None):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    # --- config ----------------------------------------------------------------------------
    def get_config(self) -> dict:
        compute, variable = self.dtype_policy
        dtype = variable if compute == variable else f"mixed_{compute}"
        return {"name": self.name, "trainable": self.trainable, "dtype": dtype}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} built={self.built}>"


_POLICIES = {
    "float16": ("float16", "float16"),
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "mixed_float16": ("float16", "float32"),
}


def _parse_dtype(dtype) -> tuple[str, str]:
    """(compute dtype, variable dtype) from None, a name, a numpy dtype, or a Keras
    DTypePolicy config dict."""
    if dtype is None:
        return _POLICIES["float32"]
    if isinstance(dtype, dict):
        inner = dtype.get("config", dtype)
        name = inner.get("name")
    else:
        try:
            name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        except TypeError:
            name = None
    if name not in _POLICIES:
        raise ValueError(
            f"dtype must be one of {sorted(_POLICIES)} (or a Keras DTypePolicy config), "
            f"got {dtype!r}"
        )
    return _POLICIES[name]
