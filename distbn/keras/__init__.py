"""distbn for Keras 3 (JAX and PyTorch backends): synchronized BatchNormalization and
MPI data parallelism in Horovod's vocabulary.

    import distbn.keras as dk
    model = dk.convert_sync_batchnorm(model)          # every BN synchronized
    model.compile(optimizer=dk.DistributedOptimizer(keras.optimizers.SGD(0.1)), ...)
    x, y = dk.shard(x, y, global_batch_size=256)     # this rank's part of each batch
    model.fit(x, y, batch_size=dk.local_batch_size(256), shuffle=False,
              callbacks=[dk.callbacks.BroadcastGlobalVariablesCallback(0),
                         dk.callbacks.MetricAverageCallback()])

Keras is imported when this package is; distbn itself never imports it.
"""

try:
    import keras as _keras
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "distbn.keras needs Keras 3 and a backend (JAX or PyTorch): "
        'pip install -e ".[keras]"  (the PyTorch backend also needs ".[torch]")'
    ) from exc

if int(_keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(
        f"distbn.keras needs Keras 3; found keras {_keras.__version__}: "
        'pip install -e ".[keras]"'
    )

from distbn.keras import callbacks, layers  # noqa: E402
from distbn.keras.callbacks import broadcast_variables  # noqa: E402
from distbn.keras.convert import convert_sync_batchnorm  # noqa: E402
from distbn.keras.data import local_batch_size, shard  # noqa: E402
from distbn.keras.optimizer import DistributedOptimizer  # noqa: E402

__all__ = [
    "DistributedOptimizer",
    "broadcast_variables",
    "callbacks",
    "convert_sync_batchnorm",
    "layers",
    "local_batch_size",
    "shard",
]
