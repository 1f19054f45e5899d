"""Suite `torch`: distbn.torch.SyncBatchNorm against PyTorch's own BatchNorm2d.

At one rank: forward+backward of `distbn.torch.SyncBatchNorm` (one replica: the fused
kernels) over `torch.nn.BatchNorm2d` in the same process, contiguous and channels_last,
paired samples (`distbn.torch.bench.measure`). At N ranks: synchronized over every rank
vs replica-local (`sync_group=1`), the slowest rank's time per sample
(`distbn.torch.bench.measure_sync`), and a DDP training step of the example ResNet with
distbn's synchronized BN vs PyTorch's replica-local BN (`measure_resnet_step`, from a
checkout; the full profile also times distbn's BN replica-local and the model without
BN, which split the ratio). Without torch the suite records nothing and says so.
"""

from __future__ import annotations

import importlib.util

from distbn.bench.context import Context
from distbn.bench.results import make_record
from distbn.bench.timing import Stats

__all__ = ["NAME", "run"]

NAME = "torch"


def run(ctx: Context) -> list[dict]:
    """The suite's records (rank 0; collective at several ranks)."""
    if importlib.util.find_spec("torch") is None:
        ctx.progress("torch: skipped, torch is not installed (pip install -e \".[torch]\")")
        return []
    from distbn.torch import bench

    shape = ctx.pick((64, 64, 32, 32), (32, 64, 16, 16), (4, 8, 4, 4))
    samples = ctx.pick(15, 7, 3)
    if ctx.size == 1:
        raw = bench.measure(shape=shape, samples=samples, calls=ctx.pick(3, 2, 1))
    else:
        raw = bench.measure_sync(shape=shape, samples=samples, calls=ctx.pick(3, 2, 1),
                                 comm=ctx.comm)
        raw += bench.measure_resnet_step(global_batch=ctx.pick(64, 32, 4 * ctx.size),
                                         samples=samples, steps=ctx.pick(4, 2, 1),
                                         warmup=ctx.pick(3, 2, 1), comm=ctx.comm,
                                         breakdown=ctx.pick(True, False, False))
    records = []
    for rec in raw:
        params = dict(rec["params"])
        ratios = params.pop("ratios")
        records.append(make_record(f"torch.{rec['name']}", rec["metric"], Stats(ratios),
                                   "ratio", rec["world_size"], params))
    return records if ctx.is_root else []
