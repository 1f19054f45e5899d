"""Backend-neutral helpers for the Keras adapter tests (serial and MPI)."""

import keras
import numpy as np


def to_numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


class TrainCall:
    """One training call of a BN layer and its gradients through the backend's autodiff.

    `__call__(x, dy, mask)` runs the layer with training=True (updating its moving
    statistics as `fit` would) and returns (y, dx, [grads of trainable weights]) for the
    loss sum(y * dy). JAX: jit-compiled `stateless_call` under `jax.grad`; torch: eager
    autograd.
    """

    def __init__(self, layer, jit=True):
        self.layer = layer
        self.backend = keras.backend.backend()
        self.jit = jit
        self._fn = None

    def __call__(self, x, dy, mask=None):
        if self.backend == "jax":
            return self._jax(x, dy, mask)
        return self._torch(x, dy, mask)

    def _jax(self, x, dy, mask):
        import jax

        layer = self.layer
        if self._fn is None:
            def loss(xx, tv, ntv, dyy, m):
                y, new_ntv = layer.stateless_call(tv, ntv, xx, training=True, mask=m)
                return (y * dyy).sum(), (y, new_ntv)

            fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
            self._fn = jax.jit(fn) if self.jit else fn
        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]
        (dx, dtv), (y, new_ntv) = self._fn(x, tv, ntv, dy, mask)
        for v, val in zip(layer.non_trainable_variables, new_ntv, strict=True):
            v.assign(val)
        return to_numpy(y), to_numpy(dx), [to_numpy(g) for g in dtv]

    def _torch(self, x, dy, mask):
        import torch

        layer = self.layer
        for v in layer.trainable_variables:
            v.value.grad = None
        xt = torch.tensor(np.asarray(x), requires_grad=True)
        m = None if mask is None else torch.tensor(np.asarray(mask))
        y = layer(xt, training=True, mask=m)
        (y * torch.tensor(np.asarray(dy))).sum().backward()
        return (to_numpy(y.detach()), xt.grad.numpy(),
                [v.value.grad.detach().numpy().copy() for v in layer.trainable_variables])


def layer_pair(sync_layer_factory, weights, shape, **kwargs):
    """A distbn layer (made by the factory) and a plain keras one, same weights, built."""
    import distbn.keras as dk

    a = sync_layer_factory(lambda: dk.layers.BatchNormalization(synchronized=True, **kwargs))
    b = keras.layers.BatchNormalization(**kwargs)
    for layer in (a, b):
        layer.build(shape)
        layer.set_weights(weights)
    return a, b


def bn_weights(rng, channels):
    return [rng.normal(1.0, 0.3, channels).astype("float32"),
            rng.normal(0.0, 0.3, channels).astype("float32"),
            rng.normal(0.5, 0.1, channels).astype("float32"),
            rng.uniform(0.5, 2.0, channels).astype("float32")]
