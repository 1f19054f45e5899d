"""LayerNormalization and GroupNormalization (Keras 3 arguments, semantics and weights).

Both normalise each sample with statistics of that sample alone, so unlike
BatchNormalization they need no synchronization across replicas: N ranks holding
slices of a global batch compute exactly what one process computes on the whole batch.
"""

from __future__ import annotations

import warnings

import numpy as np

from distbn.checks import check_bool, check_int, check_number, is_int
from distbn.layers import _common
from distbn.layers.base import Layer

__all__ = ["LayerNormalization", "GroupNormalization"]


# --- kernels: normalise over `red` axes, then scale/shift ------------------------------------
def _work_dtype(x: np.ndarray, compute_dtype) -> np.dtype:
    # Keras builds these layers with autocast=False: the input is not cast to the compute
    # dtype; the work is done in (at least) float32 of the input's own float dtype.
    base = x.dtype if x.dtype.kind == "f" else np.dtype(compute_dtype)
    return np.result_type(base, np.float32)


def _normalize_forward(x, red, epsilon, gamma, beta, rms_scaling=False):
    """y and the cache of `_normalize_backward`; gamma/beta broadcast against x or None."""
    mean = x.mean(axis=red, keepdims=True)
    xc = x - mean
    var = np.mean(np.square(xc), axis=red, keepdims=True)
    inv = 1.0 / np.sqrt(var + epsilon)
    if rms_scaling:
        # Keras' (deprecated) rms_scaling: x / sqrt(var + eps), not centred.
        xhat = x * inv
        y = xhat if gamma is None else xhat * gamma
        return y, (x, xc, inv, xhat)
    xhat = xc * inv
    y = xhat if gamma is None else xhat * gamma
    if beta is not None:
        y = y + beta
    return y, (x, xc, inv, xhat)


def _normalize_backward(dy, cache, red, gamma, rms_scaling=False):
    """dx, and dy*xhat (to reduce for d gamma)."""
    x, xc, inv, xhat = cache
    dxhat = dy if gamma is None else dy * gamma
    if rms_scaling:
        # y = x * (var + eps)^-1/2 (* gamma); d var / d x = 2 (x - mean) / n
        dx = dxhat * inv - inv ** 3 * np.mean(dxhat * x, axis=red, keepdims=True) * xc
    else:
        dx = inv * (dxhat - dxhat.mean(axis=red, keepdims=True)
                    - xhat * np.mean(dxhat * xhat, axis=red, keepdims=True))
    return dx, dy * xhat


class _PerSampleNorm(Layer):
    """Shared weights, dtype rules, config and backward of LayerNorm and GroupNorm."""

    def _init_weight_args(self, epsilon, center, scale, beta_initializer, gamma_initializer,
                          beta_regularizer, gamma_regularizer, beta_constraint,
                          gamma_constraint):
        self.epsilon = check_number(epsilon, "epsilon", low=0)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        _common.resolve_weight_args(
            self, ("beta", "gamma"),
            {"beta": beta_initializer, "gamma": gamma_initializer},
            {"beta": beta_regularizer, "gamma": gamma_regularizer},
            {"beta": beta_constraint, "gamma": gamma_constraint},
        )
        self.gamma = None
        self.beta = None
        self._cache = None

    def _add_params(self, shape, with_gamma: bool, with_beta: bool) -> None:
        # Keras order: gamma, then beta.
        if with_gamma:
            self.gamma = self.add_weight("gamma", shape, self.gamma_initializer,
                                         regularizer=self.gamma_regularizer,
                                         constraint=self.gamma_constraint)
        if with_beta:
            self.beta = self.add_weight("beta", shape, self.beta_initializer,
                                        regularizer=self.beta_regularizer,
                                        constraint=self.beta_constraint)

    def _run(self, x, work_shape, red, param_shape, rms_scaling=False):
        """Forward in the work dtype on x reshaped to `work_shape`; output as Keras casts it."""
        in_dtype = x.dtype if x.dtype.kind == "f" else np.dtype(self.compute_dtype)
        work = _work_dtype(x, self.compute_dtype)
        xw = x.astype(work, copy=False).reshape(work_shape)
        gamma = None if self.gamma is None else self.gamma.value.astype(work).reshape(param_shape)
        beta = None if self.beta is None else self.beta.value.astype(work).reshape(param_shape)
        y, cache = _normalize_forward(xw, red, work.type(self.epsilon), gamma, beta,
                                      rms_scaling)
        self._cache = (cache, x.shape, in_dtype, work, red, param_shape, gamma, rms_scaling)
        self.losses = self.regularization_losses()
        # Keras casts back to the input's dtype, then to the compute dtype.
        return y.astype(in_dtype, copy=False).astype(self.compute_dtype, copy=False).reshape(
            x.shape)

    def backward(self, dy):
        """Input gradient (in the input's dtype); sets gamma.grad and beta.grad."""
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.name!r}: backward called before a forward call")
        cache, shape, in_dtype, work, red, param_shape, gamma, rms = self._cache
        dy = np.asarray(dy)
        if dy.shape != shape:
            raise ValueError(f"{type(self).__name__} {self.name!r}: dy has shape {dy.shape}, "
                             f"the last output had shape {shape}")
        # back through the output casts: compute dtype -> input dtype -> work dtype
        dy = dy.astype(self.compute_dtype, copy=False).astype(in_dtype, copy=False)
        dy = dy.astype(work, copy=False).reshape(cache[0].shape)
        dx, dy_xhat = _normalize_backward(dy, cache, red, gamma, rms)
        keep = tuple(a for a, n in enumerate(param_shape) if n == 1)
        if self.gamma is not None:
            self.gamma.grad = dy_xhat.sum(axis=keep).reshape(self.gamma.shape).astype(
                self.gamma.dtype)
        if self.beta is not None:
            self.beta.grad = dy.sum(axis=keep).reshape(self.beta.shape).astype(self.beta.dtype)
        self.add_regularization_grads()
        return dx.reshape(shape).astype(in_dtype, copy=False)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"epsilon": self.epsilon, "center": self.center, "scale": self.scale})
        config.update(_common.serialize_weight_args(self, ("beta", "gamma")))
        return config


