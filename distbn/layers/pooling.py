"""Pooling layers: MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D,
GlobalAveragePooling1D.

The 2-D layers work out shapes and pads (Keras' rules) and move channels_first inputs
to channels_last; the maths is `distbn.ops.pooling` (numpy reference or numba kernels,
by `DISTBN_KERNELS`)."""

from __future__ import annotations

import numpy as np

from distbn.layers import _common
from distbn.layers.base import Layer
from distbn.ops import pooling as pool_ops

__all__ = ["MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
           "GlobalAveragePooling1D"]


class _Pooling2D(Layer):
    """Shared arguments, shapes and window views of the 2-D pooling layers."""

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _common.normalize_tuple(pool_size, 2, "pool_size")
        self.strides = (self.pool_size if strides is None
                        else _common.normalize_tuple(strides, 2, "strides"))
        self.padding = _common.normalize_padding(padding)
        self.data_format = _common.normalize_data_format(data_format)
        self._cache = None

    def _out_hw(self, h, w) -> tuple:
        return tuple(_common.conv_output_length(n, k, self.padding, s)
                     for n, k, s in zip((h, w), self.pool_size, self.strides, strict=True))

    def _prepare(self, x):
        """(channels_last x, pads, (ho, wo)), with the input checked."""
        x = _common.cast(x, self.compute_dtype)
        if x.ndim != 4:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} expects a 4-D {self.data_format} "
                f"input, got shape {x.shape}"
            )
        xl = np.ascontiguousarray(_common.to_channels_last(x, self.data_format))
        h, w = xl.shape[1:3]
        ho, wo = self._out_hw(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: input spatial size {(h, w)} is "
                f"smaller than pool_size={self.pool_size} with padding={self.padding!r}"
            )
        pads = _common.pad_amounts((h, w), self.pool_size, self.strides, (1, 1), self.padding)
        return xl, pads, (ho, wo)

    def _grad_in(self, dy):
        return np.ascontiguousarray(
            _common.to_channels_last(_common.cast(dy, self.compute_dtype), self.data_format))

    def _grad_out(self, dx):
        return _common.from_channels_last(dx, self.data_format)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.data_format == "channels_first":
            n, c, h, w = input_shape
            return (n, c, *self._out_hw(h, w))
        n, h, w, c = input_shape
        return (n, *self._out_hw(h, w), c)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"pool_size": self.pool_size, "strides": self.strides,
                       "padding": self.padding, "data_format": self.data_format})
        return config


class MaxPooling2D(_Pooling2D):
    """Max over each window ("same" pads with -inf, so padding never wins).

    Ties go to the first maximum in row-major window order, in the forward choice and
    in the gradient alike, so the result is deterministic.

    Args:
        pool_size: int or (ph, pw); default (2, 2).
        strides: int, (sh, sw) or None (= pool_size).
        padding: "valid" or "same".
        data_format: "channels_last" (default) or "channels_first".
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def call(self, x, training=None, mask=None):
        """Forward pass; keeps each window's chosen tap for `backward`."""
        xl, pads, out_hw = self._prepare(x)
        y, idx = pool_ops.max_pool2d_forward(xl, self.pool_size, self.strides, pads, out_hw)
        self._cache = (idx, pads, xl.shape[1:3])
        return _common.from_channels_last(y, self.data_format)

    def backward(self, dy):
        """Input gradient: dy routed to each window's chosen maximum."""
        idx, pads, hw = self._cache
        return self._grad_out(pool_ops.max_pool2d_backward(
            self._grad_in(dy), idx, hw, self.pool_size, self.strides, pads))


