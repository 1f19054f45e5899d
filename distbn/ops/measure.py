"""Measure the BatchNormalization layer against copy bandwidth and PyTorch, in one process.

    python -m distbn.ops.measure [--threads 1,2] [--rounds 15] [--json out.json]
    python -m distbn.ops.measure --cold-start 4      # compile from an empty cache, 4 at once

For each layout and thread count, one run times, taking turns (median over rounds of
back-to-back calls after two untimed ones):
`np.copyto` of the input (copy bandwidth), the active backend's statistics pass
(`local_mean_m2`) and normalisation pass (`normalize`) alone, the layer's training forward
(`bn(x, training=True)`: statistics, moving-average update, normalisation, casts), its
forward+backward (`bn.backward(dy)` too), and `torch.nn.functional.batch_norm`
forward+backward (autograd, input/weight/bias gradients) on the same data and thread
count when torch is importable. Ratios come from the same run: `fwdbwd_vs_torch` =
distbn / torch time; `fwd_copy_fraction` = copy time / forward time, i.e. the forward's
bandwidth (one read of x, one write of y) as a fraction of the copy's;
`two_pass_copy_fraction` = copy time / (statistics + normalisation): the same fraction
for the forward's two passes alone, without the layer's bookkeeping.

The process keeps freed memory for reuse (`distbn.memory`), as distbn's commands do.

`measure_layer` is the function a benchmark suite calls; `main` prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc

import numpy as np

__all__ = ["LAYOUTS", "measure_layer", "peak_extra_bytes", "cold_start", "main"]

# (name, shape, axis): the two 16 MiB float32 cases.
LAYOUTS = (
    ("channels_last", (64, 32, 32, 64), -1),
    ("channels_first", (64, 64, 32, 32), 1),
)


def _interleaved(fns: dict, rounds: int, inner: int = 4, warmup: int = 2) -> dict:
    """Per-call seconds of each callable: rounds of short warm runs, in turn.

    Each round runs every callable `warmup` times untimed, then `inner` timed calls:
    after another callable ran, the first two calls of the next are 1.5x slower on the
    development VM (caches refilling: torch's buffers evict ours, and ours torch's), so
    the timed calls see each one in its steady state, as in a loop. Taking turns
    spreads the machine's noise over all of them.

    Returns:
        {name: [per-call seconds of each round]}.
    """
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def _set_threads(threads: int):
    """Set numba's and torch's thread counts; returns torch (or None)."""
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _torch_fwdbwd(torch, x, dy, axis, momentum, epsilon):
    """A closure running torch batch_norm forward+backward on x's layout."""
    def as_nchw(a):
        t = torch.from_numpy(a)
        return t.permute(0, 3, 1, 2) if axis in (-1, a.ndim - 1) else t  # channels_last

    tx, tdy = as_nchw(x), as_nchw(dy)
    nch = tx.shape[1]
    weight = torch.ones(nch, requires_grad=True)
    bias = torch.zeros(nch, requires_grad=True)
    running_mean, running_var = torch.zeros(nch), torch.ones(nch)

    def run():
        xx = tx.detach().requires_grad_(True)
        y = torch.nn.functional.batch_norm(xx, running_mean, running_var, weight, bias,
                                           training=True, momentum=1.0 - momentum,
                                           eps=epsilon)
        y.backward(tdy)

    return run


def peak_extra_bytes(layer, x, dy) -> int:
    """Peak bytes numpy allocates during one training forward+backward (outputs kept).

    Args:
        layer: a built distbn BatchNormalization.
        x, dy: the input and output gradient.

    Returns:
        Peak traced allocation above the starting point (numba's per-block partial
        sums are not traced; see `measure_layer`'s `kernel_scratch_bytes`).
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    y = layer(x, training=True)
    dx = layer.backward(dy)
    peak = tracemalloc.get_traced_memory()[1] - base
    del y, dx
    if started:
        tracemalloc.stop()
    return int(peak)


def _scratch_bytes(x, axis) -> int:
    """Bytes of numba's per-block partial sums for x (0 on the numpy backend)."""
    from distbn import ops

    if ops.backend_name() != "numba":
        return 0
    from distbn.ops import fused

    axis = axis % x.ndim
    geo = fused.fused_geometry(x, ops.reduce_axes_for(x.ndim, (axis,)))
    if geo is None:
        return 0
    blocks = -(-geo.outer // (geo.rows_per_block if geo.kind == "rows"
                              else geo.reduce_blocks[0]))
    return 4 * blocks * geo.nch * 8


