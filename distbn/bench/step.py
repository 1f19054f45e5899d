"""Suite `step`: the quickstart model's training step, distbn next to the same model in PyTorch.

One process, one thread by default (`--threads` for more). What is timed:

* distbn: `Trainer.train_step()` of the packaged configs/quickstart.yaml at a batch of 64
  (forward, loss, backward, gradient norm, optimizer; one replica: no MPI call);
* PyTorch: the same layers as torch.nn modules (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
  AdaptiveAvgPool2d, Linear; the distbn model's initial weights copied in), one step
  `zero_grad; cross_entropy(model(x), y).backward(); SGD(momentum).step()`, once with
  NCHW tensors and once with channels_last ones.

The three run interleaved (one sample of each per round, `timing.sample_interleaved`), so
the per-round ratio distbn / torch(channels_last) sees the same moment of a noisy machine;
records hold medians. Then a per-layer breakdown of each: distbn by timing every layer's
`call` and `backward` over a few extra steps, torch by forward and backward module hooks
(both add a little overhead; the totals come from the un-instrumented rounds). Without
torch the suite times distbn alone and says so.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np

from distbn.bench.context import Context
from distbn.bench.results import make_record
from distbn.bench.timing import Stats, sample_interleaved

__all__ = ["NAME", "IMPLS", "default_config", "build_trainer", "torch_model", "run"]

NAME = "step"
#: The implementations timed, in the order of a round; the ratio's reference is the last.
IMPLS = ("distbn", "torch_nchw", "torch_channels_last")
_US = 1e6
_clock = time.perf_counter


def default_config() -> Path:
    """The quickstart config shipped in the package (the model the issue's bar is for)."""
    from distbn.bench.scaling import default_config as quickstart

    return quickstart()


def build_trainer(batch: int, config_path=None, steps: int = 4):
    """A one-process `Trainer` of `config_path` (default quickstart) at `batch` samples.

    Args:
        batch: the global (= local) batch size.
        config_path: the training config (default: the packaged quickstart.yaml).
        steps: how many different batches the data set should hold (it cycles).

    Returns:
        The Trainer (LocalStrategy: one replica, no MPI).
    """
    from distbn.distribute import LocalStrategy
    from distbn.train.config import load_config
    from distbn.train.trainer import Trainer

    path = Path(config_path) if config_path is not None else default_config()
    if not path.is_file():
        raise FileNotFoundError(f"step: training config {str(path)!r} not found")
    overrides = [f"train.global_batch_size={batch}", f"data.n_train={batch * steps}",
                 "data.n_test=16", "logging.progress=none"]
    return Trainer(load_config(path, overrides), LocalStrategy())


# --- the same model in PyTorch ------------------------------------------------------------------

def torch_model(model, torch):
    """torch.nn.Sequential equal to a built distbn channels_last CNN, weights copied.

    Supports the layers of the quickstart and similar models: Conv2D (no activation
    or relu), BatchNormalization (channel axis last), ReLU (plain), MaxPooling2D and
    AveragePooling2D ("valid"), GlobalAveragePooling2D, Dense (no activation or relu).

    Args:
        model: a built distbn `Sequential` whose input is NHWC.
        torch: the torch module.

    Returns:
        (torch.nn.Sequential taking NCHW input, list of (distbn layer name, module index)).

    Raises:
        ValueError: naming the layer that has no translation here.
    """
    nn = torch.nn
    mods, names = [], []

    def weight(var):
        return torch.from_numpy(np.array(var.numpy(), dtype=np.float32))

    for layer in model.layers:
        kind = type(layer).__name__
        cfg = layer.get_config()
        act = cfg.get("activation", "linear")
        problem = None
        if act not in ("linear", "relu"):
            problem = f"activation={act!r}"
        elif cfg.get("data_format", "channels_last") != "channels_last":
            problem = f"data_format={cfg['data_format']!r}"
        if kind == "Conv2D" and problem is None:
            kh, kw, cin, cout = layer.kernel.shape
            pad = "same" if layer.padding == "same" else 0
            if pad == "same" and (max(layer.strides) > 1 or (kh - 1) % 2 or (kw - 1) % 2):
                problem = "padding='same' with strides or an even kernel (asymmetric pad)"
            else:
                mod = nn.Conv2d(cin, cout, (kh, kw), stride=layer.strides, padding=pad,
                                dilation=layer.dilation_rate, bias=layer.use_bias)
                with torch.no_grad():
                    mod.weight.copy_(weight(layer.kernel).permute(3, 2, 0, 1))
                    if layer.use_bias:
                        mod.bias.copy_(weight(layer.bias))
                mods.append(mod)
        elif kind == "BatchNormalization" and problem is None:
            c = layer.gamma.shape[0] if layer.gamma is not None else layer.moving_mean.shape[0]
            if cfg.get("axis") not in (-1, [-1], 3, [3]):
                problem = f"axis={cfg.get('axis')!r}"
            else:
                mod = nn.BatchNorm2d(c, eps=layer.epsilon, momentum=1.0 - layer.momentum,
                                     affine=layer.scale and layer.center)
                with torch.no_grad():
                    if layer.scale and layer.center:
                        mod.weight.copy_(weight(layer.gamma))
                        mod.bias.copy_(weight(layer.beta))
                    mod.running_mean.copy_(weight(layer.moving_mean))
                    mod.running_var.copy_(weight(layer.moving_variance))
                mods.append(mod)
        elif kind == "ReLU" and problem is None:
            if cfg["max_value"] is not None or cfg["negative_slope"] or cfg["threshold"]:
                problem = "a ReLU with max_value, negative_slope or threshold"
            else:
                mods.append(nn.ReLU())
        elif kind in ("MaxPooling2D", "AveragePooling2D") and problem is None:
            if layer.padding != "valid":
                problem = f"padding={layer.padding!r}"
            else:
                cls = nn.MaxPool2d if kind == "MaxPooling2D" else nn.AvgPool2d
                mods.append(cls(layer.pool_size, stride=layer.strides))
        elif kind == "GlobalAveragePooling2D" and problem is None:
            if layer.keepdims:
                problem = "keepdims=True"
            else:
                mods.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        elif kind == "Dense" and problem is None:
            cin, cout = layer.kernel.shape
            mod = nn.Linear(cin, cout, bias=layer.use_bias)
            with torch.no_grad():
                mod.weight.copy_(weight(layer.kernel).T)
                if layer.use_bias:
                    mod.bias.copy_(weight(layer.bias))
            mods.append(mod)
        elif problem is None:
            problem = "no torch translation for this layer type"
        if problem is not None:
            raise ValueError(f"step: layer {layer.name!r} ({kind}): {problem}; the step suite "
                             "compares models of Conv2D, BatchNormalization, ReLU, pooling and "
                             "Dense layers")
        names.append((layer.name, len(mods) - 1))
        if act == "relu":  # the fused activation as its own torch module
            mods.append(nn.ReLU())
            names.append((f"{layer.name}.relu", len(mods) - 1))
    return nn.Sequential(*mods), names


class _TorchStep:
    """One SGD step of a torch model on a fixed batch, in one memory format."""

    def __init__(self, torch, net, x_nhwc, labels, channels_last, lr, momentum):
        self.torch = torch
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc, dtype=np.float32)).permute(0, 3, 1, 2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = x.contiguous(memory_format=fmt)
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr, momentum=momentum)
        self.net.train()

    def __call__(self, mark_backward_end: bool = False):
        """One step; returns the loss, or (breakdown) the clock when backward returned."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.net(self.x), self.y)
        loss.backward()
        end = _clock()
        self.opt.step()
        return end if mark_backward_end else loss


# --- per-layer breakdown ------------------------------------------------------------------------

def _distbn_layers(trainer, steps: int) -> tuple[dict, list]:
    """Per-layer forward/backward seconds of each of `steps` steps, and the steps' totals.

    Wraps each layer's `call` and `backward` (instance attributes, removed afterwards).
    """
    layers = trainer.model.layers
    acc = {la.name: {"forward": [], "backward": []} for la in layers}
    current = {}

    def wrap(layer, attr, pass_):
        inner = getattr(layer, attr)

        def timed(*args, **kwargs):
            t0 = _clock()
            try:
                return inner(*args, **kwargs)
            finally:
                key = (layer.name, pass_)
                current[key] = current.get(key, 0.0) + _clock() - t0
        return timed

    for layer in layers:
        layer.call = wrap(layer, "call", "forward")
        layer.backward = wrap(layer, "backward", "backward")
    totals = []
    try:
        for _ in range(steps):
            current.clear()
            t0 = _clock()
            trainer.train_step()
            totals.append(_clock() - t0)
            for name, passes in acc.items():
                for pass_, got in passes.items():
                    got.append(current.get((name, pass_), 0.0))
    finally:
        for layer in layers:
            del layer.call, layer.backward
    return acc, totals


def _torch_layers(step: _TorchStep, names, steps: int) -> tuple[dict, list]:
    """Per-module forward/backward seconds of each of `steps` steps, and their totals.

    Forward: pre- and post-forward hooks around each module. Backward: autograd runs
    the modules' backward one after the other (one thread, a chain), so module i's
    backward lasts from its backward pre-hook (its output's gradient is ready) to the
    next module's, the first module's until `backward()` returns. (A full backward
    post-hook would fire too early for the first module: its input needs no gradient.)
    """
    modules = list(step.net)
    fwd, bmarks, handles = {}, {}, []
    for i, mod in enumerate(modules):
        def fpre(_m, _inp, i=i):
            fwd[i] = -_clock()

        def fpost(_m, _inp, _out, i=i):
            fwd[i] += _clock()

        def bpre(_m, _gout, i=i):
            bmarks[i] = _clock()

        handles += [mod.register_forward_pre_hook(fpre), mod.register_forward_hook(fpost),
                    mod.register_full_backward_pre_hook(bpre)]
    acc = {i: {"forward": [], "backward": []} for i in range(len(modules))}
    totals = []
    try:
        with warnings.catch_warnings():
            # torch warns that the first module's input needs no gradient; only its
            # pre-hook is used, which fires as documented.
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                fwd.clear()
                bmarks.clear()
                t0 = _clock()
                end = step(mark_backward_end=True)
                totals.append(_clock() - t0)
                for i in range(len(modules)):
                    nxt = bmarks.get(i - 1, end) if i > 0 else end
                    acc[i]["forward"].append(fwd.get(i, 0.0))
                    acc[i]["backward"].append(nxt - bmarks[i] if i in bmarks else 0.0)
    finally:
        for h in handles:
            h.remove()
    return {name: acc[i] for name, i in names}, totals


# --- the suite ----------------------------------------------------------------------------------

def _import_torch():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def _set_threads(threads: int, torch) -> int:
    """numba's and torch's thread count; returns the count numba runs with (1 for numpy)."""
    from distbn.ops import backend_name

    used = threads
    if backend_name() == "numba":
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        used = int(numba.get_num_threads())
    if torch is not None:
        # After numba's pool has started (its OpenMP start resets libgomp's count).
        torch.set_num_threads(threads)
    return used


def _one(values, name: str, metric: str, unit: str, params: dict, warmup: int) -> dict:
    return make_record(name, metric, Stats(values), unit, 1, params, warmup)


def run(ctx: Context, threads=None, config_path=None) -> list[dict]:
    """The suite's records (one process: call it with `ctx.comm` None or on rank 0 only).

    Args:
        ctx: the run context (its mode picks sizes).
        threads: thread counts to measure at (default [1]: the issue's bar).
        config_path: the training config (default: the packaged quickstart.yaml).

    Returns:
        Records: `step.train_step` time (µs) per implementation and the per-round
        ratios distbn/torch; `step.layer` forward and backward time per layer and
        implementation; `step.breakdown_total` the instrumented steps' totals.
    """
    from distbn.ops import backend_info, backend_name

    torch = _import_torch()
    if torch is None:
        ctx.progress("step: torch is not installed (pip install -e \".[torch]\"); timing "
                     "distbn alone")
    batch = ctx.pick(64, 64, 8)
    repeats, warmup, inner = ctx.pick(25, 10, 2), ctx.pick(3, 2, 1), ctx.pick(3, 2, 1)
    layer_steps = ctx.pick(20, 8, 2)
    trainer = build_trainer(batch, config_path)
    trainer.train_step()  # builds the model, compiles the kernels, starts numba's pool
    x, labels = _first_batch(trainer)
    cfg = trainer.config
    opt = cfg.train.optimizer
    fns = {"distbn": trainer.train_step}
    torch_steps = {}
    if torch is not None:
        if opt.name != "sgd":
            raise ValueError(f"step: the torch side runs SGD; the config's optimizer is "
                             f"{opt.name!r}")
        for impl, cl in (("torch_nchw", False), ("torch_channels_last", True)):
            net, names = torch_model(trainer.model, torch)
            torch_steps[impl] = (_TorchStep(torch, net, x, labels, cl, opt.learning_rate,
                                            opt.momentum), names)
            fns[impl] = torch_steps[impl][0]
    saved = (torch.get_num_threads() if torch is not None else None)
    records = []
    base = {"config": Path(config_path).name if config_path else "quickstart.yaml",
            "batch": batch, "dtype": cfg.model.dtype, "backend": backend_name()}
    try:
        for count in list(threads or [1]):
            used = _set_threads(int(count), torch)
            params = {**base, "threads": used,
                      "torch_threads": torch.get_num_threads() if torch is not None else None}
            samples = sample_interleaved(fns, repeats, warmup, inner, settle=1)
            for impl, s in samples.items():
                records.append(_one(s * _US, "step.train_step", "time", "us",
                                    {**params, "impl": impl}, warmup))
            for ref in fns:
                if ref != "distbn":
                    records.append(_one(samples["distbn"] / samples[ref], "step.train_step",
                                        f"ratio_vs_{ref}", "ratio", params, warmup))
            line = ", ".join(f"{impl} {np.median(s) * 1e3:.2f} ms" for impl, s in samples.items())
            if "torch_channels_last" in samples:
                ratio = np.median(samples["distbn"] / samples["torch_channels_last"])
                line += f"; distbn/torch(channels_last) {ratio:.2f}"
            ctx.progress(f"step batch {batch}, {used} thread(s), {backend_name()}: {line}")
            records += _breakdowns(trainer, torch_steps, layer_steps, params)
    finally:
        if torch is not None:
            torch.set_num_threads(saved)
    for rec in records:
        rec["params"]["kernel_backend_threads"] = backend_info().get("threads")
    return records


def _first_batch(trainer):
    """The inputs and labels of the trainer's step-0 batch (the torch side's fixed batch)."""
    _, _, indices = trainer.batches.batch_at(0)
    return trainer.dataset.x_train[indices], trainer.dataset.y_train[indices]


def _breakdowns(trainer, torch_steps, steps, params) -> list[dict]:
    """`step.layer` records: forward and backward time per layer of each implementation,
    plus a "(rest of step)" row (loss, gradient norm, optimizer, the model's own loop)."""
    out = []
    acc, totals = _distbn_layers(trainer, steps)
    parts = [("distbn", acc, totals, {la.name: type(la).__name__ for la in trainer.model.layers})]
    for impl, (step, names) in torch_steps.items():
        per, ttot = _torch_layers(step, names, steps)
        kinds = {name: _torch_kind(step.net[i]) for name, i in names}
        parts.append((impl, per, ttot, kinds))
    for impl, per, totals, kinds in parts:
        p = {**params, "impl": impl, "steps": steps}
        layer_sum = np.zeros(len(totals))
        for index, (name, passes) in enumerate(per.items()):
            for pass_, seconds in passes.items():
                s = np.asarray(seconds)
                layer_sum += s
                out.append(make_record("step.layer", f"{pass_}_time", Stats(s * _US), "us", 1,
                                       {**p, "layer": name, "type": kinds.get(name, "?"),
                                        "index": index}))
        rest = np.asarray(totals) - layer_sum
        out.append(make_record("step.layer", "rest_time", Stats(rest * _US), "us", 1,
                               {**p, "layer": "(rest of step)", "type": "",
                                "index": len(per)}))
        out.append(make_record("step.breakdown_total", "time", Stats(np.asarray(totals) * _US),
                               "us", 1, p))
    return out


def _torch_kind(module) -> str:
    """"AdaptiveAvgPool2d+Flatten" for a nested Sequential, else the module's class."""
    if type(module).__name__ == "Sequential":
        return "+".join(type(m).__name__ for m in module)
    return type(module).__name__