class LayerNormalization(_PerSampleNorm):
    """Normalise each sample over `axis`: `gamma * (x - mean) / sqrt(var + epsilon) + beta`.

    The statistics are per sample (over the `axis` positions of one sample), so this
    layer needs no synchronization across replicas. Masks pass through unused, as in
    Keras. float16 inputs are normalised in float32.

    Differs from Keras: an `axis` that names the batch axis (0) is rejected (the
    statistics would span samples); a list mixing negative and non-negative axes is
    taken by position: for `axis=[-1, 1]` on (N, 3, 4) gamma is (3, 4), where Keras sorts
    the raw values, makes gamma (4, 3) and reshapes (not transposes) it onto the input.

    Args:
        axis: int or list/tuple of ints, the axes to normalise over (one gamma/beta entry
            per position over them); default -1.
        epsilon: small float added to the variance; default 1e-3.
        center: whether to add `beta`.
        scale: whether to multiply by `gamma`.
        rms_scaling: Keras' deprecated flag (warns as Keras does): `gamma * x /
            sqrt(var + epsilon)`, uncentred, no beta.
        beta_initializer, gamma_initializer: initializer identifiers.
        beta_regularizer, gamma_regularizer: regularizer identifiers or None.
        beta_constraint, gamma_constraint: constraint identifiers or None.
        **kwargs: `name`, `dtype`, `trainable` (see `Layer`).
    """

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 rms_scaling=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, (list, tuple)) and axis:
            self.axis = [check_int(a, "axis") for a in axis]
        elif is_int(axis):
            self.axis = int(axis)
        else:
            raise ValueError(f"axis must be an int or a non-empty list of ints, got axis={axis!r}")
        self.rms_scaling = check_bool(rms_scaling, "rms_scaling")
        if self.rms_scaling:
            warnings.warn("LayerNormalization: rms_scaling=True is deprecated in Keras (it "
                          "scales by the variance, not the root mean square)", stacklevel=2)
        self._init_weight_args(epsilon, center, scale, beta_initializer, gamma_initializer,
                               beta_regularizer, gamma_regularizer, beta_constraint,
                               gamma_constraint)
        self._axes = None

    def _positions(self, ndim: int, shape) -> tuple[int, ...]:
        axes = [self.axis] if isinstance(self.axis, int) else self.axis
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"LayerNormalization {self.name!r}: axis {a} is out of range "
                                 f"for input shape {tuple(shape)}; got axis={self.axis!r}")
        pos = sorted(a % ndim for a in axes)
        if len(set(pos)) != len(pos):
            raise ValueError(f"LayerNormalization {self.name!r}: axis={self.axis!r} names the "
                             f"same axis twice for input shape {tuple(shape)}")
        if 0 in pos:
            raise ValueError(f"LayerNormalization {self.name!r}: axis={self.axis!r} includes "
                             f"the batch axis of input shape {tuple(shape)}; the statistics "
                             "must be per sample")
        return tuple(pos)

    def build(self, input_shape) -> None:
        """Create `gamma` and `beta`, shaped like the input along `axis`."""
        input_shape = tuple(input_shape)
        self._axes = self._positions(len(input_shape), input_shape)
        shape = tuple(input_shape[a] for a in self._axes)
        if any(d is None for d in shape):
            raise ValueError(f"LayerNormalization {self.name!r}: axis={self.axis!r} of input "
                             f"shape {input_shape} must have a known size")
        self._add_params(shape, self.scale or self.rms_scaling,
                         self.center and not self.rms_scaling)
        super().build(input_shape)

    def call(self, x, training=None, mask=None):
        """Forward pass (mask ignored: the statistics of a position are its own sample's)."""
        x = np.asarray(x)
        built = self.input_shape
        if x.ndim != len(built) or any(x.shape[a] != built[a] for a in self._axes):
            raise ValueError(
                f"LayerNormalization {self.name!r} was built for input shape {built} "
                f"(axis={self.axis!r}), got an input of shape {x.shape}")
        param_shape = tuple(x.shape[a] if a in self._axes else 1 for a in range(x.ndim))
        return self._run(x, x.shape, self._axes, param_shape, self.rms_scaling)

    def compute_output_shape(self, input_shape):
        self._positions(len(input_shape), input_shape)
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config["axis"] = self.axis if isinstance(self.axis, int) else list(self.axis)
        config["rms_scaling"] = self.rms_scaling
        return config


