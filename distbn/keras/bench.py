"""Synchronized vs replica-local BatchNormalization in a Keras training step, at N ranks.

    mpiexec -n 2 python -m mpi4py -m distbn.keras.bench [--batch 32] [--samples 15]
        [--calls 3] [--json]        (backend: $KERAS_BACKEND, jax or torch)

The example's model (examples/keras_applications.py: MobileNetV2, alpha 0.35, 32x32x3,
10 classes, 52 BatchNormalization layers) is built twice from the same seed, once with
every BN synchronized and once replica-local, both compiled with DistributedOptimizer
(the gradient all-reduce is in both), and `train_on_batch` of each is timed in
alternating order, each sample after a barrier and taken on the slowest rank; the ratio
is formed per pair. `measure_sync` returns the records of `distbn bench keras`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Under `python -m` the package distbn.keras (and keras) is imported before this line
# runs, so set KERAS_BACKEND; this default serves `import distbn.keras.bench` first.
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from distbn.distribute import get_strategy  # noqa: E402
from distbn.keras.convert import convert_sync_batchnorm  # noqa: E402
from distbn.keras.optimizer import DistributedOptimizer  # noqa: E402

__all__ = ["example_model", "measure_sync", "main"]


def example_model(synchronized, image_size=32, seed=0):
    """The example's MobileNetV2 (weights=None) with distbn BN layers, compiled."""
    keras.utils.set_random_seed(seed)
    base = keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3),
                                          alpha=0.35, weights=None, classes=10,
                                          classifier_activation=None)
    model = convert_sync_batchnorm(base, synchronized=synchronized)
    model.compile(optimizer=DistributedOptimizer(keras.optimizers.SGD(0.01)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _slowest(strategy, seconds):
    buf = np.array([seconds], dtype=np.float64)
    return float(strategy.all_reduce(buf, op="max")[0])


def _time(strategy, model, x, y, calls):
    strategy.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        model.train_on_batch(x, y)
    return _slowest(strategy, (time.perf_counter() - start) / calls)


def measure_sync(batch=32, image_size=32, samples=15, calls=3, warmup=2, seed=0,
                 strategy=None):
    """Seconds per training step with synchronized and with replica-local BN (collective).

    Args:
        batch: per-rank batch size.
        image_size: input height and width.
        samples: timed pairs.
        calls: steps per sample.
        warmup: untimed samples of each (compilation included) before timing.
        seed: data and weights seed.
        strategy: default `distbn.get_strategy()`.

    Returns:
        Records (`name, metric, value, unit, world_size, params, spread, values`): the
        medians of each step time and of the per-pair ratio synchronized / replica-local,
        and the samples they summarise.
    """
    strategy = strategy if strategy is not None else get_strategy()
    rng = np.random.default_rng(seed + strategy.replica_id)
    x = rng.normal(size=(batch, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 10, batch)
    models = {"synchronized": example_model(True, image_size, seed),
              "local": example_model(False, image_size, seed)}
    for _ in range(warmup):
        for model in models.values():
            _time(strategy, model, x, y, 1)
    times = {k: [] for k in models}
    order = list(models)
    for i in range(samples):
        for k in (order if i % 2 == 0 else order[::-1]):
            times[k].append(_time(strategy, models[k], x, y, calls))
    ratios = [s / r for s, r in zip(times["synchronized"], times["local"], strict=True)]
    params = {"backend": keras.backend.backend(), "batch_per_rank": batch,
              "image_size": image_size, "model": "MobileNetV2(alpha=0.35)",
              "bn_layers": sum(isinstance(la, keras.layers.BatchNormalization)
                               for la in models["local"].layers),
              "samples": samples, "calls": calls}

    def record(metric, values, unit):
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        return {"name": "keras_train_step", "metric": metric,
                "value": statistics.median(values), "unit": unit,
                "world_size": strategy.num_replicas_in_sync, "params": params,
                "spread": {"min": min(values), "max": max(values), "q1": q[0], "q3": q[2]},
                "values": list(values)}

    return [record("synchronized_s", times["synchronized"], "s"),
            record("local_s", times["local"], "s"),
            record("sync_over_local", ratios, "ratio")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    args = p.parse_args(argv)
    records = measure_sync(args.batch, args.image_size, args.samples, args.calls)
    if get_strategy().replica_id == 0:
        if args.json:
            print(json.dumps(records, indent=1))
        else:
            r = {rec["metric"]: rec for rec in records}
            print(f"{r['local_s']['params']['backend']} backend, "
                  f"{r['local_s']['world_size']} ranks, batch {args.batch}/rank: "
                  f"synchronized {r['synchronized_s']['value'] * 1e3:.1f} ms, "
                  f"replica-local {r['local_s']['value'] * 1e3:.1f} ms, "
                  f"ratio {r['sync_over_local']['value']:.3f} "
                  f"(IQR {r['sync_over_local']['spread']['q1']:.3f}-"
                  f"{r['sync_over_local']['spread']['q3']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
