"""Keras callbacks for MPI data parallelism: identical start, averaged epoch logs."""

from __future__ import annotations

import keras
import numpy as np

from distbn.distribute import get_strategy
from distbn.keras import _collective

__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback",
           "broadcast_variables"]


def broadcast_variables(variables, root_rank=0, strategy=None):
    """Assign `root_rank`'s values to `variables` on every replica (collective).

    Packed into one buffer per dtype, one broadcast each; one replica: nothing.
    """
    strategy = strategy if strategy is not None else get_strategy()
    variables = list(variables)
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    values = [keras.ops.convert_to_numpy(v) for v in variables]
    for v, value in zip(variables, _collective.broadcast_arrays(values, strategy,
                                                                root=root_rank), strict=True):
        v.assign(value)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """At the start of `fit`, every replica takes the model and optimizer state of `root_rank`.

    The optimizer is built first if `fit` has not built it yet, so its slots exist on
    every rank before they are broadcast.
    """

    def __init__(self, root_rank=0, strategy=None):
        super().__init__()
        if not isinstance(root_rank, int) or root_rank < 0:
            raise ValueError(f"root_rank must be a non-negative int; received {root_rank!r}")
        self.root_rank = root_rank
        self._strategy = strategy

    def on_train_begin(self, logs=None):
        strategy = self._strategy if self._strategy is not None else get_strategy()
        if self.root_rank >= strategy.num_replicas_in_sync:
            raise ValueError(
                f"root_rank={self.root_rank} is not a replica; there are "
                f"{strategy.num_replicas_in_sync}"
            )
        model = self.model
        variables = list(model.variables)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            variables += list(optimizer.variables)
        broadcast_variables(variables, self.root_rank, strategy)


class MetricAverageCallback(keras.callbacks.Callback):
    """Epoch logs averaged over the replicas, weighted by each replica's sample count.

    Keras' loss tracker weights every batch by its size, so its count is the number of
    samples this rank saw; training entries use the training count, `val_` entries the
    validation count. One all-reduce per epoch end.
    """

    def __init__(self, strategy=None):
        super().__init__()
        self._strategy = strategy
        self._train_count = None
        self._val_count = None
        self._in_fit = False

    def _count(self):
        tracker = getattr(self.model, "_loss_tracker", None)
        if tracker is None:
            return 1.0
        return float(keras.ops.convert_to_numpy(tracker.count))

    def on_train_begin(self, logs=None):
        self._in_fit = True

    def on_train_end(self, logs=None):
        self._in_fit = False

    def on_epoch_begin(self, epoch, logs=None):
        self._train_count = self._val_count = None

    def on_test_begin(self, logs=None):
        # fit's validation: the tracker still holds the epoch's training count here.
        if self._in_fit and self._train_count is None:
            self._train_count = self._count()

    def on_test_end(self, logs=None):
        if self._in_fit:
            self._val_count = self._count()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        strategy = self._strategy if self._strategy is not None else get_strategy()
        if strategy.num_replicas_in_sync == 1:
            return
        train = self._train_count if self._train_count is not None else self._count()
        val = self._val_count if self._val_count is not None else 0.0
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0)
        weights = [val if k.startswith("val_") else train for k in keys]
        sums = [w * float(logs[k]) for k, w in zip(keys, weights, strict=True)]
        buf = np.array(sums + [train, val], dtype=np.float64)
        strategy.all_reduce(buf, name="metric_average")
        total_train, total_val = buf[-2], buf[-1]
        for i, k in enumerate(keys):
            total = total_val if k.startswith("val_") else total_train
            logs[k] = float(buf[i] / total) if total > 0 else float(logs[k])
