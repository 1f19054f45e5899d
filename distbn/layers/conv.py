"""Conv2D and Conv1D (Keras 3 arguments) over the kernels in `distbn.ops.conv`.

Conv1D runs on Conv2D's kernels over a height-1 axis (one per group).
"""

from __future__ import annotations

import numpy as np

from distbn.layers import _common, activations
from distbn.layers.base import Layer
from distbn.ops import conv as conv_ops
from distbn.ops.conv import window_slice

__all__ = ["Conv2D", "Conv1D", "window_slice"]


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as Keras): `activation(conv(x, kernel) + bias)`.

    The kernel has Keras' shape (kh, kw, in_channels, filters) in both data formats.

    Args:
        filters: positive int, number of output channels.
        kernel_size: int or (kh, kw).
        strides: int or (sh, sw); default 1.
        padding: "valid" or "same" (TF/Keras arithmetic: the odd pixel goes after).
        data_format: "channels_last" (NHWC, default) or "channels_first" (NCHW).
        dilation_rate: int or (dh, dw); > 1 only with strides 1 (as Keras).
        groups: must be 1 (grouped convolution is not implemented).
        activation: Keras activation name or None.
        use_bias: whether to add a bias per filter.
        kernel_initializer, bias_initializer: initializer identifiers.
        kernel_regularizer, bias_regularizer: regularizer identifiers or None.
        activity_regularizer: must be None (accepted for Keras configs).
        kernel_constraint, bias_constraint: constraint identifiers or None.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid",
                 data_format=None, dilation_rate=(1, 1), groups=1, activation=None,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = _common.check_positive_int(filters, "filters")
        self.kernel_size = _common.normalize_tuple(kernel_size, 2, "kernel_size")
        self.strides = _common.normalize_tuple(strides, 2, "strides")
        self.padding = _common.normalize_padding(padding)
        self.data_format = _common.normalize_data_format(data_format)
        self.dilation_rate = _common.normalize_tuple(dilation_rate, 2, "dilation_rate")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "strides > 1 is not supported together with dilation_rate > 1, got "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        if groups != 1:
            raise ValueError(f"only groups=1 is supported, got groups={groups!r}")
        self.groups = 1
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

    def _channel_axis(self) -> int:
        return 1 if self.data_format == "channels_first" else -1

    def build(self, input_shape) -> None:
        """Create `kernel` (kh, kw, in_channels, filters) and `bias` (filters,)."""
        input_shape = tuple(input_shape)
        channels = input_shape[self._channel_axis()] if len(input_shape) == 4 else None
        if channels is None:
            raise ValueError(
                f"Conv2D {self.name!r} needs a 4-D input with a known channel axis "
                f"({self.data_format}), got input_shape={input_shape}"
            )
        self.kernel = self.add_weight("kernel", self.kernel_size + (channels, self.filters),
                                      self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        super().build(input_shape)

    def _out_hw(self, h, w) -> tuple:
        return tuple(
            _common.conv_output_length(n, k, self.padding, s, d)
            for n, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate,
                                  strict=True)
        )

    def call(self, x, training=None, mask=None):
        """Forward pass: im2col and one GEMM (`distbn.ops.conv`), bias, activation."""
        x = _common.cast(x, self.compute_dtype)
        cin = self.kernel.shape[2]
        if x.ndim != 4 or x.shape[self._channel_axis()] != cin:
            raise ValueError(
                f"Conv2D {self.name!r} expects a 4-D {self.data_format} input with {cin} "
                f"channels, got shape {x.shape}"
            )
        xl = _common.to_channels_last(x, self.data_format)
        n, h, w, _ = xl.shape
        ho, wo = self._out_hw(h, w)
        if ho < 1 or wo < 1:
            raise ValueError(
                f"Conv2D {self.name!r}: input spatial size {(h, w)} is smaller than the "
                f"(dilated) kernel {self.kernel_size} with padding={self.padding!r}"
            )
        pads = _common.pad_amounts((h, w), self.kernel_size, self.strides,
                                   self.dilation_rate, self.padding)
        kernel = _common.cast(self.kernel.value, self.compute_dtype)
        z, conv_cache = conv_ops.conv2d_forward(xl, kernel, self.strides,
                                                self.dilation_rate, pads, (ho, wo))
        if self.use_bias:
            z += _common.cast(self.bias.value, self.compute_dtype)  # in place: no copy
        # One pass (`distbn.ops.activation`); backward keeps its saved value, not z and y.
        y, saved = self.activation.forward(z)
        self._cache = (conv_cache, saved)
        self.losses = self.regularization_losses()
        return _common.from_channels_last(y, self.data_format)

    input_grad_optional = True

    def backward(self, dy, input_grad=True):
        """Input gradient (None with `input_grad=False`); sets kernel.grad and bias.grad
        (plus regularizer gradients)."""
        if self._cache is None:
            raise RuntimeError(f"Conv2D {self.name!r}: backward called before a forward call")
        conv_cache, saved = self._cache
        dy = _common.to_channels_last(_common.cast(dy, self.compute_dtype), self.data_format)
        dz = self.activation.backward_from(dy, saved)
        kernel = _common.cast(self.kernel.value, self.compute_dtype)
        n, h, w, c = conv_cache[0].shape
        if not input_grad:
            dx, dkernel = conv_ops.conv2d_backward(dz, conv_cache, kernel, input_grad=False)
        elif self.data_format == "channels_first":
            # The gradient is written in NCHW through a channels-last view: no copy after.
            dx = np.empty((n, c, h, w), dtype=dz.dtype)
            _, dkernel = conv_ops.conv2d_backward(dz, conv_cache, kernel,
                                                  dx_out=np.moveaxis(dx, 1, -1))
        else:
            dx, dkernel = conv_ops.conv2d_backward(dz, conv_cache, kernel)
        self.kernel.grad = dkernel.astype(self.kernel.dtype)
        if self.use_bias:
            self.bias.grad = dz.reshape(-1, self.filters).sum(axis=0).astype(self.bias.dtype)
        self.add_regularization_grads()
        return dx

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.data_format == "channels_first":
            ho, wo = self._out_hw(*input_shape[2:4])
            return (input_shape[0], self.filters, ho, wo)
        ho, wo = self._out_hw(*input_shape[1:3])
        return (input_shape[0], ho, wo, self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
            "padding": self.padding, "data_format": self.data_format,
            "dilation_rate": self.dilation_rate, "groups": self.groups,
            "activation": activations.serialize(self.activation), "use_bias": self.use_bias,
        })
        config.update(_common.serialize_weight_args(self, ("kernel", "bias")))
        return config


