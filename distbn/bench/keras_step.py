"""Suite `keras` (opt-in): a Keras 3 training step with synchronized vs replica-local BN.

At N >= 2 ranks: the example model (examples/keras_applications.py's MobileNetV2, every
BatchNormalization from `distbn.keras`) trained with `train_on_batch` once with
synchronized and once with replica-local statistics, both with DistributedOptimizer,
alternating, the slowest rank's time per sample (`distbn.keras.bench.measure_sync`).
The backend is this process's `KERAS_BACKEND` (jax unless set: Keras picks one backend
per process), so `KERAS_BACKEND=torch distbn bench --ranks 2 keras` measures the other.
One rank has nothing to compare (one replica never communicates) and records nothing;
nor does a machine without keras. Not in the default suites: building and compiling the
model twice takes about a minute per world size.
"""

from __future__ import annotations

import importlib.util
import os

from distbn.bench.context import Context
from distbn.bench.results import make_record
from distbn.bench.timing import Stats

__all__ = ["NAME", "run"]

NAME = "keras"


def run(ctx: Context) -> list[dict]:
    """The suite's records (rank 0; collective at several ranks)."""
    if importlib.util.find_spec("keras") is None:
        ctx.progress("keras: skipped, keras is not installed (pip install -e \".[keras]\")")
        return []
    if ctx.size == 1:
        ctx.progress("keras: skipped at 1 rank (one replica: synchronized BN is local BN); "
                     "run it at 2 or more, e.g. --ranks 2")
        return []
    # Before keras is first imported in this process (Keras' own default, TensorFlow,
    # is not a backend distbn.keras runs on), as distbn.train.export does.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from distbn.keras import bench

    raw = bench.measure_sync(batch=ctx.pick(32, 16, 2), samples=ctx.pick(15, 5, 2),
                             calls=ctx.pick(3, 2, 1), warmup=ctx.pick(2, 1, 1))
    records = [make_record(f"keras.{rec['name']}", rec["metric"], Stats(rec["values"]),
                           rec["unit"], rec["world_size"], rec["params"]) for rec in raw]
    ratio = next(r for r in records if r["metric"] == "sync_over_local")
    ctx.progress(f"keras ({ratio['params']['backend']}): synchronized / replica-local "
                 f"step {ratio['value']:.2f}")
    return records if ctx.is_root else []
