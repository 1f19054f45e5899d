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
from distbn.layers import (  # noqa: E402
    Activation,
    Add,
    AveragePooling2D,
    BatchNormalization,
    Concatenate,
    Conv1D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling1D,
    GlobalAveragePooling2D,
    GroupNormalization,
    Layer,
    LayerNormalization,
    MaxPooling2D,
    ReLU,
    Variable,
)
from distbn.models import Model, Sequential  # noqa: E402


def __getattr__(name):
    # `distbn.load_model(run_dir)`: the trainer's, loaded on first use so that importing
    # distbn does not import the training stack.
    if name == "load_model":
        from distbn.train.inference import load_model

        return load_model
    if name == "recompute_bn_statistics":  # PreciseBN, distbn.train.precise_bn
        from distbn.train.precise_bn import recompute_bn_statistics

        return recompute_bn_statistics
    raise AttributeError(f"module 'distbn' has no attribute {name!r}")


__all__ = [
    "__version__",
    # layers and model
    "Layer", "Variable", "BatchNormalization", "Dense", "Conv2D", "MaxPooling2D",
    "AveragePooling2D", "GlobalAveragePooling2D", "Flatten", "ReLU", "Activation",
    "Dropout", "Sequential", "Model", "load_model", "recompute_bn_statistics",
    "LayerNormalization", "GroupNormalization", "Conv1D", "GlobalAveragePooling1D", "Add",
    "Concatenate",
    # strategies
    "Strategy", "LocalStrategy", "MPIStrategy", "get_strategy", "CollectiveMismatchError",
    # Keras-style helpers and kernels
    "constraints", "initializers", "regularizers", "ops",
]
