"""distbn: Keras-faithful BatchNormalization with synchronized statistics over MPI."""

__version__ = "0.1.0"

from distbn import constraints, initializers, ops, regularizers  # noqa: E402
from distbn.distribute import (  # noqa: E402  (mpi4py is imported lazily)
    CollectiveMismatchError,
    LocalStrategy,
    MPIStrategy,
    Strategy,
    get_strategy,
)
from distbn.layers import BatchNormalization, Layer, Variable  # noqa: E402

__all__ = [
    "__version__", "BatchNormalization", "Layer", "Variable", "constraints",
    "initializers", "ops", "regularizers",
]
__all__ += ["Strategy", "LocalStrategy", "MPIStrategy", "get_strategy", "CollectiveMismatchError"]
