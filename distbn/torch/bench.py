"""Speed of distbn's SyncBatchNorm: against torch.nn.BatchNorm2d, and its sync overhead.

    python -m distbn.torch.bench [--shape 64,64,32,32] [--dtype float32] [--threads 1]
                                 [--samples 15] [--json]
    mpiexec -n 2 python -m mpi4py -m distbn.torch.bench [same options] [--resnet-steps 8]
                                 [--resnet-breakdown]

One process: each sample times forward+backward (`y = bn(x); y.backward(dy)`) of
distbn's module (one replica) and PyTorch's, one after the other in alternating order,
so the ratio is taken per pair on a noisy machine (`measure`). Under mpiexec with
several ranks: the same module synchronized over every rank against it replica-local
(`sync_group=1`), at the same per-rank shape, each sample started after a barrier and
timed on the slowest rank (`measure_sync`); and a DDP training step of the example
ResNet (`examples/torch_resnet.py`, from a checkout) with distbn's synchronized BN
against the same model with PyTorch's replica-local BN, the two models stepped in
alternating order per sample (`measure_resnet_step`). The report gives medians; the
functions return records for `distbn bench`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from distbn.distribute import LocalStrategy
from distbn.torch._import import require_torch

torch = require_torch()

__all__ = ["measure", "measure_sync", "measure_resnet_step", "resnet_example", "main"]

_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _fwd_bwd(module, x, dy, calls):
    """Seconds per forward+backward of `module` on `x`, averaged over `calls`."""
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        module(x).backward(dy)
    return (time.perf_counter() - start) / calls


def _set_threads(threads):
    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # the numpy kernels: numpy's own threads
        pass


def measure(shape=(64, 64, 32, 32), dtype="float32", threads=1, samples=15, calls=3,
            warmup=3, layouts=("contiguous", "channels_last"), seed=0):
    """Time distbn.torch.SyncBatchNorm (one replica) and torch.nn.BatchNorm2d.

    Args:
        shape: the (N, C, H, W) input shape.
        dtype: "float32" or "float64".
        threads: torch and numba threads for the measurement (restored afterwards).
        samples: timed pairs per layout.
        calls: forward+backward calls per sample.
        warmup: untimed calls of each module first (compilation, allocator).
        layouts: any of "contiguous", "channels_last".
        seed: of the random input and output gradient.

    Returns:
        A list of records, one per layout: name, metric, value (median ratio
        distbn / torch), unit, world_size, params (shape, dtype, layout, threads, both
        medians in ms, quartiles of the ratio).
    """
    from distbn.torch.batchnorm import SyncBatchNorm

    old_threads = torch.get_num_threads()
    _set_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    records = []
    try:
        for layout in layouts:
            fmt = _LAYOUTS[layout]
            x = torch.randn(*shape, generator=gen, dtype=tdtype).to(memory_format=fmt)
            dy = torch.randn(*shape, generator=gen, dtype=tdtype).to(memory_format=fmt)
            x.requires_grad_(True)
            ours = SyncBatchNorm(shape[1], dtype=tdtype, strategy=LocalStrategy())
            theirs = torch.nn.BatchNorm2d(shape[1], dtype=tdtype)
            for m in (ours, theirs):
                _fwd_bwd(m, x, dy, warmup)
            t_ours, t_theirs, ratios = [], [], []
            for i in range(samples):
                pair = (ours, theirs) if i % 2 == 0 else (theirs, ours)
                times = {id(m): _fwd_bwd(m, x, dy, calls) for m in pair}
                t_ours.append(times[id(ours)])
                t_theirs.append(times[id(theirs)])
                ratios.append(t_ours[-1] / t_theirs[-1])
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            records.append({
                "name": "torch_bn_fwd_bwd", "metric": "time_ratio_vs_torch",
                "value": statistics.median(ratios), "unit": "ratio", "world_size": 1,
                "params": {"shape": list(shape), "dtype": dtype, "layout": layout,
                           "threads": threads, "samples": samples, "calls": calls,
                           "distbn_ms": 1e3 * statistics.median(t_ours),
                           "torch_ms": 1e3 * statistics.median(t_theirs),
                           "ratio_q1": q[0], "ratio_q3": q[2], "ratios": ratios},
            })
    finally:
        _set_threads(old_threads)
    return records


def measure_sync(shape=(64, 64, 32, 32), dtype="float32", threads=1, samples=15, calls=3,
                 warmup=3, layouts=("contiguous", "channels_last"), seed=0, comm=None):
    """Time SyncBatchNorm synchronized over every rank vs replica-local (collective).

    Args:
        shape: the per-rank (N, C, H, W) input shape.
        dtype, threads, samples, calls, warmup, layouts, seed: as `measure`.
        comm: the mpi4py communicator (default COMM_WORLD).

    Returns:
        Records (the same on every rank), one per layout: value = median ratio of the
        synchronized to the replica-local time, both the slowest rank's per sample.
    """
    from mpi4py import MPI

    from distbn.distribute import MPIStrategy
    from distbn.torch.batchnorm import SyncBatchNorm

    comm = MPI.COMM_WORLD if comm is None else comm
    synced, local = MPIStrategy(comm), MPIStrategy(comm, sync_group=1)
    old_threads = torch.get_num_threads()
    _set_threads(threads)
    gen = torch.Generator().manual_seed(seed + comm.rank)
    tdtype = getattr(torch, dtype)
    records = []
    try:
        for layout in layouts:
            fmt = _LAYOUTS[layout]
            x = torch.randn(*shape, generator=gen, dtype=tdtype).to(memory_format=fmt)
            dy = torch.randn(*shape, generator=gen, dtype=tdtype).to(memory_format=fmt)
            x.requires_grad_(True)
            mods = {name: SyncBatchNorm(shape[1], dtype=tdtype, strategy=st)
                    for name, st in (("sync", synced), ("local", local))}
            for m in mods.values():
                _fwd_bwd(m, x, dy, warmup)
            times = {"sync": [], "local": []}
            for i in range(samples):
                order = ("sync", "local") if i % 2 == 0 else ("local", "sync")
                for name in order:
                    comm.Barrier()
                    t = _fwd_bwd(mods[name], x, dy, calls)
                    times[name].append(comm.allreduce(t, op=MPI.MAX))
            ratios = [a / b for a, b in zip(times["sync"], times["local"], strict=True)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            records.append({
                "name": "torch_sync_bn_fwd_bwd", "metric": "time_ratio_vs_local",
                "value": statistics.median(ratios), "unit": "ratio",
                "world_size": comm.size,
                "params": {"shape": list(shape), "dtype": dtype, "layout": layout,
                           "threads": threads, "samples": samples, "calls": calls,
                           "sync_ms": 1e3 * statistics.median(times["sync"]),
                           "local_ms": 1e3 * statistics.median(times["local"]),
                           "ratio_q1": q[0], "ratio_q3": q[2], "ratios": ratios},
            })
    finally:
        _set_threads(old_threads)
        synced.close()
        local.close()
    return records


def resnet_example():
    """The module `examples/torch_resnet.py` of this checkout, or None (an installed wheel).

    The bench times the example's own model rather than a copy of it.
    """
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "torch_resnet.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("distbn_example_torch_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_resnet_step(global_batch=64, threads=1, samples=9, steps=4, warmup=3, seed=0,
                        comm=None, breakdown=False):
    """Time a DDP training step of the example ResNet, synchronized BN vs PyTorch's local BN.

    Both models start from the same weights, are channels_last (as the example trains)
    and wrapped in DistributedDataParallel over the process group from
    `distbn.torch.init_process_group` (started here if none is). Each sample times
    `steps` SGD steps (forward, loss, backward with DDP's gradient all-reduce,
    optimizer step) of one model after a barrier, the slowest rank's time; the models
    alternate which goes first. Collective over `comm`; one rank works too (DDP over a
    single process; "synchronized" is then distbn's module with one replica).

    With `breakdown`, two more models share the alternation and split the ratio:
    distbn's module replica-local (`sync_group=1`: the module's cost without the
    collectives) and the ResNet without BatchNorm (every BatchNorm2d an Identity: what
    the BN layers cost at all); and the synchronized model's BN all-reduces are timed
    (`_TimedCollectives`): the time a rank spends in them, waiting for the others
    included.

    Args:
        global_batch: samples per step over all ranks (each rank its contiguous shard).
        threads: torch and numba threads per rank.
        samples: timed pairs.
        steps: training steps per sample.
        warmup: untimed steps of each model first.
        seed: of the weights and the data.
        comm: the mpi4py communicator (default COMM_WORLD).
        breakdown: also time the two models above; their medians (`distbn_local_ms`,
            `no_bn_ms`) and ratios to PyTorch's local BN (`distbn_local_ratio`,
            `no_bn_ratio`) join the record's params, with `sync_collectives_ms`: the
            median per step of the time spent inside the synchronized model's BN
            all-reduces, averaged over the ranks.

    Returns:
        One record (the same on every rank): value = median ratio of the synchronized
        to the replica-local step time; [] when the example is not in this checkout.
    """
    from mpi4py import MPI

    from distbn.distribute import MPIStrategy
    from distbn.torch.convert import convert_sync_batchnorm
    from distbn.torch.process_group import init_process_group

    example = resnet_example()
    if example is None:
        return []
    comm = MPI.COMM_WORLD if comm is None else comm
    strategy = MPIStrategy(comm)
    local_strategy = MPIStrategy(comm, sync_group=1) if breakdown else None
    timed = _TimedCollectives(strategy) if breakdown else None
    in_collectives = []  # per sample: seconds a step in the BN all-reduces, rank mean
    names = ("sync", "local") + (("distbn_local", "no_bn") if breakdown else ())
    dist = torch.distributed
    started = not dist.is_initialized()
    if started:
        init_process_group(strategy=strategy)
    old_threads = torch.get_num_threads()
    _set_threads(threads)
    try:
        # Random images of the example's shape (16x16 RGB, 10 classes; the time does not
        # depend on the values): NHWC memory seen as NCHW, channels_last as it trains.
        gen = torch.Generator().manual_seed(seed)
        rows = example.shard(global_batch, comm.rank, comm.size)
        batches = [(torch.randn(global_batch, 16, 16, 3, generator=gen)[rows]
                    .permute(0, 3, 1, 2),
                    torch.randint(0, 10, (global_batch,), generator=gen)[rows])
                   for _ in range(4)]
        runs = {}
        for name in names:
            torch.manual_seed(seed)
            model = example.ResNet()
            if name == "sync":
                model = convert_sync_batchnorm(model, strategy=timed or strategy)
            elif name == "distbn_local":
                model = convert_sync_batchnorm(model, strategy=local_strategy)
            elif name == "no_bn":
                model = _without_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model.to(memory_format=torch.channels_last))
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            runs[name] = (model, opt)
        scale = comm.size / global_batch
        step_count = [0]

        def train(name, n):
            model, opt = runs[name]
            for _ in range(n):
                x, y = batches[step_count[0] % len(batches)]
                step_count[0] += 1
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
                (loss * scale).backward()
                opt.step()

        for name in runs:
            train(name, warmup)
        times = {name: [] for name in names}
        for i in range(samples):
            for name in (names if i % 2 == 0 else names[::-1]):
                comm.Barrier()
                if timed is not None:
                    timed.seconds = 0.0
                start = time.perf_counter()
                train(name, steps)
                t = (time.perf_counter() - start) / steps
                times[name].append(comm.allreduce(t, op=MPI.MAX))
                if timed is not None and name == "sync":
                    in_collectives.append(comm.allreduce(timed.seconds / steps) / comm.size)
    finally:
        _set_threads(old_threads)
        if started:
            dist.destroy_process_group()
        strategy.close()
        if local_strategy is not None:
            local_strategy.close()
    ratios = [a / b for a, b in zip(times["sync"], times["local"], strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    extra = {}
    if in_collectives:
        extra["sync_collectives_ms"] = 1e3 * statistics.median(in_collectives)
    for name in names[2:]:
        extra[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        extra[f"{name}_ratio"] = statistics.median(
            a / b for a, b in zip(times[name], times["local"], strict=True))
    return [{
        "name": "torch_resnet_step", "metric": "time_ratio_vs_local",
        "value": statistics.median(ratios), "unit": "ratio", "world_size": comm.size,
        "params": {"model": "examples/torch_resnet.py ResNet", "layout": "channels_last",
                   "global_batch": global_batch, "threads": threads, "samples": samples,
                   "steps": steps, "sync_ms": 1e3 * statistics.median(times["sync"]),
                   "local_ms": 1e3 * statistics.median(times["local"]),
                   "ratio_q1": q[0], "ratio_q3": q[2], **extra, "ratios": ratios},
    }]


class _TimedCollectives:
    """A strategy whose sync-group all-reduces are timed (`seconds`); the rest is the
    wrapped strategy's. The time includes waiting for the slowest rank to arrive."""

    def __init__(self, strategy):
        self._strategy = strategy
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._strategy, name)

    def sync_all_reduce(self, buf, name=None):
        start = time.perf_counter()
        try:
            return self._strategy.sync_all_reduce(buf, name=name)
        finally:
            self.seconds += time.perf_counter() - start


