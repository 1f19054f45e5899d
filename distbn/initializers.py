"""Weight initializers with Keras 3 names, defaults, fan computation and configs.

`get(identifier)` accepts a Keras name ("glorot_uniform", "GlorotUniform", "zeros", ...),
a Keras serialized dict, an `Initializer`, or any callable `init(shape, dtype)`.
Unseeded random initializers draw from `distbn.random.generator()` at call time (so
`distbn.random.set_seed` governs them); a seeded one gives the same values at every
call, as in Keras.
"""

from __future__ import annotations

import math

import numpy as np

from distbn import _objects
from distbn import random as _random
from distbn.checks import check_int, check_number, fail, is_int

__all__ = [
    "Initializer", "Zeros", "Ones", "Constant", "Identity", "RandomNormal",
    "RandomUniform", "TruncatedNormal", "VarianceScaling", "GlorotUniform",
    "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal",
    "Orthogonal", "compute_fans", "get", "serialize",
]

_MODULE = "keras.initializers"


def compute_fans(shape, input_axes=None, output_axes=None) -> tuple[int, int]:
    """Keras' (fan_in, fan_out) of a weight shape.

    Args:
        shape: the weight's shape; conv kernels are (..., in_channels, out_channels).
        input_axes, output_axes: optional axes holding the input / output units (both
            or neither, as Keras).

    Returns:
        (fan_in, fan_out): with both axes lists, the products of those dimensions; else
        for rank >= 3 the receptive field size times the last two dimensions; for rank 2
        the two dimensions; rank 1 its size twice; rank 0 (1, 1).
    """
    shape = tuple(int(d) for d in shape)
    if input_axes is not None and output_axes is not None:
        return (math.prod(shape[a] for a in input_axes),
                math.prod(shape[a] for a in output_axes))
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _dtype(dtype) -> np.dtype:
    return np.dtype("float32" if dtype is None else dtype)


class Initializer(_objects.Configurable):
    """Base class: `init(shape, dtype=None) -> np.ndarray`, plus `get_config`."""

    def __call__(self, shape, dtype=None) -> np.ndarray:
        raise NotImplementedError


class Zeros(Initializer):
    """All zeros."""

    def __call__(self, shape, dtype=None):
        return np.zeros(tuple(shape), dtype=_dtype(dtype))


class Ones(Initializer):
    """All ones."""

    def __call__(self, shape, dtype=None):
        return np.ones(tuple(shape), dtype=_dtype(dtype))


class Constant(Initializer):
    """Every entry equal to `value` (Keras default 0.0)."""

    def __init__(self, value=0.0):
        if not np.isscalar(value) or isinstance(value, (str, bytes)):
            raise ValueError(f"Constant: value must be a scalar number, got {value!r}")
        self.value = value

    def __call__(self, shape, dtype=None):
        return np.full(tuple(shape), self.value, dtype=_dtype(dtype))

    def get_config(self):
        return {"value": self.value}


class Identity(Initializer):
    """`gain` times the identity matrix (2-D shapes only, as in Keras)."""

    def __init__(self, gain=1.0):
        self.gain = gain

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(f"Identity: shape must be 2-D, got {shape!r}")
        return (self.gain * np.eye(*shape)).astype(_dtype(dtype))

    def get_config(self):
        return {"gain": self.gain}


def _check_seed(seed):
    # A serialized keras.random.SeedGenerator carries its integer seed in its config.
    if isinstance(seed, dict):
        seed = (seed.get("config") or {}).get("seed")
    return None if seed is None else check_int(seed, "seed", what="an int or None")


class _Random(Initializer):
    """Shared seed handling of the random initializers."""

    def __init__(self, seed=None):
        self.seed = _check_seed(seed)

    def _rng(self) -> np.random.Generator:
        # A fixed seed gives a fresh generator each call: same values every call (Keras).
        return _random.generator() if self.seed is None else np.random.default_rng(self.seed)

    def get_config(self):
        return {"seed": self.seed}