class GroupNormalization(_PerSampleNorm):
    """Split the channels into `groups` and normalise each group of each sample over its
    channels and every non-batch axis; then per-channel `gamma`, `beta`.

    The statistics are per sample (and group), so this layer needs no synchronization
    across replicas. Masks pass through unused, as in Keras. `groups=-1` is instance
    normalization (one group per channel; `groups` then reads the channel count after
    `build`, as in Keras). float16 inputs are normalised in float32.

    Differs from Keras: `axis` naming the batch axis is rejected (Keras accepts it and
    mixes samples).

    Args:
        groups: positive int dividing the channel count, or -1; default 32.
        axis: the channel axis; default -1.
        epsilon: small float added to the variance; default 1e-3.
        center: whether to add `beta`.
        scale: whether to multiply by `gamma`.
        beta_initializer, gamma_initializer: initializer identifiers.
        beta_regularizer, gamma_regularizer: regularizer identifiers or None.
        beta_constraint, gamma_constraint: constraint identifiers or None.
        **kwargs: `name`, `dtype`, `trainable` (see `Layer`).
    """

    def __init__(self, groups=32, axis=-1, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not is_int(groups) or (groups <= 0 and groups != -1):
            raise ValueError("groups must be a positive integer (or -1 for instance "
                             f"normalization), got groups={groups!r}")
        self.groups = int(groups)
        self.axis = check_int(axis, "axis")
        self._init_weight_args(epsilon, center, scale, beta_initializer, gamma_initializer,
                               beta_regularizer, gamma_regularizer, beta_constraint,
                               gamma_constraint)
        self._channel_axis = None

    def _position(self, shape) -> int:
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"GroupNormalization {self.name!r}: axis={self.axis} is out of "
                             f"range for input shape {tuple(shape)}")
        if self.axis % ndim == 0:
            raise ValueError(f"GroupNormalization {self.name!r}: axis={self.axis} is the batch "
                             f"axis of input shape {tuple(shape)}; the statistics must be per "
                             "sample")
        return self.axis % ndim

    def build(self, input_shape) -> None:
        """Resolve groups=-1; create `gamma` and `beta` (channels,)."""
        input_shape = tuple(input_shape)
        axis = self._position(input_shape)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(f"GroupNormalization {self.name!r}: the channel axis {self.axis} "
                             f"of input shape {input_shape} must have a known size")
        groups = channels if self.groups == -1 else self.groups
        if channels < groups or channels % groups:
            raise ValueError(f"GroupNormalization {self.name!r}: groups={groups} must divide "
                             f"the {channels} channels of input shape {input_shape}")
        self.groups = groups
        self._channel_axis = axis
        self._add_params((channels,), self.scale, self.center)
        super().build(input_shape)

    def call(self, x, training=None, mask=None):
        """Forward pass (mask ignored, as in Keras)."""
        x = np.asarray(x)
        built, a = self.input_shape, self._channel_axis
        if x.ndim != len(built) or x.shape[a] != built[a]:
            raise ValueError(
                f"GroupNormalization {self.name!r} was built for input shape {built} "
                f"(channel axis {self.axis}), got an input of shape {x.shape}")
        g = self.groups
        # (n, ..., C, ...) -> (n, ..., G, C/G, ...): reduce over all but n and G.
        work_shape = x.shape[:a] + (g, x.shape[a] // g) + x.shape[a + 1:]
        red = tuple(i for i in range(1, x.ndim + 1) if i != a)
        param_shape = tuple(work_shape[i] if i in (a, a + 1) else 1
                            for i in range(x.ndim + 1))
        return self._run(x, work_shape, red, param_shape)

    def compute_output_shape(self, input_shape):
        self._position(input_shape)
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"groups": self.groups, "axis": self.axis})
        return config
