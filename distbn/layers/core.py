"""Core layers: Dense, Flatten, Activation, ReLU and Dropout (Keras 3 names and defaults)."""

from __future__ import annotations

import math

import numpy as np

from distbn import random as _random
from distbn.checks import check_int, check_number
from distbn.layers import _common, activations
from distbn.layers.base import Layer
from distbn.ops import activation as activation_ops

__all__ = ["Dense", "Flatten", "Activation", "ReLU", "Dropout", "dropout_bits",
           "check_sample_ids"]


class Dense(Layer):
    """`activation(x @ kernel + bias)` on the last axis of an N-D input.

    Args:
        units: positive int, size of the output's last axis.
        activation: Keras activation name or None (linear).
        use_bias: whether to add a bias vector.
        kernel_initializer, bias_initializer: initializer identifiers.
        kernel_regularizer, bias_regularizer: regularizer identifiers or None.
        activity_regularizer: must be None (accepted for Keras configs).
        kernel_constraint, bias_constraint: constraint identifiers or None.
        **kwargs: `name`, `dtype`, `trainable` (see `Layer`).
    """

    def __init__(self, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _common.check_positive_int(units, "units")
        self.activation = activations.get(activation)
        self.use_bias = bool(use_bias)
        _common.no_activity_regularizer(self.name, activity_regularizer)
        _common.resolve_weight_args(
            self, ("kernel", "bias"),
            {"kernel": kernel_initializer, "bias": bias_initializer},
            {"kernel": kernel_regularizer, "bias": bias_regularizer},
            {"kernel": kernel_constraint, "bias": bias_constraint},
        )
        self.kernel = None
        self.bias = None
        self._cache = None

    def build(self, input_shape) -> None:
        """Create `kernel` (in_features, units) and `bias` (units,)."""
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"Dense {self.name!r} needs an input of rank >= 2 with a known last axis, "
                f"got input_shape={input_shape}"
            )
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units),
                                      self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        super().build(input_shape)

    def call(self, x, training=None, mask=None):
        """Forward pass: one GEMM, the bias added in place, the activation in one pass;
        keeps x and the activation's saved value for `backward`."""
        x = _common.cast(x, self.compute_dtype)
        if x.ndim < 2 or x.shape[-1] != self.kernel.shape[0]:
            raise ValueError(
                f"Dense {self.name!r} expects inputs (..., {self.kernel.shape[0]}), "
                f"got shape {x.shape}"
            )
        z = x @ _common.cast(self.kernel.value, self.compute_dtype)
        if self.use_bias:
            z += _common.cast(self.bias.value, self.compute_dtype)  # in place: no copy
        # One pass over z (`distbn.ops.activation`); backward keeps only what it needs
        # (a uint8 mask for the ReLU family, nothing for linear), not z and y.
        y, saved = self.activation.forward(z)
        self._cache = (x, saved)
        self.losses = self.regularization_losses()
        return y

    input_grad_optional = True

    def backward(self, dy, input_grad=True):
        """Input gradient (None with `input_grad=False`); sets kernel.grad and bias.grad
        (plus regularizer gradients)."""
        if self._cache is None:
            raise RuntimeError(f"Dense {self.name!r}: backward called before a forward call")
        x, saved = self._cache
        dy = _common.cast(dy, self.compute_dtype)
        dz = self.activation.backward_from(dy, saved)
        dz2 = dz.reshape(-1, self.units)
        self.kernel.grad = (x.reshape(-1, x.shape[-1]).T @ dz2).astype(self.kernel.dtype)
        if self.use_bias:
            self.bias.grad = dz2.sum(axis=0).astype(self.bias.dtype)
        self.add_regularization_grads()
        if not input_grad:
            return None
        return dz @ _common.cast(self.kernel.value, self.compute_dtype).T

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units,)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"units": self.units,
                       "activation": activations.serialize(self.activation),
                       "use_bias": self.use_bias})
        config.update(_common.serialize_weight_args(self, ("kernel", "bias")))
        return config


