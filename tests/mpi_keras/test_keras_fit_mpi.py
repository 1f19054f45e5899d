"""Data-parallel `model.fit` at N ranks equals one process fitting the global batches.

A small CNN with two BatchNormalization layers: every rank starts from its own random
weights (BroadcastGlobalVariablesCallback must make them rank 0's), trains on its part
of each global batch with synchronized BN and DistributedOptimizer, and must end with
the weights, moving statistics and epoch logs (MetricAverageCallback) of one plain
Keras process fitting the whole batches from rank 0's initial weights.
"""

import keras
import numpy as np
import pytest

import distbn
import distbn.keras as dk

GLOBAL_BATCH = 6  # a multiple of 2 and of 3 ranks
EPOCHS = 2


def small_cnn(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(momentum=0.8),
        keras.layers.ReLU(),
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(momentum=0.8),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


def compile_(model, optimizer):
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.mark.mpi(min_size=2)
def test_fit_equals_one_process_on_global_batches(comm):
    strategy = distbn.MPIStrategy(comm)
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.5, (4 * GLOBAL_BATCH, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, len(x))
    xv = rng.normal(0.5, 1.5, (7, 6, 6, 2)).astype("float32")
    yv = rng.integers(0, 3, len(xv))

    with strategy.scope():
        model = dk.convert_sync_batchnorm(small_cnn(seed=100 + comm.rank))
        compile_(model, dk.DistributedOptimizer(keras.optimizers.SGD(0.05, momentum=0.9)))
        xs, ys = dk.shard(x, y, global_batch_size=GLOBAL_BATCH)
        differs = comm.allgather(model.get_weights()[0].tobytes())
        initial = comm.bcast(model.get_weights(), root=0)
        history = model.fit(
            xs, ys, batch_size=dk.local_batch_size(GLOBAL_BATCH), epochs=EPOCHS,
            shuffle=False, validation_data=dk.shard(xv, yv), verbose=0,
            callbacks=[dk.callbacks.BroadcastGlobalVariablesCallback(0),
                       dk.callbacks.MetricAverageCallback()])
    got = model.get_weights()
    everyone = comm.allgather([w.tobytes() for w in got])
    strategy.close()

    reference = small_cnn(seed=0)
    reference.set_weights(initial)
    compile_(reference, keras.optimizers.SGD(0.05, momentum=0.9))
    ref_history = reference.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False,
                                validation_data=(xv, yv), verbose=0)

    assert len(set(differs)) > 1  # the broadcast had something to do
    assert all(e == everyone[0] for e in everyone)  # replicas identical
    for g, w in zip(got, reference.get_weights(), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(history.history[key], ref_history.history[key],
                                   rtol=1e-5)