class AveragePooling2D(_Pooling2D):
    """Mean over each window; with "same", padded positions are not counted (as TF/Keras).

    Args:
        pool_size: int or (ph, pw); default (2, 2).
        strides: int, (sh, sw) or None (= pool_size).
        padding: "valid" or "same".
        data_format: "channels_last" (default) or "channels_first".
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def call(self, x, training=None, mask=None):
        """Forward pass."""
        xl, pads, out_hw = self._prepare(x)
        y, counts = pool_ops.avg_pool2d_forward(xl, self.pool_size, self.strides, pads,
                                                out_hw)
        self._cache = (counts, pads, xl.shape[1:3])
        return _common.from_channels_last(y, self.data_format)

    def backward(self, dy):
        """Input gradient: dy / count spread over each window."""
        counts, pads, hw = self._cache
        return self._grad_out(pool_ops.avg_pool2d_backward(
            self._grad_in(dy), counts, hw, self.pool_size, self.strides, pads))


class GlobalAveragePooling2D(Layer):
    """Mean over the spatial axes.

    Args:
        data_format: "channels_last" (default) or "channels_first".
        keepdims: keep the spatial axes with size 1.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _common.normalize_data_format(data_format)
        self.keepdims = bool(keepdims)
        self._shape = None

    def _axes(self) -> tuple[int, int]:
        return (2, 3) if self.data_format == "channels_first" else (1, 2)

    def call(self, x, training=None, mask=None):
        """Forward pass."""
        x = _common.cast(x, self.compute_dtype)
        if x.ndim != 4:
            raise ValueError(
                f"GlobalAveragePooling2D {self.name!r} expects a 4-D input, got shape {x.shape}"
            )
        self._shape = x.shape
        if self.data_format == "channels_first":  # reduces contiguous axes: numpy's own
            return x.mean(axis=self._axes(), keepdims=self.keepdims)
        y = pool_ops.global_avg_pool2d_forward(np.ascontiguousarray(x))
        return y[:, None, None, :] if self.keepdims else y

    def backward(self, dy):
        """Input gradient: dy / (H*W) broadcast over the spatial axes."""
        shape = self._shape
        dy = _common.cast(dy, self.compute_dtype)
        a, b = self._axes()
        if self.data_format == "channels_first":
            if not self.keepdims:
                dy = np.expand_dims(dy, (a, b))
            return np.broadcast_to(dy / (shape[a] * shape[b]), shape).copy()
        dy = dy.reshape(shape[0], shape[3])  # (N, C), from keepdims' (N, 1, 1, C) too
        return pool_ops.global_avg_pool2d_backward(np.ascontiguousarray(dy), shape)

    def compute_output_shape(self, input_shape):
        input_shape = list(input_shape)
        a, b = self._axes()
        if self.keepdims:
            input_shape[a] = input_shape[b] = 1
            return tuple(input_shape)
        return tuple(d for k, d in enumerate(input_shape) if k not in (a, b))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"data_format": self.data_format, "keepdims": self.keepdims})
        return config


class GlobalAveragePooling1D(Layer):
    """Mean over the steps axis; with a mask, the mean of the unmasked steps only.

    The mask is (batch, steps), binarised (nonzero = keep) as Keras does, and is not
    propagated (the output has no steps axis).

    Differs from Keras: a sample with every step masked out gives zeros (and a zero
    gradient) where Keras divides 0 by 0 and gives NaN.

    Args:
        data_format: "channels_last" (N, steps, C; default) or "channels_first" (N, C, steps).
        keepdims: keep the steps axis with size 1.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _common.normalize_data_format(data_format)
        self.keepdims = bool(keepdims)
        self._cache = None

    def _steps_axis(self) -> int:
        return 2 if self.data_format == "channels_first" else 1

    def call(self, x, training=None, mask=None):
        """Forward pass."""
        x = _common.cast(x, self.compute_dtype)
        if x.ndim != 3:
            raise ValueError(
                f"GlobalAveragePooling1D {self.name!r} expects a 3-D input, got shape {x.shape}"
            )
        axis = self._steps_axis()
        if mask is None:
            self._cache = (x.shape, None, None)
            return x.mean(axis=axis, keepdims=self.keepdims)
        mask = np.asarray(mask)
        if mask.shape != (x.shape[0], x.shape[axis]):
            raise ValueError(
                f"GlobalAveragePooling1D {self.name!r}: the mask must have shape "
                f"(batch, steps) = {(x.shape[0], x.shape[axis])} for input shape {x.shape}, "
                f"got mask.shape={mask.shape}"
            )
        keep = np.expand_dims(mask.astype(bool), 3 - axis)  # broadcast over channels
        counts = keep.sum(axis=axis, keepdims=True).astype(x.dtype)
        counts = np.maximum(counts, 1)  # all-masked sample: 0 / 1, not Keras' 0 / 0
        y = np.where(keep, x, 0).sum(axis=axis, keepdims=True) / counts
        self._cache = (x.shape, keep, counts)
        return y if self.keepdims else np.squeeze(y, axis)

    def backward(self, dy):
        """Input gradient: dy / count over the (unmasked) steps."""
        shape, keep, counts = self._cache
        dy = _common.cast(dy, self.compute_dtype)
        axis = self._steps_axis()
        if not self.keepdims:
            dy = np.expand_dims(dy, axis)
        if keep is None:
            return np.broadcast_to(dy / shape[axis], shape).copy()
        return np.where(keep, dy / counts, 0).astype(dy.dtype, copy=False)

    def compute_output_shape(self, input_shape):
        input_shape = list(input_shape)
        axis = self._steps_axis()
        if self.keepdims:
            input_shape[axis] = 1
            return tuple(input_shape)
        return tuple(d for k, d in enumerate(input_shape) if k != axis)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"data_format": self.data_format, "keepdims": self.keepdims})
        return config
