"""Suite `kernel`: BatchNormalization forward/backward speed on one process, against the
machine's copy bandwidth and PyTorch's CPU `batch_norm`, measured in the same run.

    distbn bench kernel [--threads 1,2] [--cold-start N]

For each case (shape, dtype, layout) and thread count, the operations below are timed in
turn, one sample of each per round (`timing.sample_interleaved`, with untimed settling
calls before each sample so each is seen in its steady state), and every ratio is taken
per round, so both sides saw the same moment of the machine:

* `copy`: `np.copyto` of an array of the input's size (the copy bandwidth the ratios use:
  same size, same method, same run as the kernels);
* `stats` and `normalize`: the active backend's two forward passes alone
  (`local_mean_m2`, `normalize`);
* `forward`: the replica-local layer in training mode, `bn(x, training=True)`
  (statistics, moving-average update, normalisation, casts); `backward`: `bn.backward(dy)`
  (dx plus gamma/beta gradients); `forward_backward`: both;
* PyTorch (when importable): `torch.nn.functional.batch_norm(x, running_mean,
  running_var, weight, bias, training=True)` on the same memory (a channels-last numpy
  array becomes an NCHW tensor with channels-last strides, which torch's CPU kernel
  handles natively), inputs requiring grad, backward through `torch.autograd.grad`, at
  the same thread count (`torch.set_num_threads`);
* `renorm` and `ghost`: forward+backward of the same layer with `renorm=True` and with
  `virtual_batch_size` = a quarter of the batch (four ghost batches), each with
  `plain_ratio` = its time / the plain layer's forward+backward in the same round (issue
  17's bar: renorm at most 1.1x).

Effective bytes (the least memory traffic a pass needs): copy 2 * nbytes, stats 1x,
normalize and forward 2x (read x, write y), backward 3x (x, dy, dx), forward+backward 5x.
Bandwidth = effective bytes / time (GB/s, 10^9 bytes/s); `copy_fraction` = bandwidth /
the copy's bandwidth; `two_pass_copy_fraction` (on `kernel.forward`) = copy time /
(stats + normalize time): the forward's fraction with nothing but its two passes;
`torch_ratio` = distbn time / torch time (below 1: distbn is faster). `peak_extra_memory`
(on `kernel.forward_backward`): the most numpy allocates during one training
forward+backward with both outputs kept (tracemalloc; numba's per-block partial sums,
`kernel_scratch_bytes` in the params, are not traced).

`--cold-start N` also starts N processes at once on an empty numba cache and records the
seconds each spent compiling (or loading what another just wrote) the kernels of its first
training step (`kernel.cold_start`); all must succeed with the same results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc

import numpy as np

from distbn.bench.context import Context
from distbn.bench.environment import kernel_backend, kernel_backend_info
from distbn.bench.results import make_record
from distbn.bench.timing import Stats, sample_interleaved

__all__ = ["NAME", "PASSES", "cases", "peak_extra_bytes", "cold_start", "run"]

NAME = "kernel"

#: The layer's passes, timed against torch's; `copy`, `stats`, `normalize` are timed too.
PASSES = ("forward", "backward", "forward_backward")
#: Effective bytes per operation, in units of the input's nbytes (see the module docstring).
_BYTES_FACTOR = {"copy": 2, "stats": 1, "normalize": 2, "forward": 2, "backward": 3,
                 "forward_backward": 5, "renorm": 5, "ghost": 5}
#: The layer's variants, timed as forward+backward against the plain layer's.
VARIANTS = ("renorm", "ghost")
_US = 1e6


def cases(mode: str) -> list[dict]:
    """The (shape, dtype, layout, axis) cases of a size profile.

    Args:
        mode: "full", "quick" or "tiny".

    Returns:
        A list of dicts with keys shape, dtype, layout, axis.
    """
    cl, cf = "channels_last", "channels_first"
    full = [
        ((64, 32, 32, 64), "float32", cl, -1),
        ((64, 64, 32, 32), "float32", cf, 1),
        ((64, 32, 32, 64), "float64", cl, -1),
        ((64, 64, 32, 32), "float64", cf, 1),
        ((8192, 512), "float32", "features", -1),
        ((256, 14, 14, 256), "float32", cl, -1),
    ]
    by_mode = {
        "full": full,
        "quick": full[:3],
        "tiny": [((4, 4, 4, 8), "float32", cl, -1), ((4, 8, 4, 4), "float32", cf, 1),
                 ((16, 8), "float64", "features", -1)],
    }
    return [dict(shape=s, dtype=d, layout=lay, axis=a) for s, d, lay, a in by_mode[mode]]


def _backend_threads() -> int:
    """Threads the active kernel backend uses (numpy's elementwise kernels use one)."""
    threads = kernel_backend_info().get("threads", 1)
    return int(threads) if isinstance(threads, int) and threads >= 1 else 1


def _import_torch():
    """torch, or None when it is not importable (it is optional)."""
    try:
        import torch
        import torch.nn.functional  # noqa: F401
    except ImportError:
        return None
    return torch


def _set_threads(threads: int, torch) -> int:
    """Run the kernels (numba) and torch on `threads` threads; returns the count in use."""
    if kernel_backend() == "numba":
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        threads = int(numba.get_num_threads())
    else:
        threads = 1  # numpy's elementwise kernels are single-threaded
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def _distbn_fns(case, x, dy):
    """The layer's three passes, and the backend's two forward passes alone."""
    from distbn import ops
    from distbn.layers import BatchNormalization

    bn = BatchNormalization(axis=case["axis"], dtype=case["dtype"])
    bn(x, training=True)  # build, and leave a cache for backward-only timing
    kern = ops.kernels()
    red = ops.reduce_axes_for(x.ndim, (case["axis"] % x.ndim,))
    count, mean, m2 = kern.local_mean_m2(x, red)
    var = m2 / np.maximum(count, 1)

    def forward_backward():
        bn(x, training=True)
        return bn.backward(dy)

    def variant(**kwargs):
        layer = BatchNormalization(axis=case["axis"], dtype=case["dtype"], **kwargs)

        def run():
            layer(x, training=True)
            return layer.backward(dy)
        return run

    fns = {
        "renorm": variant(renorm=True),
        "stats": lambda: kern.local_mean_m2(x, red),
        "normalize": lambda: kern.normalize(x, mean, var, None, None, bn.epsilon, red),
        "forward": lambda: bn(x, training=True),
        "backward": lambda: bn.backward(dy),
        "forward_backward": forward_backward,
    }
    if x.shape[0] % 4 == 0:  # four ghost batches (the batch axis is reduced in every case)
        fns["ghost"] = variant(virtual_batch_size=x.shape[0] // 4)
    return bn, fns


def _torch_fns(torch, case, x, dy):
    """The three passes with torch.nn.functional.batch_norm and autograd."""
    F = torch.nn.functional

    def as_nchw(a):
        t = torch.from_numpy(a)
        if case["layout"] == "channels_last" and a.ndim > 2:
            # Channels to dim 1 as torch wants, without a copy: channels-last strides.
            t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
        return t

    xt = as_nchw(x).detach().requires_grad_(True)
    dyt = as_nchw(dy)
    c = xt.shape[1]
    dt = xt.dtype
    w = torch.ones(c, dtype=dt, requires_grad=True)
    b = torch.zeros(c, dtype=dt, requires_grad=True)
    rm, rv = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)

    def fwd():
        return F.batch_norm(xt, rm, rv, w, b, training=True, momentum=0.01, eps=1e-3)

    y = fwd()

    def backward():
        return torch.autograd.grad(y, (xt, w, b), dyt, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(fwd(), (xt, w, b), dyt)

    return {"forward": fwd, "backward": backward, "forward_backward": forward_backward}


def peak_extra_bytes(layer, x, dy) -> int:
    """Peak bytes numpy allocates during one training forward+backward (outputs kept).

    Args:
        layer: a built distbn BatchNormalization.
        x, dy: the input and output gradient.

    Returns:
        Peak traced allocation above the starting point (numba's per-block partial
        sums are not traced; see `_scratch_bytes`).
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y = layer(x, training=True)
        dx = layer.backward(dy)
        peak = tracemalloc.get_traced_memory()[1] - base
        del y, dx
    finally:
        if started:
            tracemalloc.stop()
    return int(peak)


def _scratch_bytes(x, axis) -> int:
    """Bytes of numba's per-block partial sums for x (0 on the numpy backend)."""
    from distbn import ops

    if ops.backend_name() != "numba":
        return 0
    from distbn.ops import fused

    geo = fused.fused_geometry(x, ops.reduce_axes_for(x.ndim, (axis % x.ndim,)))
    if geo is None:
        return 0
    blocks = -(-geo.outer // (geo.rows_per_block if geo.kind == "rows"
                              else geo.reduce_blocks[0]))
    return 4 * blocks * geo.nch * 8


def _fmt_time(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} us"


def _measure_case(ctx, case, threads, torch, backend, rng) -> tuple[list, str]:
    """Records of one case at one thread count, and its progress line."""
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    dy = rng.standard_normal(case["shape"]).astype(case["dtype"])
    out = np.empty_like(x)
    bn, ours = _distbn_fns(case, x, dy)
    fns = {"copy": lambda: np.copyto(out, x), **ours}
    if torch is not None:
        fns.update({f"torch_{k}": f for k, f in _torch_fns(torch, case, x, dy).items()})
    repeats, warmup = ctx.pick(21, 11, 3), ctx.pick(3, 2, 1)
    target = ctx.pick(0.02, 0.02, 0.002)  # seconds per sample: bounds timer noise
    inner = {k: ctx.calibrate(f, target) for k, f in fns.items()}
    t = sample_interleaved(fns, repeats, warmup, inner, settle=ctx.pick(2, 2, 1))
    base = {"shape": list(case["shape"]), "dtype": case["dtype"], "layout": case["layout"],
            "axis": case["axis"], "backend": backend, "threads": threads,
            "input_bytes": int(x.nbytes),
            "kernel_scratch_bytes": _scratch_bytes(x, case["axis"])}
    copy_bytes = _BYTES_FACTOR["copy"] * x.nbytes
    records = []

    def add(name, metric, stats, unit, params):
        records.append(make_record(f"kernel.{name}", metric, stats, unit, 1, params, warmup))

    copy_params = dict(base, bytes=copy_bytes, method="np.copyto")
    add("copy", "time", Stats(t["copy"] * _US), "us", copy_params)
    add("copy", "bandwidth", Stats(copy_bytes / t["copy"] / 1e9), "GB/s", copy_params)
    median = {k: float(np.median(v)) for k, v in t.items()}
    line = [f"copy {copy_bytes / median['copy'] / 1e9:.2f} GB/s"]
    for name in ("stats", "normalize", *PASSES):
        nbytes = _BYTES_FACTOR[name] * x.nbytes
        params = dict(base, bytes=nbytes)
        add(name, "time", Stats(t[name] * _US), "us", params)
        add(name, "bandwidth", Stats(nbytes / t[name] / 1e9), "GB/s", params)
        # Per round: this pass's bandwidth over the copy's of the same round.
        frac = Stats(nbytes / t[name] / (copy_bytes / t["copy"]))
        add(name, "copy_fraction", frac, "ratio", params)
        text = f"{name} {_fmt_time(median[name] * _US)} ({frac.median:.0%} of copy)"
        if name == "forward":
            two = Stats(t["copy"] / (t["stats"] + t["normalize"]))
            add(name, "two_pass_copy_fraction", two, "ratio", params)
            text += f", two passes alone {two.median:.0%}"
        if f"torch_{name}" in t:
            tt = t[f"torch_{name}"]
            ratio = Stats(t[name] / tt)
            add(name, "torch_time", Stats(tt * _US), "us", params)
            add(name, "torch_bandwidth", Stats(nbytes / tt / 1e9), "GB/s", params)
            add(name, "torch_ratio", ratio, "ratio", params)
            text += f", torch {_fmt_time(median[f'torch_{name}'] * _US)} ({ratio.median:.2f})"
        if name == "forward_backward":
            mib = peak_extra_bytes(bn, x, dy) / 2**20
            records.append(make_record("kernel.forward_backward", "peak_extra_memory",
                                       Stats([mib]), "MiB", 1, params, 0))
            text += f"; peak extra {mib:.1f} MiB ({mib * 2**20 / x.nbytes:.1f}x input)"
        line.append(text)
    for name in VARIANTS:
        if name not in t:
            continue
        nbytes = _BYTES_FACTOR[name] * x.nbytes
        params = dict(base, bytes=nbytes, **({"virtual_batch_size": x.shape[0] // 4}
                                             if name == "ghost" else {"renorm": True}))
        add(name, "time", Stats(t[name] * _US), "us", params)
        add(name, "bandwidth", Stats(nbytes / t[name] / 1e9), "GB/s", params)
        add(name, "copy_fraction", Stats(nbytes / t[name] / (copy_bytes / t["copy"])),
            "ratio", params)
        plain = Stats(t[name] / t["forward_backward"])
        add(name, "plain_ratio", plain, "ratio", params)
        line.append(f"{name} fwd+bwd {_fmt_time(median[name] * _US)} "
                    f"({plain.median:.2f}x plain)")
    return records, "; ".join(line)


_COLD_SCRIPT = textwrap.dedent("""
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


def cold_start(nprocs: int = 2, timeout: float = 900.0) -> dict:
    """Start `nprocs` processes at once on an empty numba cache; time their first BN step.

    Each runs one training forward+backward of both layouts and reports the seconds it
    spent compiling (or loading from the cache another process just wrote) and a
    checksum of its gradients; all must succeed and agree.

    Returns:
        {"wall_s", "compile_s" and "lock_wait_s": [per process], "ok", "same_result",
        "errors"}.
    """
    with tempfile.TemporaryDirectory(prefix="distbn-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, DISTBN_KERNELS="numba")
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", _COLD_SCRIPT], env=env, text=True,
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


def _cold_start_records(ctx, nprocs: int) -> list[dict]:
    res = cold_start(nprocs)
    if not res["ok"] or not res["same_result"]:
        what = "; ".join(res["errors"]) or "the processes' results differ"
        raise RuntimeError(f"kernel cold start with {nprocs} processes failed: {what}")
    params = {"processes": nprocs, "wall_s": round(res["wall_s"], 3),
              "lock_wait_s": res["lock_wait_s"]}
    ctx.progress(f"kernel cold start, {nprocs} processes: compile "
                 f"{max(res['compile_s']):.1f} s, wall {res['wall_s']:.1f} s")
    return [make_record("kernel.cold_start", "compile_time", Stats(res["compile_s"]), "s", 1,
                        params, 0)]


def run(ctx: Context, threads=None, cold_start_procs: int = 0) -> list[dict]:
    """Run the kernel suite on this process (world size 1).

    Args:
        ctx: the run context; its communicator is not used.
        threads: thread counts to measure at (default: the backend's current count).
        cold_start_procs: also time N processes compiling at once from an empty cache
            (0: not).

    Returns:
        The records.
    """
    backend = kernel_backend()
    torch = _import_torch()
    if torch is None:
        ctx.progress("kernel: torch is not importable; skipping the PyTorch comparison")
    saved = (_backend_threads(), torch.get_num_threads() if torch is not None else None)
    records = []
    try:
        for count in list(threads or [saved[0]]):
            used = _set_threads(int(count), torch)
            rng = np.random.default_rng(0)
            for case in cases(ctx.mode):
                recs, line = _measure_case(ctx, case, used, torch, backend, rng)
                records += recs
                ctx.progress(f"kernel {tuple(case['shape'])} {case['dtype']} "
                             f"{case['layout']} {used} thread(s): {line}")
    finally:
        _set_threads(saved[0], None)
        if torch is not None:
            torch.set_num_threads(saved[1])
    if cold_start_procs:
        records += _cold_start_records(ctx, int(cold_start_procs))
    return records