def _truncated_normal(rng, shape, mean, stddev) -> np.ndarray:
    """Normal samples, those beyond two standard deviations redrawn (Keras semantics)."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():  # each round redraws ~4.6% of the remaining: a handful of rounds
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return mean + stddev * out


class RandomNormal(_Random):
    """Normal samples (Keras defaults mean=0.0, stddev=0.05)."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape, dtype=None):
        return self._rng().normal(self.mean, self.stddev, tuple(shape)).astype(_dtype(dtype))

    def get_config(self):
        return {"seed": self.seed, "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(_Random):
    """Normal samples truncated (redrawn) at two stddev (Keras defaults 0.0, 0.05)."""

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        super().__init__(seed)
        self.mean, self.stddev = mean, stddev

    def __call__(self, shape, dtype=None):
        out = _truncated_normal(self._rng(), tuple(shape), self.mean, self.stddev)
        return out.astype(_dtype(dtype))

    def get_config(self):
        return {"seed": self.seed, "mean": self.mean, "stddev": self.stddev}


class RandomUniform(_Random):
    """Uniform samples in [minval, maxval) (Keras defaults -0.05, 0.05)."""

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        super().__init__(seed)
        self.minval, self.maxval = minval, maxval

    def __call__(self, shape, dtype=None):
        out = self._rng().uniform(self.minval, self.maxval, tuple(shape))
        return out.astype(_dtype(dtype))

    def get_config(self):
        return {"seed": self.seed, "minval": self.minval, "maxval": self.maxval}


class VarianceScaling(_Random):
    """Samples scaled to the weight's fans, as Keras' VarianceScaling.

    Args:
        scale: positive factor; the variance is `scale / n`.
        mode: "fan_in", "fan_out" or "fan_avg" (which n).
        distribution: "truncated_normal" (alias "normal"), "untruncated_normal" or
            "uniform" (limit `sqrt(3 scale / n)`).
        seed: int or None (the process-wide generator).
        input_axes, output_axes: optional lists of the axes holding the input / output
            units, for the fans (Keras 3.12+); None: Keras' default rule.
    """

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None,
                 input_axes=None, output_axes=None):
        super().__init__(seed)
        for name, axes in (("input_axes", input_axes), ("output_axes", output_axes)):
            if axes is not None and not (isinstance(axes, (list, tuple))
                                         and all(is_int(a) for a in axes)):
                fail(name, "None or a list of ints", axes)
        self.input_axes = None if input_axes is None else [int(a) for a in input_axes]
        self.output_axes = None if output_axes is None else [int(a) for a in output_axes]
        scale = check_number(scale, "scale", low=0, low_open=True, what="a positive float",
                             where="VarianceScaling")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(
                f"VarianceScaling: mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}"
            )
        dist = distribution.lower() if isinstance(distribution, str) else distribution
        dist = "truncated_normal" if dist == "normal" else dist
        if dist not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(
                "VarianceScaling: distribution must be 'truncated_normal', "
                f"'untruncated_normal' or 'uniform', got {distribution!r}"
            )
        self.scale, self.mode, self.distribution = float(scale), mode, dist

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        variance = self.scale / max(1.0, n[self.mode])
        rng = self._rng()
        if self.distribution == "truncated_normal":
            # 0.8796... is the stddev of a unit normal truncated at +-2: undo the shrink.
            out = _truncated_normal(rng, shape, 0.0, math.sqrt(variance) / 0.87962566103423978)
        elif self.distribution == "untruncated_normal":
            out = rng.normal(0.0, math.sqrt(variance), shape)
        else:
            limit = math.sqrt(3.0 * variance)
            out = rng.uniform(-limit, limit, shape)
        return out.astype(_dtype(dtype))

    def _axes_config(self) -> dict:
        # Written only when set: Keras releases before the fan axes reject the keys.
        return {k: v for k, v in (("input_axes", self.input_axes),
                                  ("output_axes", self.output_axes)) if v is not None}

    def get_config(self):
        return {"seed": self.seed, "scale": self.scale, "mode": self.mode,
                "distribution": self.distribution, **self._axes_config()}


def _fixed_variance_scaling(name, scale, mode, distribution, doc):
    """A VarianceScaling subclass whose config is the seed (and fan axes), as Keras'."""

    def __init__(self, seed=None, input_axes=None, output_axes=None):
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes,
                                 output_axes)

    def get_config(self):
        return {"seed": self.seed, **self._axes_config()}

    return type(name, (VarianceScaling,), {"__init__": __init__, "get_config": get_config,
                                           "__doc__": doc, "__module__": __name__})


GlorotUniform = _fixed_variance_scaling(
    "GlorotUniform", 1.0, "fan_avg", "uniform", "Uniform in ±sqrt(6 / (fan_in + fan_out)).")
GlorotNormal = _fixed_variance_scaling(
    "GlorotNormal", 1.0, "fan_avg", "truncated_normal",
    "Truncated normal, stddev sqrt(2 / (fan_in + fan_out)).")
HeUniform = _fixed_variance_scaling(
    "HeUniform", 2.0, "fan_in", "uniform", "Uniform in ±sqrt(6 / fan_in).")
HeNormal = _fixed_variance_scaling(
    "HeNormal", 2.0, "fan_in", "truncated_normal", "Truncated normal, stddev sqrt(2 / fan_in).")
LecunUniform = _fixed_variance_scaling(
    "LecunUniform", 1.0, "fan_in", "uniform", "Uniform in ±sqrt(3 / fan_in).")
LecunNormal = _fixed_variance_scaling(
    "LecunNormal", 1.0, "fan_in", "truncated_normal", "Truncated normal, stddev sqrt(1 / fan_in).")


class Orthogonal(_Random):
    """An orthogonal matrix (QR of a normal matrix) times `gain`, reshaped (Keras)."""

    def __init__(self, gain=1.0, seed=None):
        super().__init__(seed)
        self.gain = gain

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"Orthogonal: shape must be at least 2-D, got {shape!r}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = self._rng().standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))  # unique, uniformly distributed Q
        if rows < cols:
            q = q.T
        return (self.gain * q.reshape(shape)).astype(_dtype(dtype))

    def get_config(self):
        return {"seed": self.seed, "gain": self.gain}


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


_CLASSES = [Zeros, Ones, Constant, Identity, RandomNormal, RandomUniform, TruncatedNormal,
            VarianceScaling, GlorotUniform, GlorotNormal, HeUniform, HeNormal, LecunUniform,
            LecunNormal, Orthogonal]
_TABLE = {cls.__name__: cls for cls in _CLASSES}
_TABLE.update({_snake(cls.__name__): cls for cls in _CLASSES})
# Keras' aliases.
_TABLE.update({"uniform": RandomUniform, "normal": RandomNormal, "one": Ones, "zero": Zeros,
               "OrthogonalInitializer": Orthogonal})


def get(identifier):
    """Resolve an initializer identifier to a callable `init(shape, dtype) -> np.ndarray`.

    Args:
        identifier: a Keras name ("he_normal", "HeNormal"), a Keras serialized dict, an
            Initializer (instance or class), or a callable `(shape, dtype) -> array`.

    Returns:
        The initializer (None for None).

    Raises:
        ValueError: quoting the identifier, when it names no initializer.
    """
    return _objects.resolve(identifier, _TABLE, "initializer", _MODULE)


def serialize(initializer):
    """The Keras 3 dict of an initializer (a plain function gives its name)."""
    return _objects.serialize(initializer, _MODULE)
