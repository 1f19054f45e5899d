"""Suite `kernel`: BatchNormalization forward/backward speed on one process, against the
machine's copy bandwidth and PyTorch's CPU `batch_norm`, measured in the same run.

What is timed is the replica-local layer in training mode, as a training step calls it:
`bn(x, training=True)` (statistics, moving-average update, normalisation) and
`bn.backward(dy)` (dx plus gamma/beta gradients), so whichever kernel backend
`distbn.ops` has active is what gets measured.

Effective bytes (the least memory traffic the pass needs; the real traffic is higher,
e.g. the two-pass statistics read x twice more): forward reads x and writes y, 2 * nbytes;
backward reads x and dy and writes dx, 3 * nbytes; forward+backward 5 * nbytes.
Effective bandwidth = effective bytes / median time, in GB/s (10^9 bytes/s). The copy
bandwidth is `np.copyto(dst, src)` of a large array, counted the same way (src read +
dst written = 2 * nbytes per copy), so `copy_fraction` is the fraction of what the
memory system gives a plain copy.

PyTorch (when importable): `torch.nn.functional.batch_norm(x, running_mean, running_var,
weight, bias, training=True)` on the same memory (a channels-last numpy array becomes
an NCHW tensor with channels-last strides, which torch's CPU kernel handles natively),
inputs requiring grad as in training; backward through `torch.autograd.grad`, with
`torch.set_num_threads` equal to the threads distbn's backend uses. distbn and torch are
timed alternately, and `torch_ratio` is the median of the per-pair ratios
distbn time / torch time (below 1: distbn is faster).
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from distbn.bench.context import Context
from distbn.bench.environment import kernel_backend, kernel_backend_info
from distbn.bench.results import make_record
from distbn.bench.timing import Stats

__all__ = ["NAME", "cases", "copy_bandwidth", "run"]

NAME = "kernel"

#: Effective bytes per pass, in units of the input's nbytes (see the module docstring).
_BYTES_FACTOR = {"forward": 2, "backward": 3, "forward_backward": 5}
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


def copy_bandwidth(ctx: Context) -> tuple:
    """Measure `np.copyto` bandwidth: (record, median GB/s).

    Args:
        ctx: the run context (only its mode and progress output are used).

    Returns:
        (record, bandwidth in GB/s).
    """
    nbytes = ctx.pick(256, 64, 1) * 2**20
    src = np.random.default_rng(0).standard_normal(nbytes // 8)
    dst = np.empty_like(src)
    repeats, warmup = ctx.pick(20, 10, 3), ctx.pick(3, 2, 1)
    inner = 1 if ctx.mode != "tiny" else 10
    t = ctx.time(lambda: np.copyto(dst, src), repeats, warmup, inner)
    moved = 2 * src.nbytes  # read src + write dst
    bw = t.map(lambda s: moved / s / 1e9)
    rec = make_record("kernel.copy", "bandwidth", bw, "GB/s", 1,
                      {"method": "np.copyto", "bytes": moved, "array_mib": src.nbytes / 2**20},
                      warmup)
    ctx.progress(f"kernel copy {src.nbytes / 2**20:.0f} MiB: {bw.median:.2f} GB/s")
    return rec, bw.median


def _distbn_fns(case, x, dy):
    """(forward, backward, forward+backward) callables on a built replica-local layer."""
    from distbn.layers import BatchNormalization

    bn = BatchNormalization(axis=case["axis"], dtype=case["dtype"])
    bn(x, training=True)  # build, and leave a cache for backward-only timing

    def forward():
        return bn(x, training=True)

    def backward():
        return bn.backward(dy)

    def forward_backward():
        bn(x, training=True)
        return bn.backward(dy)

    return {"forward": forward, "backward": backward, "forward_backward": forward_backward}


def _torch_fns(torch, case, x, dy):
    """The same three passes with torch.nn.functional.batch_norm and autograd."""
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


def _peak_extra_mib(fn) -> float:
    """Peak memory numpy allocates during one call of `fn` (tracemalloc sees numpy's
    buffers), in MiB, including the arrays the call returns."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
        del out
    finally:
        tracemalloc.stop()
    return peak / 2**20


