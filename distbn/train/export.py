"""`distbn export --keras`: a trained distbn model as a real Keras 3 model.

Every distbn layer is a Keras layer in arguments and weight order (the layers' contract),
so the export is each layer's config through Keras' own `from_config`, the same wiring
(a `keras.Sequential`, or the functional API for a `Model`), and `set_weights`. The
result is checked against distbn's predictions before it is saved.
"""

from __future__ import annotations

import os

import numpy as np

from distbn.layers import registry
from distbn.models import INPUT

__all__ = ["ExportError", "export_keras", "to_keras"]

# Keras refuses synchronized=True outside TensorFlow; a saved model predicts in inference
# mode, where synchronization does nothing.
_DISTBN_ONLY = {"BatchNormalization": {"synchronized": False}}


class ExportError(ValueError):
    """The model cannot be exported (no Keras, a layer Keras lacks, predictions differ)."""


def _keras():
    """Keras 3, on JAX unless KERAS_BACKEND says otherwise (Keras' own default is
    TensorFlow, which the `keras` extra does not install)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as exc:
        raise ExportError(f"exporting needs Keras 3 ({exc}): pip install keras jax, or "
                          "pip install -e \".[keras]\" in the distbn clone") from exc
    return keras


def to_keras(model, sample_shape):
    """A Keras model with `model`'s layers, wiring and weights.

    Args:
        model: a built distbn `Sequential` or `Model`.
        sample_shape: one input sample's shape (no batch axis).

    Returns:
        The `keras.Model`.
    """
    keras = _keras()
    made = {}
    for layer in model.layers:
        config = registry.serialize(layer)
        kind = config.pop("type")
        config.update(_DISTBN_ONLY.get(kind, {}))
        cls = getattr(keras.layers, kind, None)
        if cls is None:
            raise ExportError(f"layer {layer.name!r}: Keras has no layer {kind!r}")
        made[layer.name] = cls.from_config(config)
    inp = keras.Input(shape=tuple(sample_shape), dtype=model.layers[0].compute_dtype)
    tensors = {INPUT: inp}
    for i in model.order:
        layer = model.layers[i]
        args = [tensors[name] for name in model.sources(i)]
        tensors[layer.name] = made[layer.name](
            args if getattr(layer, "multi_input", False) else args[0])
    out = keras.Model(inp, tensors[model.layers[-1].name], name=model.name)
    for layer in model.layers:
        made[layer.name].set_weights(layer.get_weights())
    return out


def export_keras(model, sample_shape, path, samples=16, seed=0) -> dict:
    """Export `model` to a `.keras` file, after checking that Keras predicts what distbn
    predicts on random inputs (to float32 rounding).

    Returns:
        {"keras", "backend", "samples", "max_abs_diff"}.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ExportError(f"the Keras file must end in .keras, got {path!r}")
    kmodel = to_keras(model, sample_shape)
    keras = _keras()
    x = np.random.default_rng(seed).normal(size=(samples, *sample_shape))
    x = x.astype(model.layers[0].compute_dtype)
    ours = model.predict(x)
    theirs = keras.ops.convert_to_numpy(kmodel(x, training=False))
    diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ours)))) if ours.size else 1.0
    tol = 1e-4 if ours.dtype == np.float32 else 1e-9
    if not diff <= tol * scale:
        raise ExportError(f"the Keras model predicts differently (max |difference| {diff:.3g}"
                          f" > {tol * scale:.3g}); nothing was written")
    kmodel.save(path)
    return {"keras": keras.__version__, "backend": keras.backend.backend(),
            "samples": samples, "max_abs_diff": diff}