def _without_batchnorm(model):
    """`model` with every BatchNorm2d replaced by an Identity (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())
    return model


def main(argv=None) -> int:
    """`python -m distbn.torch.bench`: print the ratio per layout (or JSON records)."""
    p = argparse.ArgumentParser(prog="python -m distbn.torch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,64,32,32", help="N,C,H,W (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=15)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--resnet-steps", type=int, default=4,
                   help="under mpiexec: training steps of the example ResNet per sample "
                        "(0: skip it; default %(default)s)")
    p.add_argument("--global-batch", type=int, default=64,
                   help="the ResNet step's global batch (default %(default)s)")
    p.add_argument("--resnet-breakdown", action="store_true",
                   help="also time the ResNet with distbn's BN replica-local and without "
                        "BN (at one rank too: DDP over one process)")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--shape must be four positive ints N,C,H,W, got {args.shape!r}")
    if args.global_batch < 1:
        p.error(f"--global-batch must be a positive int, got {args.global_batch!r}")
    from distbn.memory import malloc_setting, retain_freed_memory

    # As distbn's other commands: freed arrays stay mapped (no page faults per call),
    # for both modules alike; DISTBN_MALLOC=default keeps glibc's behaviour.
    retain_freed_memory()
    from distbn.distribute import launched_world_size

    world = launched_world_size()
    if world > 1:
        records = measure_sync(shape, args.dtype, args.threads, args.samples, args.calls)
    else:
        records = measure(shape, args.dtype, args.threads, args.samples, args.calls)
    if args.resnet_steps > 0 and (world > 1 or args.resnet_breakdown):
        records += measure_resnet_step(args.global_batch, args.threads, args.samples,
                                       args.resnet_steps, breakdown=args.resnet_breakdown)
    for r in records:
        r["params"]["malloc"] = malloc_setting()
    rank0 = world <= 1 or _rank() == 0
    if args.json:
        if rank0:
            json.dump(records, sys.stdout, indent=2)
            print()
        return 0
    from distbn.ops import backend_name

    if not rank0:
        return 0
    print(f"forward+backward, {world} rank(s), {args.threads} thread(s) each, shape {shape} "
          f"{args.dtype}, kernels: {backend_name()}, malloc: {malloc_setting()}, "
          f"torch {torch.__version__}")
    for r in records:
        pr = r["params"]
        if r["name"] == "torch_resnet_step":
            print(f"  ResNet step (global batch {pr['global_batch']}, DDP): synchronized BN "
                  f"{pr['sync_ms']:7.2f} ms   PyTorch's local BN {pr['local_ms']:7.2f} ms   "
                  f"ratio {r['value']:.3f} (quartiles {pr['ratio_q1']:.3f}-"
                  f"{pr['ratio_q3']:.3f})")
            if "no_bn_ms" in pr:
                print(f"    distbn's BN replica-local {pr['distbn_local_ms']:7.2f} ms (ratio "
                      f"{pr['distbn_local_ratio']:.3f})   no BN {pr['no_bn_ms']:7.2f} ms "
                      f"(ratio {pr['no_bn_ratio']:.3f})")
                if "sync_collectives_ms" in pr:
                    print(f"    in the synchronized BN all-reduces (waits included, rank "
                          f"mean) {pr['sync_collectives_ms']:7.2f} ms a step")
        elif world > 1:
            print(f"  {pr['layout']:<14} synchronized {pr['sync_ms']:7.2f} ms   "
                  f"replica-local {pr['local_ms']:7.2f} ms   ratio {r['value']:.3f} "
                  f"(quartiles {pr['ratio_q1']:.3f}-{pr['ratio_q3']:.3f})")
        else:
            print(f"  {pr['layout']:<14} distbn {pr['distbn_ms']:7.2f} ms   torch "
                  f"{pr['torch_ms']:7.2f} ms   ratio {r['value']:.3f} "
                  f"(quartiles {pr['ratio_q1']:.3f}-{pr['ratio_q3']:.3f})")
    return 0


def _rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


if __name__ == "__main__":
    sys.exit(main())