class Flatten(Layer):
    """Flatten all axes but the batch axis (channels_first inputs are first moved to
    channels_last, as Keras does, so both formats flatten in the same order).

    Args:
        data_format: "channels_last" (default) or "channels_first".
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _common.normalize_data_format(data_format)
        self._shape = None

    def _channels_first(self, ndim: int) -> bool:
        return self.data_format == "channels_first" and ndim > 2

    def call(self, x, training=None, mask=None):
        """Forward pass."""
        x = _common.cast(x, self.compute_dtype)
        self._shape = x.shape
        if self._channels_first(x.ndim):
            x = np.moveaxis(x, 1, -1)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # explicit: batch may be 0

    def backward(self, dy):
        """Input gradient: the inverse reshape (and transpose)."""
        shape = self._shape
        if self._channels_first(len(shape)):
            moved = (shape[0],) + shape[2:] + (shape[1],)
            return np.ascontiguousarray(np.moveaxis(np.reshape(dy, moved), -1, 1))
        return np.reshape(dy, shape)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        return (input_shape[0], _common.prod(input_shape[1:]))

    def get_config(self) -> dict:
        config = super().get_config()
        config["data_format"] = self.data_format
        return config


class Activation(Layer):
    """Apply a named activation.

    Args:
        activation: Keras activation name ("relu", "linear", "sigmoid", "tanh",
            "softmax", ...).
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = activations.get(activation)
        self._cache = None

    def call(self, x, training=None, mask=None):
        """Forward pass in one pass over x; keeps only what backward needs."""
        x = _common.cast(x, self.compute_dtype)
        y, self._cache = self.activation.forward(x)
        return y

    def backward(self, dy):
        """Input gradient."""
        return self.activation.backward_from(_common.cast(dy, self.compute_dtype),
                                             self._cache)

    def get_config(self) -> dict:
        config = super().get_config()
        config["activation"] = activations.serialize(self.activation)
        return config


