"""Layers: the Variable/Layer base and every layer distbn ships."""

from distbn.layers.base import Layer, Variable
from distbn.layers.conv import Conv1D, Conv2D
from distbn.layers.core import Activation, Dense, Dropout, Flatten, ReLU
from distbn.layers.group_layer_norm import GroupNormalization, LayerNormalization
from distbn.layers.merge import Add, Concatenate
from distbn.layers.normalization import BatchNormalization
from distbn.layers.pooling import (
    AveragePooling2D,
    GlobalAveragePooling1D,
    GlobalAveragePooling2D,
    MaxPooling2D,
)
from distbn.layers.registry import deserialize, get_layer_class, serialize

__all__ = ["Layer", "Variable", "BatchNormalization"]
__all__ += ["Dense", "Flatten", "Activation", "ReLU", "Dropout", "Conv2D", "MaxPooling2D",
            "AveragePooling2D", "GlobalAveragePooling2D", "deserialize", "get_layer_class",
            "serialize"]
__all__ += ["LayerNormalization", "GroupNormalization", "Conv1D", "GlobalAveragePooling1D",
            "Add", "Concatenate"]