def measure_layer(shape, axis, threads: int = 1, rounds: int = 15, dtype: str = "float32",
                  seed: int = 0) -> dict:
    """Time the layer's forward and forward+backward against copy and torch, same run.

    Args:
        shape, axis: the input shape and the layer's channel axis.
        threads: thread count for numba and torch.
        rounds: interleaved timing rounds (medians are reported).
        dtype: input dtype.
        seed: data seed.

    Returns:
        A JSON-friendly dict: medians in seconds, ratios, bandwidths, memory, backend.
    """
    import distbn

    torch = _set_threads(threads)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    out = np.empty_like(x)
    layer = distbn.BatchNormalization(axis=axis, dtype=dtype)
    layer(x, training=True)
    kern = distbn.ops.kernels()
    red = layer._reduction_axes
    count, mean, m2 = kern.local_mean_m2(x, red)
    var = m2 / count
    fns = {
        "copy": lambda: np.copyto(out, x),
        # The forward's two passes alone: where its time goes.
        "stats": lambda: kern.local_mean_m2(x, red),
        "normalize": lambda: kern.normalize(x, mean, var, None, None, layer.epsilon, red),
        "fwd": lambda: layer(x, training=True),
        "fwdbwd": lambda: (layer(x, training=True), layer.backward(dy)),
    }
    if torch is not None:
        fns["torch_fwdbwd"] = _torch_fwdbwd(torch, x, dy, axis, layer.momentum, layer.epsilon)
    times = _interleaved(fns, rounds)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rec = {
        "shape": list(shape), "axis": axis, "dtype": dtype, "threads": threads,
        "backend": distbn.ops.backend_name(), "rounds": rounds,
        "copy_s": med["copy"], "fwd_s": med["fwd"], "fwdbwd_s": med["fwdbwd"],
        "stats_s": med["stats"], "normalize_s": med["normalize"],
        # What the forward's fraction would be with nothing but its two passes.
        "two_pass_copy_fraction": med["copy"] / (med["stats"] + med["normalize"]),
        "copy_GBps": 2 * x.nbytes / med["copy"] / 1e9,
        "fwd_GBps": 2 * x.nbytes / med["fwd"] / 1e9,
        "fwd_copy_fraction": med["copy"] / med["fwd"],
        "peak_extra_bytes": peak_extra_bytes(layer, x, dy),
        "kernel_scratch_bytes": _scratch_bytes(x, axis),
        "input_bytes": int(x.nbytes),
    }
    if torch is not None:
        rec.update(torch_fwdbwd_s=med["torch_fwdbwd"], torch=torch.__version__,
                   fwdbwd_vs_torch=med["fwdbwd"] / med["torch_fwdbwd"])
    return rec


def cold_start(nprocs: int = 2, timeout: float = 900.0) -> dict:
    """Start `nprocs` processes at once on an empty numba cache; time their first BN step.

    Each runs one training forward+backward of both layouts and reports the seconds it
    spent compiling (or loading from the cache another process just wrote) and a
    checksum of its gradients; all must succeed and agree.

    Returns:
        {"wall_s", "compile_s" and "lock_wait_s": [per process], "ok", "same_result",
        "errors"}.
    """
    script = textwrap.dedent("""
        import json, numpy as np, distbn
        from distbn.ops import fused
        sums = []
        rng = np.random.default_rng(0)
        for shape, axis in [((8, 8, 8, 64), -1), ((8, 64, 8, 8), 1)]:
            x, dy = rng.standard_normal((2,) + shape).astype("float32")
            bn = distbn.BatchNormalization(axis=axis)
            y = bn(x, training=True)
            sums.append(float(np.abs(bn.backward(dy)).sum() + np.abs(y).sum()))
        print(json.dumps({"compile_s": fused.compile_seconds(),
                          "wait_s": fused.lock_wait_seconds(), "sums": sums}))
    """)
    with tempfile.TemporaryDirectory(prefix="distbn-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, DISTBN_KERNELS="numba")
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(nprocs)]
        outs = [p.communicate(timeout=timeout) for p in procs]
        wall = time.perf_counter() - start
    errors = [err[-2000:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode]
    results = [json.loads(o.strip().splitlines()[-1]) for p, (o, _) in zip(procs, outs,
               strict=True) if p.returncode == 0]
    return {"wall_s": wall, "compile_s": [r["compile_s"] for r in results],
            "lock_wait_s": [r["wait_s"] for r in results],
            "ok": not errors, "same_result": len({json.dumps(r["sums"]) for r in results}) <= 1,
            "errors": errors}


def _machine() -> dict:
    from distbn import ops
    from distbn.memory import malloc_setting

    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
            "cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "backend": ops.backend_info(),
            "malloc": malloc_setting()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    """Command line: print (and optionally save) the measurements."""
    parser = argparse.ArgumentParser(prog="python -m distbn.ops.measure", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (medians)")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--cold-start", type=int, metavar="N",
                        help="instead: N processes compiling at once from an empty cache")
    args = parser.parse_args(argv)
    from distbn.memory import retain_freed_memory

    retain_freed_memory()  # as distbn's commands do; DISTBN_MALLOC=default to compare
    if args.cold_start:
        res = cold_start(args.cold_start)
        print(json.dumps(res, indent=1))
        return 0 if res["ok"] and res["same_result"] else 1
    records = []
    print(json.dumps(_machine()))
    header = (f"{'layout':15} {'thr':>3} {'copy GB/s':>9} {'stats ms':>8} {'norm ms':>7} "
              f"{'fwd ms':>7} {'fwd/copy':>8} "
              f"{'fwd+bwd ms':>10} {'torch ms':>8} {'vs torch':>8} {'peak MiB':>8}")
    print(header)
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, shape, axis in LAYOUTS:
            rec = measure_layer(shape, axis, threads=threads, rounds=args.rounds)
            rec["layout"] = name
            records.append(rec)
            torch_ms = rec.get("torch_fwdbwd_s", float("nan")) * 1e3
            print(f"{name:15} {threads:3d} {rec['copy_GBps']:9.1f} {rec['stats_s'] * 1e3:8.2f} "
                  f"{rec['normalize_s'] * 1e3:7.2f} {rec['fwd_s'] * 1e3:7.2f} "
                  f"{rec['fwd_copy_fraction']:8.2f} {rec['fwdbwd_s'] * 1e3:10.2f} "
                  f"{torch_ms:8.2f} {rec.get('fwdbwd_vs_torch', float('nan')):8.2f} "
                  f"{rec['peak_extra_bytes'] / 2**20:8.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
