"""Layer classes by Keras class name: `get_layer_class`, `deserialize`, `serialize`."""

from __future__ import annotations

import difflib
import importlib

from distbn.layers.base import Layer

__all__ = ["get_layer_class", "deserialize", "serialize", "layer_names"]

# Keras class name -> module holding it. Imported lazily so a module that is missing or
# broken (BatchNormalization lives in another engineer's file) does not break the rest.
_MODULES = {
    "Dense": "distbn.layers.core",
    "Flatten": "distbn.layers.core",
    "Activation": "distbn.layers.core",
    "ReLU": "distbn.layers.core",
    "Dropout": "distbn.layers.core",
    "Conv2D": "distbn.layers.conv",
    "MaxPooling2D": "distbn.layers.pooling",
    "AveragePooling2D": "distbn.layers.pooling",
    "GlobalAveragePooling2D": "distbn.layers.pooling",
    "BatchNormalization": "distbn.layers.normalization",
    "LayerNormalization": "distbn.layers.group_layer_norm",
    "GroupNormalization": "distbn.layers.group_layer_norm",
    "Conv1D": "distbn.layers.conv",
    "GlobalAveragePooling1D": "distbn.layers.pooling",
    "Add": "distbn.layers.merge",
    "Concatenate": "distbn.layers.merge",
}
# Keras' own aliases (keras.layers.MaxPool2D etc.).
_ALIASES = {
    "Convolution2D": "Conv2D",
    "MaxPool2D": "MaxPooling2D",
    "AvgPool2D": "AveragePooling2D",
    "GlobalAvgPool2D": "GlobalAveragePooling2D",
    "Convolution1D": "Conv1D",
    "GlobalAvgPool1D": "GlobalAveragePooling1D",
}


def layer_names() -> list[str]:
    """Every registered Keras class name (aliases included)."""
    return sorted(list(_MODULES) + list(_ALIASES))


def get_layer_class(name: str) -> type[Layer]:
    """The layer class registered under a Keras class name.

    Args:
        name: e.g. "Conv2D", "BatchNormalization", "MaxPool2D".

    Returns:
        The class.

    Raises:
        ValueError: for an unknown name, quoting it with the closest known names.
    """
    if not isinstance(name, str) or name not in _MODULES and name not in _ALIASES:
        close = difflib.get_close_matches(str(name), layer_names(), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown layer type {name!r} (known: {', '.join(layer_names())}){hint}"
        )
    name = _ALIASES.get(name, name)
    return getattr(importlib.import_module(_MODULES[name]), name)


def deserialize(config: dict) -> Layer:
    """Build a layer from `{"type": "Conv2D", **kwargs}` or a Keras
    `{"class_name": "Conv2D", "config": {...}}` dict.

    Args:
        config: the dict (not modified).

    Returns:
        A new, unbuilt layer.

    Raises:
        ValueError: unknown type, missing type, or arguments the class rejects.
    """
    if not isinstance(config, dict):
        raise ValueError(f"a layer config must be a dict, got {config!r}")
    if "type" in config:
        kwargs = {k: v for k, v in config.items() if k != "type"}
        name = config["type"]
    elif "class_name" in config:
        kwargs = dict(config.get("config") or {})
        name = config["class_name"]
    else:
        raise ValueError(f"a layer config needs a 'type' key, got {config!r}")
    cls = get_layer_class(name)
    try:
        return cls.from_config(kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for layer type {name!r}: {err}") from err


def serialize(layer: Layer) -> dict:
    """`{"type": <class name>, **layer.get_config()}`, the inverse of `deserialize`."""
    return {"type": type(layer).__name__, **layer.get_config()}