def _fmt_time(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.1f} us"


def _measure_pass(ctx, pas, fn, torch_fn, params, copy_gbs, repeats, warmup, target):
    """Records of one pass of one case: distbn (and torch, timed alternately)."""
    nbytes = params["bytes"]
    name = f"kernel.{pas}"
    inner = ctx.calibrate(fn, target)
    if torch_fn is None:
        t, tt = ctx.time(fn, repeats, warmup, inner), None
    else:
        t, tt, a, b = ctx.time_pair(fn, torch_fn, repeats, warmup, inner)
    bw = t.map(lambda s: nbytes / s / 1e9)
    records = [
        make_record(name, "time", t.scaled(_US), "us", 1, params, warmup),
        make_record(name, "bandwidth", bw, "GB/s", 1, params, warmup),
        make_record(name, "copy_fraction", bw.map(lambda g: g / copy_gbs), "ratio", 1,
                    params, warmup),
    ]
    line = (f"{_fmt_time(t.median * _US)}, {bw.median:.2f} GB/s "
            f"({bw.median / copy_gbs:.0%} of copy)")
    if tt is not None:
        ratio = Stats(a / b)  # per pair: both saw the same moment of the machine
        records += [
            make_record(name, "torch_time", tt.scaled(_US), "us", 1, params, warmup),
            make_record(name, "torch_bandwidth", tt.map(lambda s: nbytes / s / 1e9), "GB/s",
                        1, params, warmup),
            make_record(name, "torch_ratio", ratio, "ratio", 1, params, warmup),
        ]
        line += f"; torch {_fmt_time(tt.median * _US)} (distbn/torch {ratio.median:.2f})"
    if pas == "forward_backward":
        mib = _peak_extra_mib(fn)
        records.append(make_record(name, "peak_extra_memory", Stats([mib]), "MiB", 1,
                                   params, 0))
        line += f"; peak extra {mib:.1f} MiB ({mib * 2**20 / params['input_bytes']:.1f}x input)"
    return records, line


def run(ctx: Context) -> list[dict]:
    """Run the kernel suite on this process (world size 1).

    Args:
        ctx: the run context; its communicator is not used.

    Returns:
        The records.
    """
    backend = kernel_backend()
    threads = _backend_threads()
    torch = _import_torch()
    if torch is None:
        ctx.progress("kernel: torch is not importable; skipping the PyTorch comparison")
    repeats, warmup = ctx.pick(21, 11, 3), ctx.pick(3, 2, 1)
    target = ctx.pick(0.02, 0.02, 0.002)  # seconds per sample: bounds timer noise
    copy_rec, copy_gbs = copy_bandwidth(ctx)
    records = [copy_rec]
    saved_threads = torch.get_num_threads() if torch is not None else None
    try:
        if torch is not None:
            torch.set_num_threads(threads)  # the same thread count as distbn's backend
        rng = np.random.default_rng(0)
        for case in cases(ctx.mode):
            x = rng.standard_normal(case["shape"]).astype(case["dtype"])
            dy = rng.standard_normal(case["shape"]).astype(case["dtype"])
            ours = _distbn_fns(case, x, dy)
            theirs = _torch_fns(torch, case, x, dy) if torch is not None else {}
            base = {"shape": list(case["shape"]), "dtype": case["dtype"],
                    "layout": case["layout"], "axis": case["axis"], "backend": backend,
                    "threads": threads, "input_bytes": x.nbytes}
            for pas, fn in ours.items():
                params = dict(base, bytes=_BYTES_FACTOR[pas] * x.nbytes)
                recs, line = _measure_pass(ctx, pas, fn, theirs.get(pas), params, copy_gbs,
                                           repeats, warmup, target)
                records += recs
                ctx.progress(f"kernel {pas} {tuple(case['shape'])} {case['dtype']} "
                             f"{case['layout']}: {line}")
    finally:
        if torch is not None:
            torch.set_num_threads(saved_threads)
    return records
