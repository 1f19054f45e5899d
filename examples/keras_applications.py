"""Data-parallel Keras 3 training of a keras.applications model over MPI, with synchronized BN.

    mpiexec -n 2 python -m mpi4py examples/keras_applications.py [--backend jax|torch]
        [--epochs 4] [--global-batch 64] [--local-bn]

MobileNetV2 (weights=None: nothing is downloaded) on distbn's embedded `patterns` data
(32x32 RGB, 10 classes). The lines a Keras user adds to a script are marked "# distbn".
Every rank trains on its part of each global batch; the printed test accuracy is over
the whole test split (each rank evaluates its part, the counts are summed).
"""

import argparse
import os
import sys


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("jax", "torch"), default=None,
                   help="Keras backend (default: $KERAS_BACKEND, else jax)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--train", type=int, default=4096, help="training samples")
    p.add_argument("--test", type=int, default=1000, help="test samples")
    p.add_argument("--local-bn", action="store_true",
                   help="replica-local statistics (plain Keras BN) instead of synchronized")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    os.environ.setdefault("KERAS_BACKEND", args.backend or "jax")
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import numpy as np

    import distbn
    import distbn.keras as dk  # distbn
    from distbn.train.data import make_patterns

    strategy = distbn.get_strategy()
    rank0 = strategy.replica_id == 0
    x_train, y_train, x_test, y_test = make_patterns(args.train, args.test, image_size=32)
    x_train, x_test = (x_train - 0.5) / 0.3, (x_test - 0.5) / 0.3

    keras.utils.set_random_seed(strategy.replica_id)  # ranks differ; the broadcast fixes it
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35,
                                           weights=None, classes=10,
                                           classifier_activation=None)
    model = dk.convert_sync_batchnorm(model, synchronized=not args.local_bn)  # distbn
    for layer in model.layers:  # MobileNetV2's momentum 0.999 is for long runs
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    optimizer = keras.optimizers.Adam(2e-3)
    model.compile(optimizer=dk.DistributedOptimizer(optimizer),  # distbn
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callbacks = [dk.callbacks.BroadcastGlobalVariablesCallback(0),  # distbn
                 dk.callbacks.MetricAverageCallback()]  # distbn
    rng = np.random.default_rng(0)  # the same permutation on every rank
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        x, y = dk.shard(x_train[order], y_train[order],  # distbn
                        global_batch_size=args.global_batch)
        model.fit(x, y, batch_size=dk.local_batch_size(args.global_batch),  # distbn
                  initial_epoch=epoch, epochs=epoch + 1, shuffle=False,
                  callbacks=callbacks, verbose=2 if rank0 else 0)

    xt, yt = dk.shard(x_test, y_test)  # distbn: this rank's part of the test split
    logits = model.predict(xt, batch_size=256, verbose=0)
    counts = np.array([np.sum(np.argmax(logits, axis=1) == yt), len(yt)], dtype=np.float64)
    strategy.all_reduce(counts)
    if rank0:
        mode = "replica-local" if args.local_bn else "synchronized"
        print(f"test accuracy {counts[0] / counts[1]:.4f} ({int(counts[1])} samples, "
              f"{strategy.num_replicas_in_sync} ranks, {mode} BN, "
              f"{keras.backend.backend()} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
