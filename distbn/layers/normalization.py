"""`BatchNormalization`: the Keras 3 layer, in numpy, with an exact backward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distbn import constraints, initializers, regularizers
from distbn import ops as _ops
from distbn.checks import check_bool, check_int, check_number, is_int, is_number
from distbn.distribute import get_strategy
from distbn.layers.base import Layer
from distbn.ops import activation as _act
from distbn.ops import renorm as _renorm

__all__ = ["BatchNormalization"]

# tf.keras 2 config keys that Keras 3 dropped: accepted by from_config while they ask
# for nothing distbn lacks (virtual_batch_size is a constructor argument).
_LEGACY_KEYS = ("fused", "adjustment")
_RENORM_CLIPPING_KEYS = ["rmax", "rmin", "dmax"]


def _check_axis(axis):
    """An int, or a non-empty list/tuple of distinct ints (returned as a tuple)."""
    if is_int(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)) and axis and all(is_int(a) for a in axis):
        if len(set(axis)) != len(axis):
            raise ValueError(f"axis must not repeat an axis, got axis={axis!r}")
        return tuple(int(a) for a in axis)
    raise ValueError(f"axis must be an int or a non-empty list/tuple of ints, got axis={axis!r}")


def _check_renorm_clipping(renorm_clipping) -> dict:
    """Keras 3's validation of `renorm_clipping` (renorm=True), with its messages."""
    clipping = {} if renorm_clipping is None else renorm_clipping
    if not isinstance(clipping, dict):
        raise ValueError(
            "renorm_clipping must be a dict with optional keys "
            f"{_RENORM_CLIPPING_KEYS}, got renorm_clipping={renorm_clipping!r}"
        )
    if set(clipping) - set(_RENORM_CLIPPING_KEYS):
        raise ValueError(
            "Received invalid keys for `renorm_clipping` argument: "
            f"{clipping}. Supported values: {_RENORM_CLIPPING_KEYS}."
        )
    for key, value in clipping.items():
        if value is not None and not is_number(value):
            raise ValueError(
                f"renorm_clipping[{key!r}] must be a float or None, got {value!r}"
            )
    rmax, rmin, dmax = (clipping.get(k) for k in _RENORM_CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            "dmax should be non-negative in the `renorm_clipping` argument. "
            f"Received: dmax={dmax}."
        )
    return dict(clipping)


@dataclass
class _Cache:
    """What `backward` needs from the last call."""

    x: np.ndarray            # the input in the work dtype (float32/float64)
    input_dtype: np.dtype    # dx is returned in the caller's dtype
    compute_dtype: np.dtype  # y's dtype; dy and dx pass through it, as autodiff of casts does
    mask: np.ndarray | None  # boolean, x's rank (training mode only)
    mean: np.ndarray         # float64 channel arrays the output was normalised with
    var: np.ndarray
    gamma: np.ndarray | None  # the scale applied to x̂ (gamma·r with renorm)
    count: np.ndarray | None  # global N per channel in training mode; None in inference
    shape: tuple = ()         # the caller's input shape (x is reshaped for ghost batches)
    red: tuple = ()           # the axes x's statistics reduce over
    ghost: bool = False       # x is (k, B/k, ...): sums carry a leading ghost-batch axis
    renorm_r: np.ndarray | None = None  # renorm corrections (constants in backward)
    renorm_d: np.ndarray | None = None
    relu_mask: np.ndarray | None = None  # a fused ReLU's uint8 mask (the output's shape)
    relu_slope: float = 0.0                # and its negative slope


