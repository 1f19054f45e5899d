"""Suite `allreduce`: latency and bandwidth of `MPI.Allreduce` at this run's world size.

Buffers: the synchronized BatchNormalization messages for C channels, float64 `3C`
elements forward ([S1, S2, n]) and `2C` backward ([Σdy, Σdy·x̂]); and gradient buckets
of 1 and 4 MiB (float32, the trainer's bucket size is 4 MiB). The call is what
`MPIStrategy` makes, `comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)` through mpi4py's
buffer API, on a private duplicate of the communicator.

Latency is the per-call time (slowest rank, a barrier before each sample of `inner`
back-to-back calls). Bandwidth (world size > 1) is the algorithm bandwidth,
message bytes / latency, in GB/s; `bus_bandwidth` scales it by 2(N-1)/N, the data each
rank must send and receive in a ring, so it is comparable across world sizes.
"""

from __future__ import annotations

import numpy as np

from distbn.bench.context import Context
from distbn.bench.results import make_record

__all__ = ["NAME", "bn_channels", "bucket_sizes", "latency", "run"]

NAME = "allreduce"
_US = 1e6


def bn_channels(mode: str) -> list[int]:
    """Channel counts C of the BN buffers measured in a size profile."""
    return {"full": [64, 128, 256, 512, 1024, 2048, 4096], "quick": [64, 512, 4096],
            "tiny": [8, 64]}[mode]


def bucket_sizes(mode: str) -> list[int]:
    """Gradient bucket sizes in bytes measured in a size profile."""
    mib = 2**20
    return {"full": [mib // 4, mib, 4 * mib, 16 * mib], "quick": [mib, 4 * mib],
            "tiny": [64 * 1024]}[mode]


def latency(ctx: Context, comm, buf: np.ndarray, repeats: int, warmup: int):
    """Per-call seconds of an in-place sum Allreduce of `buf` on `comm` (collective).

    Args:
        ctx: the run context (barriers, calibration).
        comm: the communicator to reduce over (every rank of ctx's).
        buf: the buffer, the same shape and dtype on every rank.
        repeats, warmup: timed and untimed samples.

    Returns:
        `Stats` in seconds.
    """
    from mpi4py import MPI

    def call():
        comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)

    # Short samples, many of them: a noisy machine's stalls then spoil a few samples
    # (which the median ignores) instead of a share of every sample.
    target = ctx.pick(0.001, 0.0005, 0.0002)
    inner = ctx.calibrate_collective(call, target, max_inner=ctx.pick(2000, 1000, 50))
    return ctx.time(call, repeats, warmup, inner)


def _cases(mode: str):
    """(record name, params, buffer) for every buffer of the profile."""
    out = []
    for c in bn_channels(mode):
        for kind, k in (("bn_forward", 3), ("bn_backward", 2)):
            buf = np.zeros(k * c, dtype=np.float64)
            out.append((f"allreduce.{kind}",
                        {"channels": c, "elements": buf.size, "dtype": "float64",
                         "bytes": buf.nbytes}, buf))
    for nbytes in bucket_sizes(mode):
        buf = np.zeros(nbytes // 4, dtype=np.float32)
        out.append(("allreduce.bucket",
                    {"elements": buf.size, "dtype": "float32", "bytes": buf.nbytes}, buf))
    return out


def run(ctx: Context) -> list[dict]:
    """Run the allreduce suite on every rank of `ctx.comm` (collective).

    Args:
        ctx: the run context; needs a communicator (a one-rank one measures the call's
            own overhead).

    Returns:
        The records on rank 0, [] elsewhere.
    """
    if ctx.comm is None:
        raise ValueError("the allreduce suite needs an MPI communicator, got comm=None")
    n = ctx.size
    comm = ctx.comm.Dup()  # private: nothing else's messages mix with the timed ones
    records = []
    repeats, warmup = ctx.pick(100, 50, 5), ctx.pick(5, 3, 1)
    try:
        for name, params, buf in _cases(ctx.mode):
            t = latency(ctx, comm, buf, repeats, warmup)
            records.append(make_record(name, "latency", t.scaled(_US), "us", n, params, warmup))
            line = f"{name} {params['bytes']} B: {t.median * _US:.2f} us"
            if n > 1:
                bw = t.map(lambda s, b=buf.nbytes: b / s / 1e9)
                bus = bw.map(lambda g: g * 2 * (n - 1) / n)
                records += [make_record(name, "bandwidth", bw, "GB/s", n, params, warmup),
                            make_record(name, "bus_bandwidth", bus, "GB/s", n, params, warmup)]
                line += f", {bw.median:.3f} GB/s"
            ctx.progress(line)
    finally:
        comm.Free()
    return records if ctx.is_root else []