class _KernelView:
    """Stands in for an inner Conv2D's kernel Variable: a view of a slice of Conv1D's
    kernel (read as `.value`/`.shape`/`.dtype`), with the `.grad` the inner backward sets."""

    def __init__(self, value):
        self.value = value
        self.shape = value.shape
        self.dtype = value.dtype
        self.grad = None


class Conv1D(Layer):
    """1-D convolution (cross-correlation, as Keras): `activation(conv(x, kernel) + bias)`.

    The kernel has Keras' shape (k, in_channels // groups, filters). The work is Conv2D's
    over a height-1 axis: one inner Conv2D per group, reading views of this kernel.

    Args:
        filters: positive int, number of output channels (divisible by `groups`).
        kernel_size: int or (k,).
        strides: int or (s,); default 1.
        padding: "valid", "same" (TF/Keras arithmetic) or "causal" (left-pads
            `dilation_rate * (kernel_size - 1)` zeros, so output t sees inputs <= t).
        data_format: "channels_last" (NLC, default) or "channels_first" (NCL).
        dilation_rate: int or (d,); > 1 only with strides 1 (as Keras).
        groups: positive int dividing `filters` and the input channels: group g maps
            input channels [g*C/G, (g+1)*C/G) to filters [g*F/G, (g+1)*F/G).
        activation: Keras activation name or None.
        use_bias: whether to add a bias per filter.
        kernel_initializer, bias_initializer: initializer identifiers.
        kernel_regularizer, bias_regularizer: regularizer identifiers or None.
        activity_regularizer: must be None (accepted for Keras configs).
        kernel_constraint, bias_constraint: constraint identifiers or None.
        **kwargs: `name`, `dtype`, `trainable`.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", data_format=None,
                 dilation_rate=1, groups=1, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = _common.check_positive_int(filters, "filters")
        self.kernel_size = _common.normalize_tuple(kernel_size, 1, "kernel_size")
        self.strides = _common.normalize_tuple(strides, 1, "strides")
        if isinstance(padding, str) and padding.lower() == "causal":
            self.padding = "causal"
        else:
            try:
                self.padding = _common.normalize_padding(padding)
            except ValueError:
                raise ValueError("padding must be 'valid', 'same' or 'causal', got "
                                 f"padding={padding!r}") from None
        self.data_format = _common.normalize_data_format(data_format)
        self.dilation_rate = _common.normalize_tuple(dilation_rate, 1, "dilation_rate")
        if self.strides[0] > 1 and self.dilation_rate[0] > 1:
            raise ValueError(
                "strides > 1 is not supported together with dilation_rate > 1, got "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        self.groups = _common.check_positive_int(groups, "groups")
        if self.filters % self.groups:
            raise ValueError(f"filters must be divisible by groups, got filters={self.filters}, "
                             f"groups={self.groups}")
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
        self._convs = []
        self._cache = None

    def _channel_axis(self) -> int:
        return 1 if self.data_format == "channels_first" else -1

    def _causal_pad(self) -> int:
        return self.dilation_rate[0] * (self.kernel_size[0] - 1) if self.padding == "causal" \
            else 0

    def _out_length(self, length):
        if length is None:
            return None
        padding = "valid" if self.padding == "causal" else self.padding
        return _common.conv_output_length(length + self._causal_pad(), self.kernel_size[0],
                                          padding, self.strides[0], self.dilation_rate[0])

    def build(self, input_shape) -> None:
        """Create `kernel` (k, in_channels // groups, filters) and `bias` (filters,)."""
        input_shape = tuple(input_shape)
        channels = input_shape[self._channel_axis()] if len(input_shape) == 3 else None
        if channels is None:
            raise ValueError(
                f"Conv1D {self.name!r} needs a 3-D input with a known channel axis "
                f"({self.data_format}), got input_shape={input_shape}"
            )
        if channels % self.groups:
            raise ValueError(
                f"Conv1D {self.name!r}: the {channels} input channels must be divisible by "
                f"groups={self.groups} (input_shape={input_shape})"
            )
        self.kernel = self.add_weight("kernel",
                                      self.kernel_size + (channels // self.groups, self.filters),
                                      self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        compute, variable = self.dtype_policy
        dtype = variable if compute == variable else f"mixed_{compute}"
        padding = "valid" if self.padding == "causal" else self.padding
        # Explicit names: the inner layers must not take Keras-style automatic names.
        self._convs = [
            Conv2D(self.filters // self.groups, (1,) + self.kernel_size,
                   strides=(1,) + self.strides, padding=padding,
                   dilation_rate=(1,) + self.dilation_rate, use_bias=False, dtype=dtype,
                   name=f"{self.name}/group{g}")
            for g in range(self.groups)
        ]
        super().build(input_shape)

    def call(self, x, training=None, mask=None):
        """Forward pass: causal left pad, then one height-1 Conv2D per group."""
        x = _common.cast(x, self.compute_dtype)
        cin = self.kernel.shape[1] * self.groups
        if x.ndim != 3 or x.shape[self._channel_axis()] != cin:
            raise ValueError(
                f"Conv1D {self.name!r} expects a 3-D {self.data_format} input with {cin} "
                f"channels, got shape {x.shape}"
            )
        xl = _common.to_channels_last(x, self.data_format)
        length = xl.shape[1]
        if self._out_length(length) < 1:
            raise ValueError(
                f"Conv1D {self.name!r}: input length {length} is smaller than the (dilated) "
                f"kernel {self.kernel_size} with padding={self.padding!r}"
            )
        left = self._causal_pad()
        if left:
            xl = np.pad(xl, [(0, 0), (left, 0), (0, 0)])
        cg, fg = self.kernel.shape[1], self.filters // self.groups
        parts = []
        for g, conv in enumerate(self._convs):
            conv.kernel = _KernelView(self.kernel.value[None, :, :, g * fg:(g + 1) * fg])
            conv.built = True
            parts.append(conv(xl[:, None, :, g * cg:(g + 1) * cg])[:, 0])
        z = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        if self.use_bias:
            z += _common.cast(self.bias.value, self.compute_dtype)
        y, saved = self.activation.forward(z)
        self._cache = (xl.shape, left, saved)
        self.losses = self.regularization_losses()
        return _common.from_channels_last(y, self.data_format)

    def backward(self, dy):
        """Input gradient; sets kernel.grad and bias.grad (plus regularizer gradients)."""
        if self._cache is None:
            raise RuntimeError(f"Conv1D {self.name!r}: backward called before a forward call")
        padded_shape, left, saved = self._cache
        dy = _common.to_channels_last(_common.cast(dy, self.compute_dtype), self.data_format)
        dz = self.activation.backward_from(dy, saved)
        fg = self.filters // self.groups
        dxs, dks = [], []
        for g, conv in enumerate(self._convs):
            dxs.append(conv.backward(dz[:, None, :, g * fg:(g + 1) * fg])[:, 0])
            dks.append(conv.kernel.grad[0])
        dx = dxs[0] if len(dxs) == 1 else np.concatenate(dxs, axis=-1)
        self.kernel.grad = (dks[0] if len(dks) == 1 else np.concatenate(dks, axis=-1)).astype(
            self.kernel.dtype)
        if self.use_bias:
            self.bias.grad = dz.reshape(-1, self.filters).sum(axis=0).astype(self.bias.dtype)
        self.add_regularization_grads()
        dx = dx[:, left:]
        return _common.from_channels_last(np.ascontiguousarray(dx), self.data_format)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.data_format == "channels_first":
            return (input_shape[0], self.filters, self._out_length(input_shape[2]))
        return (input_shape[0], self._out_length(input_shape[1]), self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
            "padding": self.padding, "data_format": self.data_format,
            "dilation_rate": self.dilation_rate, "groups": self.groups,
            "activation": activations.serialize(self.activation), "use_bias": self.use_bias,
        })
        config.update(_common.serialize_weight_args(self, ("kernel", "bias")))
        return config
