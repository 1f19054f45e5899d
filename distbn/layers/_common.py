"""Argument checking and shape arithmetic shared by the core, conv and pooling layers."""

from __future__ import annotations

import math

import numpy as np

from distbn import constraints, initializers, regularizers
from distbn.checks import check_positive_int, is_int

__all__ = [
    "normalize_tuple", "normalize_data_format", "normalize_padding", "check_positive_int",
    "conv_output_length", "same_padding", "pad_amounts", "to_channels_last",
    "from_channels_last", "resolve_weight_args", "serialize_weight_args", "cast", "prod",
]


def normalize_tuple(value, n: int, name: str) -> tuple[int, ...]:
    """An int or an n-sequence of positive ints as an n-tuple (Keras' `standardize_tuple`)."""
    if is_int(value):
        values = (value,) * n
    else:
        try:
            values = tuple(value)
        except TypeError:
            values = None
        if values is None or len(values) != n:
            raise ValueError(
                f"{name} must be an integer or a tuple of {n} integers, got {name}={value!r}"
            )
    for v in values:
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must contain positive integers, got {name}={value!r}")
    return tuple(int(v) for v in values)


def normalize_data_format(value) -> str:
    """None -> "channels_last" (Keras' default image_data_format); checks the name."""
    if value is None:
        return "channels_last"
    if not isinstance(value, str) or value.lower() not in ("channels_last", "channels_first"):
        raise ValueError(
            "data_format must be 'channels_last' or 'channels_first', "
            f"got data_format={value!r}"
        )
    return value.lower()


def normalize_padding(value) -> str:
    """"valid" or "same" (case-insensitive, as Keras accepts)."""
    if not isinstance(value, str) or value.lower() not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got padding={value!r}")
    return value.lower()


def conv_output_length(length, window: int, padding: str, stride: int, dilation: int = 1):
    """Output length of a window sweep (TF/Keras arithmetic); None stays None.

    "valid": floor((L - (k-1)*d - 1) / s) + 1; "same": ceil(L / s).
    """
    if length is None:
        return None
    effective = (window - 1) * dilation + 1
    if padding == "same":
        return -(-length // stride)
    return (length - effective) // stride + 1


def same_padding(length: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after): the odd pixel goes after, as TF/Keras pad."""
    effective = (window - 1) * dilation + 1
    out = -(-length // stride)
    total = max((out - 1) * stride + effective - length, 0)
    return total // 2, total - total // 2


def pad_amounts(spatial, windows, strides, dilations, padding) -> list[tuple[int, int]]:
    """Per spatial axis (before, after) padding for `padding` ("valid" pads nothing)."""
    if padding == "valid":
        return [(0, 0)] * len(spatial)
    return [same_padding(n, k, s, d)
            for n, k, s, d in zip(spatial, windows, strides, dilations, strict=True)]


def to_channels_last(x: np.ndarray, data_format: str) -> np.ndarray:
    """NCHW -> NHWC view for channels_first (kernels work in channels_last)."""
    return np.moveaxis(x, 1, -1) if data_format == "channels_first" else x


def from_channels_last(x: np.ndarray, data_format: str) -> np.ndarray:
    """NHWC -> the layer's data format (contiguous, so callers get a plain array)."""
    if data_format == "channels_first":
        return np.ascontiguousarray(np.moveaxis(x, -1, 1))
    return x


def resolve_weight_args(layer, prefixes, initializer_args, regularizer_args,
                        constraint_args) -> None:
    """Resolve and store `<prefix>_initializer/_regularizer/_constraint` on `layer`.

    Args:
        layer: the layer to set the attributes on.
        prefixes: weight name prefixes, e.g. ("kernel", "bias").
        initializer_args, regularizer_args, constraint_args: dicts prefix -> identifier.
    """
    for p in prefixes:
        setattr(layer, f"{p}_initializer", initializers.get(initializer_args[p]))
        setattr(layer, f"{p}_regularizer", regularizers.get(regularizer_args[p]))
        setattr(layer, f"{p}_constraint", constraints.get(constraint_args[p]))


def serialize_weight_args(layer, prefixes) -> dict:
    """The Keras-serialized initializer/regularizer/constraint entries of `get_config`."""
    config = {}
    for p in prefixes:
        config[f"{p}_initializer"] = initializers.serialize(getattr(layer, f"{p}_initializer"))
    for p in prefixes:
        config[f"{p}_regularizer"] = regularizers.serialize(getattr(layer, f"{p}_regularizer"))
    for p in prefixes:
        config[f"{p}_constraint"] = constraints.serialize(getattr(layer, f"{p}_constraint"))
    return config


def cast(x, dtype) -> np.ndarray:
    """`x` as an array of `dtype`, without a copy when it already is one."""
    return np.asarray(x).astype(dtype, copy=False)


def prod(shape) -> int | None:
    """Product of dims, None if any dim is None."""
    if any(d is None for d in shape):
        return None
    return math.prod(shape)


def no_activity_regularizer(layer_name: str, value) -> None:
    # Accepted for Keras-config compatibility; an activity penalty would need the
    # activations' gradient wired into backward, which no distbn model uses yet.
    if value is not None:
        raise ValueError(
            f"{layer_name}: activity_regularizer is not supported, got "
            f"activity_regularizer={value!r}"
        )
