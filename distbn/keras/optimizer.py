"""`DistributedOptimizer`: gradients averaged over the MPI replicas before every update."""

from __future__ import annotations

from distbn.distribute import get_strategy
from distbn.keras import _collective

__all__ = ["DistributedOptimizer"]

_CLASSES = {}  # optimizer class -> its distributed subclass


class _DistributedApply:
    """Mixin: `apply` all-reduces the gradients (bucketed), divides by the replicas."""

    def apply(self, grads, trainable_variables=None):
        grads = _collective.mean_gradients(
            grads, self._distbn_strategy, bucket_bytes=self._distbn_bucket_bytes)
        return super().apply(grads, trainable_variables)


def _distributed_class(cls):
    dist = _CLASSES.get(cls)
    if dist is None:
        # Same name and module as the wrapped class: a saved model's optimizer then loads
        # back as the plain one, and is wrapped again by the script that resumes.
        dist = type(cls.__name__, (_DistributedApply, cls),
                    {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _CLASSES[cls] = dist
    return dist


def DistributedOptimizer(optimizer, strategy=None,  # noqa: N802 (Horovod's name)
                         bucket_bytes=_collective.DEFAULT_BUCKET_BYTES):
    """A copy of `optimizer` whose updates use gradients averaged over every replica.

    Gradients are packed per dtype into flat buffers of at most `bucket_bytes`, summed
    with one all-reduce per bucket (inside `jit` on JAX, through an ordered host
    callback), divided by the number of replicas, then clipped and applied by the
    optimizer as usual. With per-rank losses averaged over equal local batches this is
    the gradient of the global batch's mean loss.

    Args:
        optimizer: an unbuilt Keras 3 optimizer instance (its config is copied).
        strategy: a distbn strategy; default `distbn.get_strategy()`.
        bucket_bytes: the largest bucket, in bytes.

    Returns:
        An instance of a subclass of `type(optimizer)`.
    """
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "DistributedOptimizer expects a keras.optimizers.Optimizer instance; "
            f"received {optimizer!r}"
        )
    if getattr(optimizer, "built", False):
        raise ValueError(
            "DistributedOptimizer needs an optimizer that has not been built yet (its "
            f"state would be lost in the copy); received built {optimizer.name!r}"
        )
    if int(bucket_bytes) <= 0:
        raise ValueError(f"bucket_bytes must be positive; received {bucket_bytes!r}")
    if isinstance(optimizer, _DistributedApply):
        return optimizer
    dist = _distributed_class(type(optimizer)).from_config(optimizer.get_config())
    dist._distbn_strategy = strategy if strategy is not None else get_strategy()
    dist._distbn_bucket_bytes = int(bucket_bytes)
    return dist
