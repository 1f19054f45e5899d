"""distbn: Keras-faithful BatchNormalization with synchronized statistics over MPI."""

__version__ = "0.1.0"

__all__ = ["__version__"]
