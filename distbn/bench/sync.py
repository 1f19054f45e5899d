"""Suite `sync`: what synchronized statistics cost over replica-local ones, per world size.

Each rank holds its own shard (the per-rank shape below) and runs a BatchNormalization
layer in training mode, replica-local (`synchronized=False`) and synchronized
(`with MPIStrategy(comm).scope(): BatchNormalization(synchronized=True)`), timed
alternately so that both see the same machine noise; a sample is the slowest rank's
time. Passes: `forward`, `backward` (dx and gamma/beta gradients of the last forward)
and `step` (forward + backward).

Records per pass: `local_time`, `sync_time`, `overhead` (median of the per-pair
differences sync - local, µs), `slowdown` (per-pair sync / local), and for world size
> 1 `allreduce_latency` (raw `Allreduce` of the pass's buffers: 3C float64 forward,
2C backward, both for a step, measured in the same run) and `overhead_allreduces`
= overhead / allreduce_latency: 1 means synchronization costs exactly its collectives,
more means extra work around them (packing, the Python calls), less means noise.
With one rank the synchronized layer makes no MPI call at all, so its overhead is ~0.
"""

from __future__ import annotations

import numpy as np

from distbn.bench.allreduce import latency
from distbn.bench.context import Context
from distbn.bench.results import make_record
from distbn.bench.timing import Stats

__all__ = ["NAME", "cases", "run"]

NAME = "sync"
_US = 1e6
PASSES = ("forward", "backward", "step")


def cases(mode: str) -> list[dict]:
    """Per-rank (shape, dtype, layout, axis) cases of a size profile."""
    cl, cf, fe = "channels_last", "channels_first", "features"
    full = [
        ((32, 16, 16, 64), "float32", cl, -1),
        ((32, 8, 8, 256), "float32", cl, -1),
        ((64, 32, 32, 64), "float32", cl, -1),
        ((64, 64, 32, 32), "float32", cf, 1),
        ((256, 1024), "float32", fe, -1),
        ((64, 4096), "float32", fe, -1),
    ]
    by_mode = {
        "full": full,
        "quick": [full[0], full[1], full[4]],
        "tiny": [((4, 4, 4, 8), "float32", cl, -1), ((8, 16), "float64", fe, -1)],
    }
    return [dict(shape=s, dtype=d, layout=lay, axis=a) for s, d, lay, a in by_mode[mode]]


def _fns(bn, x, dy):
    bn(x, training=True)  # build; leaves a cache for backward-only timing

    def forward():
        return bn(x, training=True)

    def backward():
        return bn.backward(dy)

    def step():
        bn(x, training=True)
        return bn.backward(dy)

    return {"forward": forward, "backward": backward, "step": step}


def run(ctx: Context) -> list[dict]:
    """Run the sync suite on every rank of `ctx.comm` (collective).

    Args:
        ctx: the run context; needs a communicator.

    Returns:
        The records on rank 0, [] elsewhere.
    """
    if ctx.comm is None:
        raise ValueError("the sync suite needs an MPI communicator, got comm=None")
    from distbn.distribute import MPIStrategy
    from distbn.layers import BatchNormalization

    n = ctx.size
    strategy = MPIStrategy(ctx.comm)
    raw = ctx.comm.Dup()
    repeats, warmup = ctx.pick(50, 30, 3), ctx.pick(3, 2, 1)
    # Samples of about a millisecond: stalls of the machine (several ms on a busy VM)
    # then hit a minority of samples, which the median ignores.
    target = ctx.pick(0.001, 0.001, 0.0005)
    records = []
    try:
        rng = np.random.default_rng(1000 + ctx.rank)  # each rank its own shard
        for case in cases(ctx.mode):
            x = rng.standard_normal(case["shape"]).astype(case["dtype"])
            dy = rng.standard_normal(case["shape"]).astype(case["dtype"])
            local = _fns(BatchNormalization(axis=case["axis"], dtype=case["dtype"]), x, dy)
            with strategy.scope():
                bn_sync = BatchNormalization(axis=case["axis"], dtype=case["dtype"],
                                             synchronized=True)
            synced = _fns(bn_sync, x, dy)
            c = x.shape[case["axis"]]
            params = {"shape": list(case["shape"]), "dtype": case["dtype"],
                      "layout": case["layout"], "axis": case["axis"], "channels": c}
            lat = {}
            if n > 1:
                for kind, k in (("forward", 3), ("backward", 2)):
                    lat[kind] = latency(ctx, raw, np.zeros(k * c), repeats, warmup)
            label = f"{tuple(case['shape'])} {case['dtype']}"
            for pas in PASSES:
                inner = ctx.calibrate_collective(synced[pas], target, max_inner=200)
                ts, tl, a, b = ctx.time_pair(synced[pas], local[pas], repeats, warmup, inner)
                over = Stats((a - b) * _US)
                name = f"sync.{pas}"
                records += [
                    make_record(name, "sync_time", ts.scaled(_US), "us", n, params, warmup),
                    make_record(name, "local_time", tl.scaled(_US), "us", n, params, warmup),
                    make_record(name, "overhead", over, "us", n, params, warmup),
                    make_record(name, "slowdown", Stats(a / b), "ratio", n, params, warmup),
                ]
                line = (f"sync {pas} {label}: sync {ts.median * _US:.1f} us, local "
                        f"{tl.median * _US:.1f} us, overhead {over.median:.1f} us")
                if lat:
                    kinds = ("forward", "backward") if pas == "step" else (pas,)
                    # Sum of per-sample latencies, sample by sample, keeps the spread honest.
                    ar = Stats(sum(lat[k].samples for k in kinds) * _US)
                    records += [
                        make_record(name, "allreduce_latency", ar, "us", n, params, warmup),
                        make_record(name, "overhead_allreduces",
                                    over.map(lambda o, m=ar.median: o / m), "ratio", n,
                                    params, warmup),
                    ]
                    line += f" = {over.median / ar.median:.1f}x allreduce ({ar.median:.1f} us)"
                ctx.progress(line)
    finally:
        raw.Free()
        strategy.close()
    return records if ctx.is_root else []
