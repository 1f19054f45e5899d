"""Layers: the Variable/Layer base and every layer distbn ships."""

from distbn.layers.base import Layer, Variable

__all__ = ["Layer", "Variable"]