class BatchNormalization(Layer):
    """Keras 3 `BatchNormalization` in numpy: same arguments, semantics, weights, config.

    Training (`training=True` and `layer.trainable`): normalise with the batch mean and
    biased batch variance over every axis but `axis`, then
    `moving = moving * momentum + stat * (1 - momentum)`. Otherwise (training False or
    None, or a frozen layer): normalise with the moving statistics; nothing changes.
    `y = gamma * (x - mean) / sqrt(var + epsilon) + beta`.

    Dtypes as Keras: floating inputs are cast to the compute dtype; float16 compute is
    done in float32 and cast back (so a float16 input gives float32 under the default
    policy, float16 under "mixed_float16"). Statistics are accumulated in float64.

    Masks as Keras 3: `mask` has one dimension less than the input, is binarised, and is
    broadcast along the input's last axis; the statistics use unmasked positions only,
    every position is normalised.

    Beyond Keras:
      * `backward(dy)` returns the exact input gradient of the last call and sets
        `gamma.grad` / `beta.grad` (plus regularizer gradients) when trainable. In
        training mode it differentiates through the batch statistics; masked positions
        are normalised with them but do not enter them. Inference mode: the affine map.
      * An empty batch (a zero-size reduction) in training leaves the moving statistics
        unchanged, returns an empty output, and warns about nothing. Likewise a channel
        with no unmasked position keeps (and is normalised with) its moving statistics;
        Keras would pull them toward 0.
      * `axis` may be a list/tuple of axes: one parameter per position over those axes
        (weights shaped like the input along them, in increasing axis order).
      * `synchronized=True` computes the batch statistics over every replica of the
        strategy that is current when the layer is constructed (`distbn.get_strategy()`,
        its BN sync group): one all-reduce of the packed float64 [S1, S2, n] per training
        forward, one of [Σdy, Σdy·x̂] per training backward, none in inference and none
        with a single replica. Masks are synchronized too (the counts come from them).
        A rank with an empty local batch still takes part. See docs/numerics.md.
      * `renorm=True` (batch renormalization, as Keras 3.14+): training normalises with
        the batch statistics, then applies the clipped corrections
        `r = s / max(renorm_stddev, sqrt(eps))`, `d = (mean - renorm_mean) / max(...)`
        (s = sqrt(var + eps)) as constants: `y = x̂ (gamma r) + (gamma d + beta)`. Extra
        non-trainable weights, after moving_variance: moving_stddev, renorm_mean,
        renorm_stddev (initialised to sqrt(moving_variance), moving_mean and
        sqrt(moving_variance)). Each training call updates renorm_mean/renorm_stddev
        with `renorm_momentum`, moving_mean/moving_stddev with `momentum`, and sets
        `moving_variance = max(moving_stddev² - eps, 0)`. Inference is unchanged. Works
        with masks, float16 and `synchronized=True` (r and d from the global statistics).
      * `virtual_batch_size=k` (ghost batch normalization, tf-keras 2 semantics): in
        training, a batch of B samples (B divisible by k) is normalised as B/k ghost
        batches of k samples, each with its own statistics; ghost batch j holds samples
        j, j + B/k, j + 2B/k, ... (tf-keras' reshape to (k, B/k, ...)), not contiguous
        runs. The moving statistics (and renorm's corrections and updates) use the mean
        over ghost batches of their means and variances. Inference is unchanged; weights
        keep the (C,) shapes (tf-keras' (1, ..., C) weights are reshaped by
        `set_weights`). A ghost batch is local by definition, so `synchronized=True` is
        refused; so is a mask in training (tf-keras has no consistent meaning for it).
      * The masked mean is exact: Keras divides by (count + 1e-7), a bias that only
        shows when a channel has about one unmasked position (variance ~0).
      * Statistics and moving-average updates are computed in float64, then stored in
        the variables' dtype.

    Args:
        axis: channel axis (int, default -1) or list/tuple of axes.
        momentum: moving-average momentum in [0, 1].
        epsilon: positive float added to the variance.
        center: whether to add `beta`.
        scale: whether to multiply by `gamma`.
        beta_initializer, gamma_initializer, moving_mean_initializer,
        moving_variance_initializer: anything `distbn.initializers.get` accepts.
        beta_regularizer, gamma_regularizer: anything `distbn.regularizers.get` accepts
            (a callable needs `.gradient(value)` for `backward`).
        beta_constraint, gamma_constraint: anything `distbn.constraints.get` accepts;
            exposed as the weights' `.constraint` for the optimizer.
        synchronized: compute batch statistics over all replicas.
        renorm: use batch renormalization in training.
        renorm_clipping: dict with optional keys "rmax", "rmin", "dmax" (floats): r is
            clipped to [rmin, rmax], d to [-dmax, dmax]; missing keys do not clip.
        renorm_momentum: momentum of renorm_mean / renorm_stddev, in [0, 1].
        virtual_batch_size: None, or the ghost-batch size k (a positive int).
        name, dtype, trainable: as `distbn.Layer`.
    """

    has_moving_statistics = True

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, synchronized=False, renorm=False,
                 renorm_clipping=None, renorm_momentum=0.99, virtual_batch_size=None,
                 name=None, dtype=None, trainable=True, **kwargs):
        super().__init__(name=name, dtype=dtype, trainable=trainable, **kwargs)
        self.axis = _check_axis(axis)
        self.renorm = check_bool(False if renorm is None else renorm, "renorm")
        # Keras keeps renorm_clipping as given ({} for None once renorm is on).
        self.renorm_clipping = (_check_renorm_clipping(renorm_clipping) if self.renorm
                                else renorm_clipping)
        self.renorm_momentum = check_number(renorm_momentum, "renorm_momentum", low=0, high=1)
        self.virtual_batch_size = None if virtual_batch_size is None else check_int(
            virtual_batch_size, "virtual_batch_size", minimum=1,
            what="a positive integer that divides the batch size")
        self.momentum = check_number(momentum, "momentum", low=0, high=1)
        self.epsilon = check_number(epsilon, "epsilon", low=0, low_open=True,
                                    what="a positive float")
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.synchronized = check_bool(synchronized, "synchronized")
        if self.synchronized and self.virtual_batch_size is not None:
            raise ValueError(
                "virtual_batch_size and synchronized=True cannot be combined: a ghost batch "
                "is a subset of one replica's batch, so its statistics are local by "
                f"definition; got virtual_batch_size={self.virtual_batch_size}, "
                "synchronized=True"
            )
        # The strategy is fixed at construction, as in Keras; a replica-local layer needs none.
        self._strategy = get_strategy() if self.synchronized else None
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        for arg in ("beta_regularizer", "gamma_regularizer"):
            reg = getattr(self, arg)
            if reg is not None and not callable(getattr(reg, "gradient", None)):
                raise ValueError(
                    f"{arg} needs a .gradient(value) method for backward, got {reg!r}"
                )
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None
        self._axes: tuple = ()
        self._reduction_axes: tuple = ()
        self._cache: _Cache | None = None
        self._fused_relu = None  # (negative_slope, threshold, max_value): see fuse_relu

    # --- fusion with a following ReLU --------------------------------------------------------
    def fuse_relu(self, relu) -> bool:
        """Apply a following ReLU layer inside this layer's call and backward.

        `Sequential`/`Model` call it when a ReLU takes this layer's output and nothing
        else does; they then pass the ReLU layer by (its output is this layer's). The
        forward normalises, scales, shifts and clamps in one pass, keeping the ReLU's
        uint8 mask; backward applies the mask to dy, then differentiates the
        normalisation as before: outputs, gradients and the synchronized statistics
        are those of the two layers run one after the other (the same bits). Config,
        weights and standalone behaviour do not change (nothing is fused unless a model
        asks).

        Args:
            relu: a `distbn.layers.ReLU`, or None to stop fusing.

        Returns:
            Whether the ReLU is fused: not for float16 compute dtypes (the ReLU would
            clamp the float16-rounded output), nor for a ReLU of another dtype policy.
        """
        self._fused_relu = None
        if relu is None:
            return False
        compute = np.dtype(self.compute_dtype)
        if compute == np.float16 or np.dtype(relu.compute_dtype) != compute:
            return False
        self._fused_relu = (relu.negative_slope, relu.threshold, relu.max_value)
        return True

    # --- build -----------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        """Create gamma, beta, moving_mean, moving_variance (Keras order) for `input_shape`.

        Args:
            input_shape: tuple; entries other than the channel axes may be None.
        """
        shape = tuple(None if d is None else int(d) for d in input_shape)
        if self.built:
            self._check_input_shape(shape)
            return
        ndim = len(shape)
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"axis {a} is out of range for an input of rank {ndim} "
                    f"(input shape {shape}); got axis={self.axis!r}"
                )
        axes = tuple(sorted(a % ndim for a in axes))
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"axis={self.axis!r} names the same axis twice for an input of rank {ndim}"
            )
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(
                "with virtual_batch_size the batch axis 0 cannot be a channel axis; got "
                f"axis={self.axis!r} for an input of shape {shape}"
            )
        if any(shape[a] is None for a in axes):
            raise ValueError(
                f"the channel axis {self.axis!r} of input shape {shape} must have a known size"
            )
        param_shape = tuple(shape[a] for a in axes)
        if self.scale:
            self.gamma = self.add_weight("gamma", param_shape, self.gamma_initializer,
                                         regularizer=self.gamma_regularizer,
                                         constraint=self.gamma_constraint)
        if self.center:
            self.beta = self.add_weight("beta", param_shape, self.beta_initializer,
                                        regularizer=self.beta_regularizer,
                                        constraint=self.beta_constraint)
        self.moving_mean = self.add_weight("moving_mean", param_shape,
                                           self.moving_mean_initializer, trainable=False)
        self.moving_variance = self.add_weight("moving_variance", param_shape,
                                               self.moving_variance_initializer,
                                               trainable=False)
        if self.renorm:
            # Keras: moving_stddev and renorm_stddev start at sqrt(moving_variance's
            # initializer), renorm_mean at moving_mean's. The values are reused rather
            # than drawn again (a seeded initializer gives the same values either way).
            stddev = np.sqrt(self.moving_variance.value)
            mean = self.moving_mean.numpy()
            self.moving_stddev = self.add_weight("moving_stddev", param_shape,
                                                 lambda shape, dtype: stddev, trainable=False)
            self.renorm_mean = self.add_weight("renorm_mean", param_shape,
                                               lambda shape, dtype: mean, trainable=False)
            self.renorm_stddev = self.add_weight("renorm_stddev", param_shape,
                                                 lambda shape, dtype: stddev, trainable=False)
        self._axes = axes
        self._reduction_axes = _ops.reduce_axes_for(ndim, axes)
        self.input_shape = shape
        self.built = True
        self.losses = self.regularization_losses()

    def _check_input_shape(self, shape) -> None:
        if len(shape) != len(self.input_shape):
            raise ValueError(
                f"layer {self.name!r} was built for inputs of rank {len(self.input_shape)} "
                f"(shape {self.input_shape}), got an input of rank {len(shape)} "
                f"(shape {tuple(shape)})"
            )
        for a in self._axes:
            if shape[a] != self.input_shape[a]:
                raise ValueError(
                    f"layer {self.name!r} was built for {self.input_shape[a]} channels on "
                    f"axis {a}, got an input of shape {tuple(shape)} with {shape[a]}"
                )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    # --- forward ---------------------------------------------------------------------------
    def call(self, x, training=None, mask=None):
        """Normalise `x` (numpy in, numpy out); see the class docstring for the modes."""
        self._check_input_shape(x.shape)
        input_dtype = x.dtype
        compute = np.dtype(self.compute_dtype)
        # Keras casts inputs to the compute dtype, then does float16 work in float32.
        work = np.dtype(np.float32) if compute == np.float16 else compute
        x = x.astype(compute, copy=False).astype(work, copy=False)
        mask = self._prepare_mask(mask, x.shape)
        red = self._reduction_axes
        gamma = self.gamma.value.astype(np.float64) if self.scale else None
        beta = self.beta.value.astype(np.float64) if self.center else None

        kern = _ops.kernels()  # the active backend: numba's fused kernels or numpy's
        shape, ghost, r = x.shape, False, None
        fused = self._fused_relu if work == compute else None
        relu_masks = []
        normalize = kern.normalize
        if fused is not None:
            def normalize(x_, mean_, var_, gamma_, beta_, epsilon, red_):
                # Normalise and clamp in one pass; the mask is the fused ReLU's.
                y_, m_ = _act.normalize_relu(x_, mean_, var_, gamma_, beta_, epsilon, red_,
                                             *fused)
                relu_masks.append(m_)
                return y_
        if not (training and self.trainable):
            mean = self.moving_mean.value.astype(np.float64)
            var = self.moving_variance.value.astype(np.float64)
            count = mask = None
            y = normalize(x, mean, var, gamma, beta, self.epsilon, red)
        elif self.virtual_batch_size is not None:
            x, red, y, count, mean, var, gamma, r, d = self._ghost_forward(x, mask, gamma, beta)
            ghost = True
        elif self.renorm:
            if self._replicas_in_sync == 1:
                count, mean, m2 = kern.local_mean_m2(x, red, mask)
                var = m2 / np.maximum(count, 1.0)
            else:
                mean, var, count = _ops.synchronized_moments(
                    x, red, mask, self._stats_shift(), self.epsilon, self._reduce_stats)
            mean, var, gamma, beta, r, d = self._renorm_step(count, mean, var, gamma, beta)
            y = normalize(x, mean, var, gamma, beta, self.epsilon, red)
        elif self._replicas_in_sync == 1 and fused is not None:
            # The statistics pass, then normalisation and the ReLU in one pass.
            y, count, mean, var = _ops.batch_norm.compose_train_forward(
                kern.local_mean_m2, normalize, x, red, mask, gamma, beta, self.epsilon,
                self.moving_mean.value, self.moving_variance.value, self.momentum)
        elif self._replicas_in_sync == 1:
            # Statistics, moving averages and normalisation in one call (one compiled
            # function on the numba backend).
            y, count, mean, var = kern.train_forward(
                x, red, mask, gamma, beta, self.epsilon, self.moving_mean.value,
                self.moving_variance.value, self.momentum)
        else:
            mean, var, count = _ops.synchronized_moments(
                x, red, mask, self._stats_shift(), self.epsilon, self._reduce_stats)
            mean, var = _ops.update_moving(self.moving_mean.value, self.moving_variance.value,
                                           count, mean, var, self.momentum)
            y = normalize(x, mean, var, gamma, beta, self.epsilon, red)
        y = y.reshape(shape)
        relu_mask = None
        if fused is not None:
            if relu_masks:
                relu_mask = relu_masks[0].reshape(shape)
            else:  # ghost batches normalise per ghost batch: clamp the result after
                y, relu_mask = _act.relu_forward(y, *fused)
        self._cache = _Cache(x=x, input_dtype=input_dtype, compute_dtype=compute, mask=mask,
                             mean=mean, var=var, gamma=gamma, count=count, shape=shape,
                             red=red, ghost=ghost, renorm_r=r,
                             renorm_d=None if r is None else d, relu_mask=relu_mask,
                             relu_slope=fused[0] if fused is not None else 0.0)
        self.losses = self.regularization_losses()
        return y.astype(compute, copy=False)

    def _renorm_step(self, count, mean, var, gamma, beta):
        """Renorm's corrections and updates from the batch (mean, var, count).

        Returns:
            (mean, var, scale, offset, r, d): the statistics to normalise with (the
            moving ones for channels with no position, which also get r = 1, d = 0) and
            the composed scale gamma·r and offset gamma·d + beta, all float64.
        """
        seen = count > 0
        if not seen.all():
            mean = np.where(seen, mean, self.moving_mean.value.astype(np.float64))
            var = np.where(seen, var, self.moving_variance.value.astype(np.float64))
        clip = self.renorm_clipping
        r, d = _renorm.renorm_correction(mean, var, self.epsilon, self.renorm_mean.value,
                                         self.renorm_stddev.value, clip.get("rmin"),
                                         clip.get("rmax"), clip.get("dmax"))
        if not seen.all():
            r, d = np.where(seen, r, 1.0), np.where(seen, d, 0.0)
        _renorm.update_renorm(self.moving_mean.value, self.moving_variance.value,
                              self.moving_stddev.value, self.renorm_mean.value,
                              self.renorm_stddev.value, count, mean, var, self.epsilon,
                              self.momentum, self.renorm_momentum)
        scale, offset = _renorm.compose_transforms(r, d, gamma, beta)
        return mean, var, scale, offset, r, d

    def _ghost_forward(self, x, mask, gamma, beta):
        """Training forward with ghost batches (tf-keras' virtual_batch_size).

        x (B, ...) is viewed as (k, B/k, ...): ghost batch j is x[j::B/k] (tf-keras'
        reshape), and the (B/k, *channels) statistics reduce over the new axis 0 and the
        original non-batch reduce axes. The moving statistics take the ghost batches'
        average mean and variance.

        Returns:
            (x, red, y, count, mean, var, scale, r, d) for the reshaped x: per-ghost
            float64 channel arrays of shape (B/k, *param shape); scale is the gamma (or
            gamma·r) broadcast to it; r, d are None without renorm.
        """
        k, batch = self.virtual_batch_size, x.shape[0]
        if batch % k:
            raise ValueError(
                f"virtual_batch_size={k} does not divide the batch size {batch} of the "
                f"input of shape {x.shape} (layer {self.name!r})"
            )
        if mask is not None:
            raise ValueError(
                f"layer {self.name!r}: a mask cannot be combined with virtual_batch_size="
                f"{k} in training (tf-keras has no consistent meaning for it)"
            )
        ghosts = batch // k
        x = x.reshape((k, ghosts) + x.shape[1:])
        red = (0,) + tuple(a + 1 for a in self._reduction_axes if a != 0)
        kern = _ops.kernels()
        count, mean, m2 = kern.local_mean_m2(x, red, None)
        var = m2 / np.maximum(count, 1.0)
        total = count.sum(axis=0)
        if ghosts:
            batch_mean, batch_var = mean.mean(axis=0), var.mean(axis=0)
        else:  # an empty batch: count 0 keeps the moving statistics
            batch_mean = np.zeros(total.shape)
            batch_var = np.zeros(total.shape)
        r = d = None
        if self.renorm:
            _, _, gamma, beta, r, d = self._renorm_step(total, batch_mean, batch_var, gamma,
                                                        beta)
        else:
            _ops.update_moving(self.moving_mean.value, self.moving_variance.value, total,
                               batch_mean, batch_var, self.momentum)
        full = mean.shape
        gamma = None if gamma is None else np.broadcast_to(gamma, full)
        beta = None if beta is None else np.broadcast_to(beta, full)
        y = kern.normalize(x, mean, var, gamma, beta, self.epsilon, red)
        return x, red, y, count, mean, var, gamma, r, d

    def _prepare_mask(self, mask, x_shape):
        """A Keras mask (input rank - 1, broadcast along the last axis) as a boolean array
        of the input's rank; None stays None."""
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.ndim != len(x_shape) - 1:
            raise ValueError(
                "The mask must have one dimension less than the inputs; got "
                f"mask.shape={mask.shape}, inputs.shape={tuple(x_shape)}"
            )
        expanded = mask.shape + (1,)
        try:
            fits = np.broadcast_shapes(expanded, x_shape) == tuple(x_shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"The mask of shape {mask.shape} does not broadcast to the inputs' shape "
                f"{tuple(x_shape)} without its last axis; got mask.shape={mask.shape}, "
                f"inputs.shape={tuple(x_shape)}"
            )
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"The mask must be boolean or numeric, got dtype {mask.dtype}")
        return (mask if mask.dtype == bool else mask != 0).reshape(expanded)

    # --- synchronized statistics ----------------------------------------------------------
    @property
    def batch_moments(self):
        """This replica's `(count, mean, m2)` of the last call's input, if it was a
        training-mode call; else None (no call yet, inference, a frozen layer).

        Float64 channel arrays (`ops.local_mean_m2`: count of positions, mean, centred
        sum of squares M2) over the whole local batch, masked-out positions left out,
        ghost batches pooled: the rank's own statistics, whatever the layer normalised
        with. Computed on access from the input kept for `backward`, so training pays
        nothing for it.
        """
        c = self._cache
        if c is None or c.count is None:
            return None
        return _ops.local_mean_m2(c.x.reshape(c.shape), self._reduction_axes, c.mask)

    @property
    def _replicas_in_sync(self) -> int:
        """How many replicas share this layer's batch statistics (1: replica-local)."""
        return 1 if self._strategy is None else self._strategy.sync_group_size

    def _stats_shift(self):
        """The per-channel shift K of the shifted sums that replicas add up.

        K must be identical on every replica: the moving mean, which tracks the batch
        mean once warmed up; `ops.synchronized_moments` repairs the variance when K is too far off.
        """
        return self.moving_mean.value.astype(np.float64)

    def _reduce_stats(self, buffer):
        """Sum a packed float64 statistics buffer over the sync group, in place.

        Called once per training-mode forward (also for an empty local batch); no MPI
        call with a single replica.
        """
        if self._replicas_in_sync > 1:
            self._strategy.sync_all_reduce(buffer, name=f"{self.name}/forward")
        return buffer

    def _reduce_grad_sums(self, buffer):
        """Sum the packed float64 backward buffer [Σdy, Σdy·x̂] over the sync group.

        Called once per training-mode backward. Works in place.
        """
        if self._replicas_in_sync > 1:
            self._strategy.sync_all_reduce(buffer, name=f"{self.name}/backward")
        return buffer

    # --- backward --------------------------------------------------------------------------
    def backward(self, dy):
        """Gradient of the last call: returns dx; sets gamma.grad and beta.grad.

        Args:
            dy: gradient of the loss with respect to the last output (same shape).

        Returns:
            dx, in the dtype of the last call's input (the input is kept by reference:
            modifying it in place before `backward` changes the result).
        """
        c = self._cache
        if c is None:
            raise RuntimeError(
                f"backward() of layer {self.name!r} was called before the layer was called"
            )
        dy = np.asarray(dy)
        if dy.shape != c.shape:
            raise ValueError(
                f"backward() of layer {self.name!r}: dy has shape {dy.shape}, but the last "
                f"call's output has shape {c.shape}"
            )
        # The output was cast to the compute dtype: its cotangent lives there too.
        dy = dy.astype(c.compute_dtype, copy=False)
        if c.relu_mask is not None:  # the fused ReLU's backward first, as the layer's
            dy = _act.relu_backward(np.ascontiguousarray(dy), c.relu_mask, c.relu_slope)
        dy = dy.astype(c.x.dtype, copy=False)
        dy = dy.reshape(c.x.shape)  # ghost batches: the (k, B/k, ...) view
        red = c.red
        inv_std = _ops.inverse_std(c.var, self.epsilon)
        kern = _ops.kernels()  # the active backend: numba's fused kernels or numpy's
        if c.count is None:  # inference: the statistics are constants
            if self.trainable and (self.scale or self.center):
                self._set_param_grads(kern.backward_sums(dy, c.x, c.mean, inv_std, red))
            dx = kern.input_grad(dy, c.x, c.mean, inv_std, c.gamma, None, None, None, red)
        elif self._replicas_in_sync == 1:
            # The local sums are the batch's: sums and dx in one call (one compiled
            # function for channels-first inputs on the numba backend).
            sums, dx = kern.train_backward(dy, c.x, c.mean, inv_std, c.gamma, c.count, red,
                                           c.mask)
            self._set_param_grads(sums)
        else:
            sums, dx = _ops.synchronized_backward(dy, c.x, c.mean, inv_std, c.gamma,
                                                  c.count, red, c.mask,
                                                  self._reduce_grad_sums)
            self._set_param_grads(sums)
        # Back through the input casts (input -> compute dtype -> work dtype), as Keras;
        # a non-float input (cast, not differentiable in Keras) gets the compute dtype.
        dx = dx.reshape(c.shape).astype(c.compute_dtype, copy=False)
        return dx.astype(c.input_dtype, copy=False) if c.input_dtype.kind == "f" else dx

    def _set_param_grads(self, sums):
        """gamma.grad = Σdy·x̂ and beta.grad = Σdy (local sums over all positions, copied
        into the weights' dtype), plus regularizer gradients; nothing for a frozen layer.

        Ghost batches add up their sums; with renorm, y = x̂·γr + γd + β gives
        gamma.grad = r·Σdy·x̂ + d·Σdy (r, d constants)."""
        if not self.trainable:
            return
        c = self._cache
        if c.ghost:
            sums = sums.sum(axis=1)
        sum_dy, sum_dy_xhat = sums[0], sums[1]
        if self.scale:
            if c.renorm_r is not None:
                sum_dy_xhat = c.renorm_r * sum_dy_xhat + c.renorm_d * sum_dy
            self.gamma.grad = sum_dy_xhat.astype(self.gamma.dtype)
        if self.center:
            self.beta.grad = sum_dy.astype(self.beta.dtype)
        if self.scale or self.center:
            self.add_regularization_grads()

    # --- config ----------------------------------------------------------------------------
    def get_config(self) -> dict:
        """Every constructor argument, in Keras 3's keys and serialized forms."""
        config = super().get_config()
        config.update({
            "axis": self.axis if isinstance(self.axis, int) else list(self.axis),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer":
                initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": (dict(self.renorm_clipping)
                                if isinstance(self.renorm_clipping, dict)
                                else self.renorm_clipping),
            "renorm_momentum": self.renorm_momentum,
        })
        # Only when set, as tf-keras: Keras 3 rejects the key.
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

    def set_weights(self, weights) -> None:
        """As `Layer.set_weights`; with virtual_batch_size, tf-keras' (1, ..., C)-shaped
        weights are accepted and reshaped to distbn's (Keras 3's) shapes."""
        weights = list(weights)
        if self.virtual_batch_size is not None and len(weights) == len(self._weights):
            def squeezed(s):
                return tuple(d for d in s if d != 1)
            weights = [np.reshape(w, var.shape)
                       if np.shape(w) != var.shape and np.size(w) == math.prod(var.shape)
                       and squeezed(np.shape(w)) == squeezed(var.shape) else w
                       for w, var in zip(weights, self._weights, strict=True)]
        super().set_weights(weights)

    @classmethod
    def from_config(cls, config: dict):
        """Rebuild from `get_config()`, a Keras 3 config, or a full Keras layer dict.

        Args:
            config: the config dict (a `{"class_name", "config", ...}` wrapper is unwrapped).

        Returns:
            A new, unbuilt layer.
        """
        config = dict(config)
        if "class_name" in config and isinstance(config.get("config"), dict):
            if config["class_name"] != "BatchNormalization":
                raise ValueError(
                    f"expected a BatchNormalization config, got class_name="
                    f"{config['class_name']!r}"
                )
            config = dict(config["config"])
        for key in _LEGACY_KEYS:
            value = config.pop(key, None)
            if key != "fused" and value is not None:
                raise NotImplementedError(
                    f"BatchNormalization: {key}={value!r} is not implemented in distbn"
                )
        return cls(**config)
