"""`BatchNormalization`: Keras 3's layer whose `synchronized=True` works over MPI.

Only the statistics change (`_moments`, as Horovod's TF SyncBatchNormalization): with
`synchronized=True` and a sync group of more than one replica, a training call pools
count and shifted sums over the group with one collective (masked calls too), and the
backward through those statistics makes one more. Everything else (moving averages,
normalisation, renorm, serialization) is Keras' own code.
"""

from __future__ import annotations

import keras
from keras import ops

from distbn.distribute import get_strategy
from distbn.keras import _collective

__all__ = ["BatchNormalization"]


@keras.saving.register_keras_serializable(package="distbn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras 3 `BatchNormalization` with MPI-synchronized batch statistics.

    Arguments are exactly Keras'. With `synchronized=True` the layer takes its strategy
    from `distbn.get_strategy()` when it is constructed (so build it inside
    `strategy.scope()` for another one); statistics span the strategy's sync group.
    Keras computes masked statistics per replica on every backend; here they are
    synchronized as well. One replica, inference and `synchronized=False`: plain Keras,
    no collective.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, synchronized=False, **kwargs):
        # Keras refuses synchronized=True off TensorFlow in its __init__: it gets False
        # and this layer keeps the flag (get_config reports it).
        super().__init__(
            axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
            renorm=renorm, renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum, synchronized=False, **kwargs)
        if not isinstance(synchronized, bool):
            raise TypeError(
                f"Argument `synchronized` must be a bool. Received: synchronized={synchronized!r}"
            )
        self.synchronized = synchronized
        self._strategy = get_strategy() if synchronized else None

    @property
    def strategy(self):
        """The distbn strategy whose sync group pools the statistics (None: unsynchronized)."""
        return self._strategy

    def _moments(self, inputs, mask):
        strategy = self._strategy
        if strategy is None or strategy.sync_group_size == 1:
            if mask is None:  # Keras' unmasked path, without its TF-only `synchronized`
                return ops.moments(inputs, axes=self._reduction_axes)
            return super()._moments(inputs, mask)
        if mask is not None:  # Keras' broadcast: one axis less, along the last axis
            mask = ops.cast(ops.expand_dims(mask, axis=-1), "bool")
        shift = ops.cast(ops.convert_to_tensor(self.moving_mean), inputs.dtype)
        moving_var = ops.cast(ops.convert_to_tensor(self.moving_variance), inputs.dtype)
        return _collective.moments(inputs, mask, shift, moving_var, self._reduction_axes,
                                   self.epsilon, strategy, self.name)