def _non_negative(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    return check_number(value, name, low=0, what="a non-negative finite number")


class ReLU(Layer):
    """Keras ReLU: `max_value` above it, `x` in [threshold, max_value),
    `negative_slope * (x - threshold)` below threshold.

    Args:
        max_value: non-negative float upper saturation, or None.
        negative_slope: non-negative float slope below the threshold.
        threshold: non-negative float.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs):
        super().__init__(**kwargs)
        self.max_value = _non_negative(max_value, "max_value", allow_none=True)
        self.negative_slope = _non_negative(negative_slope, "negative_slope")
        self.threshold = _non_negative(threshold, "threshold")
        self._mask = None

    def call(self, x, training=None, mask=None):
        """Forward pass in one pass over x; keeps a uint8 mask (not a slope array) for
        `backward` (`distbn.ops.activation.relu_forward`)."""
        x = _common.cast(x, self.compute_dtype)
        y, self._mask = activation_ops.relu_forward(x, self.negative_slope, self.threshold,
                                                    self.max_value)
        return y

    def backward(self, dy):
        """Input gradient (one-sided at the kinks: 0 at max_value, 1 at the threshold)."""
        return activation_ops.relu_backward(_common.cast(dy, self.compute_dtype), self._mask,
                                            self.negative_slope)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"max_value": self.max_value, "negative_slope": self.negative_slope,
                       "threshold": self.threshold})
        return config


# --- Dropout -------------------------------------------------------------------------------
# Masks come from a counter-based hash (SplitMix64's finaliser over a per-row key), so the
# mask of a sample depends only on (seed, step, global sample id, element index): N ranks
# holding slices of a global batch draw exactly what one process would.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (returned)."""
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _u64(value) -> np.ndarray:
    # Python ints of any sign map onto uint64 modulo 2**64 (a 1-element array: in-place
    # mixing needs an array, and array arithmetic wraps silently).
    return np.array([int(value) % (1 << 64)], dtype=np.uint64)


def dropout_bits(seed: int, step: int, sample_ids, n: int) -> np.ndarray:
    """Random 32-bit words per sample: row i depends only on (seed, step, sample_ids[i]).

    Args:
        seed: the Dropout layer's seed.
        step: the training step (or call counter).
        sample_ids: 1-D non-negative ints, the global indices of the rows.
        n: how many words per row.

    Returns:
        uint32 array of shape (len(sample_ids), n).
    """
    ids = np.asarray(sample_ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(_u64(seed) + _GOLDEN) ^ (_u64(step) + _GOLDEN))
        rows = _mix64(key ^ (ids + _GOLDEN))
        counters = np.arange(1, (n + 1) // 2 + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(rows[:, None] + counters[None, :])
    # Each 64-bit draw gives two 32-bit words (the pair order follows the platform's
    # byte order; every supported platform is little-endian).
    return bits.view(np.uint32).reshape(len(ids), 2 * bits.shape[1])[:, :n]


def check_sample_ids(sample_ids, batch: int) -> np.ndarray:
    """`sample_ids` as int64 of length `batch` (arange(batch) for None); checks values."""
    if sample_ids is None:
        return np.arange(batch, dtype=np.int64)
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.shape[0] != batch:
        raise ValueError(
            f"sample_ids must be 1-D with one id per row ({batch}), got shape {ids.shape}"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"sample_ids must be integers, got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"sample_ids must be non-negative, got {int(ids.min())}")
    return ids.astype(np.int64, copy=False)


class Dropout(Layer):
    """Inverted dropout with masks keyed by global sample id (reproducible across ranks).

    In training, `y = x * keep / (1 - rate)` where `keep` for row i is drawn from
    (seed, step, sample_ids[i]) only. `training=None`/False is the identity.

    Args:
        rate: float in [0, 1], the fraction of inputs to drop.
        noise_shape: None, or a shape (None entries take the input's) whose first entry
            is None or the batch size; the mask is broadcast over size-1 axes.
        seed: int; default drawn from `distbn.random.generator()` (so `set_seed` fixes it).
        **kwargs: `name`, `dtype`, `trainable`.
    """

    #: Sequential passes `sample_ids` and `step` to layers that set this.
    uses_sample_ids = True

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = check_number(rate, "rate", low=0, high=1)
        if noise_shape is not None:
            noise_shape = tuple(noise_shape)
        self.noise_shape = noise_shape
        if seed is None:
            seed = int(_random.generator().integers(0, 2**31 - 1))
        self.seed = check_int(seed, "seed", what="an int or None")
        self._calls = 0
        self._mask = None

    def _mask_shape(self, shape) -> tuple:
        if self.noise_shape is None:
            return tuple(shape)
        if len(self.noise_shape) != len(shape):
            raise ValueError(
                f"Dropout {self.name!r}: noise_shape={self.noise_shape} does not match the "
                f"input rank {len(shape)} (input shape {shape})"
            )
        out = tuple(s if n is None else int(n) for n, s in zip(self.noise_shape, shape,
                                                               strict=True))
        if out[0] != shape[0] or any(n not in (1, s) for n, s in zip(out, shape, strict=True)):
            raise ValueError(
                f"Dropout {self.name!r}: noise_shape={self.noise_shape} must broadcast to "
                f"the input shape {shape} with a per-sample first axis"
            )
        return out

    def __call__(self, x, training=None, mask=None, sample_ids=None, step=None):
        """Forward pass.

        Args:
            x: input, batch first.
            training: truthy to drop; None/False is the identity.
            mask: ignored (Keras signature).
            sample_ids: global indices of the rows (default arange(batch)).
            step: training step keying the masks; None uses this layer's own counter
                of training calls, so successive plain calls draw fresh masks.

        Returns:
            The output array.
        """
        x = np.asarray(x)
        if not self.built:
            self.build(x.shape)
        x = _common.cast(x, self.compute_dtype)
        if not training or self.rate == 0:
            self._mask = None
            return x
        ids = check_sample_ids(sample_ids, x.shape[0])
        if step is None:
            step = self._calls
        self._calls += 1
        shape = self._mask_shape(x.shape)
        per_row = math.prod(shape[1:])
        if self.rate == 1:
            self._mask = np.zeros(shape, dtype=x.dtype)
        else:
            bits = dropout_bits(self.seed, step, ids, per_row).reshape(shape)
            # keep iff the word, as a fraction of 2**32, is >= rate
            threshold = np.uint32(min(round(self.rate * 2**32), 2**32 - 1))
            scale = x.dtype.type(1.0 / (1.0 - self.rate))
            self._mask = (bits >= threshold) * scale
        return x * self._mask

    def call(self, x, training=None, mask=None):
        return self(x, training=training)

    def backward(self, dy):
        """Input gradient: dy times the last mask (identity after an inference call)."""
        dy = _common.cast(dy, self.compute_dtype)
        return dy if self._mask is None else dy * self._mask

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"rate": self.rate, "noise_shape": self.noise_shape, "seed": self.seed})
        return config
