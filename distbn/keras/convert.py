"""`convert_sync_batchnorm`: a clone of a Keras model with every BatchNormalization synchronized."""

from __future__ import annotations

import keras

from distbn.keras.layers import BatchNormalization

__all__ = ["convert_sync_batchnorm"]


def convert_sync_batchnorm(model, synchronized=True):
    """A clone of `model` whose BatchNormalization layers are distbn's, weights copied.

    Args:
        model: a built Sequential or Functional Keras model (nested models included,
            e.g. one from `keras.applications` with `weights=None`).
        synchronized: the `synchronized` flag of the new layers (False gives distbn's
            layer with Keras' replica-local statistics).

    Returns:
        A new model; the argument is unchanged. Create it inside `strategy.scope()` to
        bind the layers to a strategy other than `distbn.get_strategy()`.
    """
    if not isinstance(model, (keras.Sequential, keras.Model)) or not _is_graph(model):
        raise TypeError(
            "convert_sync_batchnorm expects a Sequential or Functional keras model; "
            f"received {type(model).__name__} (for a subclassed model, build it with "
            "distbn.keras.layers.BatchNormalization directly)"
        )

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()
            config["synchronized"] = synchronized
            return BatchNormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    new.set_weights(model.get_weights())
    return new


def _is_graph(model):
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))
