"""`distbn compare`: what replica-local BatchNormalization statistics cost, measured.

The same config is trained twice at the same number of ranks, from the same seed, on
the same global batches in the same order, with every BatchNormalization layer
replica-local and then synchronized. Gradients are all-reduced in both modes, so the two
runs differ only in the statistics BN normalises with (and keeps as moving averages).
A one-process run of the synchronized config (`--reference`) shows what N synchronized
ranks must reproduce.

Measured every `every` steps, after the step, for each BN layer:

* per-rank batch statistics against the global batch's (a property of the data and the
  per-replica batch size, so both modes have it; synchronized mode normalises with the
  global statistics, replica-local mode with the rank's own):
  `mean_dev` = max over ranks of the channel mean of |mu_r - mu| / sqrt(var + eps),
  `var_ratio` = mean over ranks and channels of (var_r + eps) / (var + eps),
  `var_dev` = max over ranks of the channel mean of |log((var_r + eps) / (var + eps))|;
* the spread of the moving statistics across replicas (what evaluation averages away,
  exactly 0 when synchronized): `moving_mean_spread` = max over channels of the std
  across replicas of the moving mean / sqrt(mean moving variance), and
  `moving_var_spread` = max over channels of the std of the moving variance / its mean;
* the training loss and accuracy (training mode, summed over ranks since the last record).

Each record holds every layer's values under "layers"; its top-level divergences are the
first BN layer's (deeper layers' inputs have been normalised by the mode already, so
their per-rank offsets say as much about the mode as about the data), its spreads the
maximum over layers.

Each mode is one `Trainer.fit` with a `StudyCallback` (no loop of its own): the
training loss and accuracy come from the step's local sums `train_step()` returns, the
per-rank statistics from each BN layer's public `batch_moments` (computed on access from
the input the layer keeps for its backward pass), gathered with one `allgather_object`
per measurement, on the world strategy but outside the training collectives, so
measuring changes no result.

`distbn compare CONFIG --out DIR` run as one process launches
`mpiexec -n N python -m mpi4py -m distbn compare --part modes ...`, which trains both
modes one after the other and writes DIR/study.jsonl, then (`--reference`) a plain
one-process `--part reference` that appends to it; each part runs in its own process
group with one BLAS thread per process and is killed on timeout. The parent then writes
DIR/report.md and DIR/report.png (`study_report`). Under mpiexec/srun with several ranks
the command trains both modes itself and rank 0 runs the reference and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from distbn.distribute.launch import current_world_size, finalize_mpi_for_exit
from distbn.jsonl import JsonlWriter
from distbn.train.callbacks import Callback

__all__ = [
    "MODES",
    "REFERENCE",
    "RECORDS_FILE",
    "StudyError",
    "add_parser",
    "cmd_compare",
    "mode_config",
    "layer_divergence",
    "StatsProbe",
    "StudyCallback",
    "train_mode",
    "default_every",
]

#: The two modes, in the order they are trained.
MODES = ("replica-local", "synchronized")
#: The one-process run of the synchronized config (`--reference`).
REFERENCE = "reference"
RECORDS_FILE = "study.jsonl"
_PREFIX = "distbn compare"
# Records per mode when --every is not given: enough for smooth curves, few enough that
# measuring (one small allgather each) costs next to nothing.
_TARGET_RECORDS = 400
# Progress lines per mode on stderr.
_PROGRESS_LINES = 10
_DEFAULT_TIMEOUT = 1800.0

_USAGE = ("distbn compare [CONFIG] --out DIR [--ranks N] [--reference] [--set KEY.PATH=VALUE ...]\n"
          "                      [--every K] [--timeout S] [--mpiexec PATH]")
_DESCRIPTION = """\
Train CONFIG with replica-local and with synchronized BatchNormalization at the same
number of ranks, seed, data order and global batch, and measure how far each rank's
batch statistics are from the global batch's, how far the replicas' moving statistics
drift apart, and what that does to loss and accuracy (test accuracy uses the moving
statistics averaged over replicas, as the trainer's model.npz holds them).

Run as one process it launches the ranks through mpiexec (one thread per rank); under
mpiexec/srun with several ranks it runs at that job's size. Writes DIR/report.md (one row
per mode), DIR/report.png (curves per mode, when matplotlib is installed) and
DIR/study.jsonl (every record)."""


class StudyError(ValueError):
    """A problem with the study's arguments or config; the message quotes the value."""


# --------------------------------------------------------------------------------------
# Configs of the two modes


def _is_bn_type(type_name: str) -> bool:
    from distbn.layers import registry

    try:
        return registry.get_layer_class(type_name).has_moving_statistics
    except ValueError:
        return False  # the builder reports unknown types with their YAML line


def mode_config(config_path, overrides=(), synchronized=True):
    """The config with every BatchNormalization layer synchronized or replica-local.

    `model.synchronized` is set, and so is `synchronized` of every BN entry that gives its
    own, so no layer escapes the comparison.

    Args:
        config_path: the YAML config.
        overrides: "KEY.PATH=VALUE" strings (`--set`), applied first.
        synchronized: the mode.

    Returns:
        The validated `Config`. Raises `ConfigError` for a bad config, `StudyError` when
        the config sets a BN sync group (the study compares with whole-world statistics).
    """
    from distbn.train.config import load_config

    overrides = list(overrides or ())
    base = load_config(config_path, overrides)
    if base.strategy.sync_group is not None:
        raise StudyError(f"{config_path}: strategy.sync_group: distbn compare compares "
                         "replica-local with whole-world synchronized statistics, so it "
                         f"must be null, got {base.strategy.sync_group!r}")
    flag = "true" if synchronized else "false"
    extra = [f"model.synchronized={flag}"]
    extra += [f"model.layers.{spec.index}.synchronized={flag}" for spec in base.model.layers
              if _is_bn_type(spec.type) and "synchronized" in spec.kwargs]
    return load_config(config_path, overrides + extra)


def default_every(total_steps: int) -> int:
    """Steps between records when --every is not given (about 400 records per mode).

    Args:
        total_steps: the run's optimizer steps.

    Returns:
        An int >= 1.
    """
    return max(1, math.ceil(total_steps / _TARGET_RECORDS))


# --------------------------------------------------------------------------------------
# Measuring


def layer_divergence(counts, means, m2s, moving_means, moving_vars, epsilon) -> dict:
    """How far the replicas' statistics of one BN layer are from the global ones.

    Args:
        counts, means, m2s: (ranks, channels) float64: each rank's count, mean and centred
            sum of squares M2 of its local batch (`ops.batch_norm.local_mean_m2`).
        moving_means, moving_vars: (ranks, channels): each replica's moving statistics.
        epsilon: the layer's epsilon (added to both variances of the ratios).

    Returns:
        {"mean_dev", "var_ratio", "var_dev", "moving_mean_spread", "moving_var_spread"}
        as floats (see the module docstring). Ranks with an empty batch and channels
        without any position are left out; with nothing left, mean_dev and var_dev are
        0 and var_ratio is 1.
    """
    # A diverging run feeds NaN/inf here; its records then say so without warnings.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _layer_divergence(counts, means, m2s, moving_means, moving_vars, epsilon)


def _layer_divergence(counts, means, m2s, moving_means, moving_vars, epsilon) -> dict:
    counts, means, m2s = (np.asarray(a, dtype=np.float64) for a in (counts, means, m2s))
    moving_means = np.asarray(moving_means, dtype=np.float64)
    moving_vars = np.asarray(moving_vars, dtype=np.float64)
    if not counts.shape == means.shape == m2s.shape == moving_means.shape == moving_vars.shape \
            or counts.ndim != 2:
        raise ValueError(f"layer_divergence: expected equal (ranks, channels) arrays, got "
                         f"shapes {[a.shape for a in (counts, means, m2s, moving_means)]} "
                         f"and {moving_vars.shape}")
    total = counts.sum(axis=0)
    safe_total = np.maximum(total, 1.0)
    mean = (counts * means).sum(axis=0) / safe_total
    # Chan's pooled M2: exact, no cancellation (the local M2s are centred already).
    var = (m2s + counts * np.square(means - mean)).sum(axis=0) / safe_total
    var_r = m2s / np.maximum(counts, 1.0)
    denom = var + epsilon
    used = (counts > 0) & (total > 0)  # (ranks, channels)
    dev = np.abs(means - mean) / np.sqrt(denom)
    ratio = (var_r + epsilon) / denom
    log_ratio = np.abs(np.log(ratio))
    per_rank = used.sum(axis=1)
    ranks = per_rank > 0
    if ranks.any():
        mean_dev = float(np.max((dev * used).sum(axis=1)[ranks] / per_rank[ranks]))
        var_dev = float(np.max((log_ratio * used).sum(axis=1)[ranks] / per_rank[ranks]))
        var_ratio = float(ratio[used].mean())
    else:
        mean_dev, var_dev, var_ratio = 0.0, 0.0, 1.0
    # Deviations from replica 0 first: identical replicas give exactly 0, whatever the
    # rounding of a mean over replicas would do.
    d_mean = moving_means - moving_means[0]
    d_var = moving_vars - moving_vars[0]
    avg_var = np.maximum(moving_vars.mean(axis=0), np.finfo(np.float64).tiny)
    mean_spread = np.std(d_mean, axis=0) / np.sqrt(avg_var)
    var_spread = np.std(d_var, axis=0) / avg_var
    return {"mean_dev": mean_dev, "var_ratio": var_ratio, "var_dev": var_dev,
            "moving_mean_spread": float(np.max(mean_spread, initial=0.0)),
            "moving_var_spread": float(np.max(var_spread, initial=0.0))}


class StatsProbe:
    """This rank's batch and moving statistics of every BN layer after a training step.

    Uses the layers' public surface only: `has_moving_statistics` picks them,
    `batch_moments` gives the moments of their last training input.

    Args:
        model: the trained model (its `layers` are searched for layers with moving
            statistics).

    Attributes:
        layers: the BN layers measured (frozen ones are skipped: they use no batch
            statistics).
        names: their names.
    """

    def __init__(self, model):
        self.layers = [la for la in model.layers if la.has_moving_statistics and la.trainable]
        self.names = [la.name for la in self.layers]

    def local(self) -> list[tuple]:
        """Per layer `(count, mean, m2, moving_mean, moving_var)`: flat float64 arrays.

        The layer's `batch_moments` (computed on access from the input of its last
        training call), so the layer's own arithmetic and collectives are untouched.
        """
        out = []
        for la in self.layers:
            moments = la.batch_moments
            if moments is None:
                raise RuntimeError(f"StatsProbe: layer {la.name!r} has no training-mode call "
                                   "to measure; call it after a training step")
            out.append(tuple(np.asarray(a, dtype=np.float64).ravel() for a in (
                *moments, la.moving_mean.numpy(), la.moving_variance.numpy())))
        return out

    def divergence(self, gathered) -> dict:
        """Per-layer `layer_divergence` of the ranks' `local()` results.

        Args:
            gathered: a list indexed by rank of `local()` results.

        Returns:
            {layer name: {metric: value}}.
        """
        out = {}
        for i, la in enumerate(self.layers):
            parts = [np.stack([g[i][k] for g in gathered]) for k in range(5)]
            out[la.name] = layer_divergence(*parts, epsilon=la.epsilon)
        return out


def _max_over_layers(layers: dict, key: str) -> float:
    return max((v[key] for v in layers.values()), default=0.0)


def _fmt(value, spec=".4f") -> str:
    return "n/a" if value is None else format(value, spec)


class StudyCallback(Callback):
    """Measures one mode of the study on `Trainer.fit` (every rank runs it).

    After each step it adds the step's local loss sum, correct count and samples
    (`logs`) to a window; every `every` steps (and at the last) one `allgather_object`
    of [window, `StatsProbe.local()`] gives rank 0 a "step" record. Each evaluation
    `fit` makes is an "eval" record; at the end it evaluates the train split too
    (inference mode, replica-local statistics averaged as for model.npz) and writes the
    "summary" record. Measuring is outside the training collectives and changes no
    result.

    Args:
        mode: the label of the records ("replica-local", "synchronized" or "reference").
        every: steps between records (default `default_every` of the run's steps).
        emit: rank 0 calls it with every record (a dict); None: records are only kept.
        err: stream for the progress lines (rank 0; default sys.stderr).

    Attributes:
        records: rank 0's records, in order (empty elsewhere).
        summary: rank 0's summary record once training ended ({} elsewhere).
    """

    def __init__(self, mode, every=None, emit=None, err=None):
        self.mode = mode
        self.every = every
        self.emit = emit
        self.err = err or sys.stderr
        self.records: list[dict] = []
        self.summary: dict = {}

    def _record(self, rec) -> dict:
        rec = {"type": rec.pop("type"), "mode": self.mode, **rec}
        self.records.append(rec)
        if self.emit is not None:
            self.emit(rec)
        return rec

    def on_train_begin(self, trainer) -> None:
        from distbn.bench.study_report import per_replica_batch

        self.rank = trainer.strategy.replica_id
        self.size = trainer.strategy.num_replicas_in_sync
        self.probe = StatsProbe(trainer.model)
        self.total = trainer.total_steps
        self.every = self.every or default_every(self.total)
        self.tell = max(1, self.total // _PROGRESS_LINES)
        self.first_step = trainer.step + 1
        self.window = np.zeros(3)  # this rank's [loss sum, correct, count] since a record
        self.train_s = self.measure_s = self.first_s = 0.0
        self.last = None
        self.test = None
        gb = trainer.config.train.global_batch_size
        if self.rank == 0:
            print(f"{_PREFIX}: {self.mode}: {self.size} rank(s), global batch {gb} "
                  f"({per_replica_batch(gb, self.size)} per replica), {self.total} steps, "
                  f"{len(self.probe.layers)} BN layer(s)", file=self.err, flush=True)
        self.start = self._mark = time.perf_counter()

    def on_step_end(self, trainer, step, logs) -> None:
        now = time.perf_counter()
        # The first step pays one-off costs (kernel compilation, first-touch memory) that
        # would otherwise dominate short runs: kept apart from the training time.
        if step == self.first_step:
            self.first_s = now - self._mark
        else:
            self.train_s += now - self._mark
        self.window += (logs["loss_sum"], logs["correct"], logs["samples"])
        if step % self.every == 0 or step == self.total:
            self._measure(trainer.strategy, step)
            self.measure_s += time.perf_counter() - now
        last = self.last
        if self.rank == 0 and (step % self.tell == 0 or step == self.total) and last is not None:
            print(f"{_PREFIX}: {self.mode}: step {step}/{self.total}: loss "
                  f"{_fmt(last['loss'])} acc {_fmt(last['accuracy'])}, batch mean dev "
                  f"{last['mean_dev']:.3f} (first BN), moving-mean spread "
                  f"{last['moving_mean_spread']:.3g} ({time.perf_counter() - self.start:.1f} s)",
                  file=self.err, flush=True)
        self._mark = time.perf_counter()

    def _measure(self, world, step) -> None:
        """One step record (collective: one allgather_object)."""
        window, self.window = self.window, np.zeros(3)
        gathered = world.allgather_object((window, self.probe.local()),
                                          name="study.measure")
        if self.rank != 0:
            return
        window = np.sum([g[0] for g in gathered], axis=0)
        layers = self.probe.divergence([g[1] for g in gathered])
        self.last = self._record({
            "type": "step", "step": step,
            "loss": window[0] / window[2] if window[2] else None,
            "accuracy": window[1] / window[2] if window[2] else None,
            "samples": int(window[2]),
            # The first BN layer's: below it, replica-local normalisation has already
            # removed each rank's offsets, so deeper layers' numbers measure the mode as
            # much as the data (all are under "layers").
            **{k: layers[self.probe.names[0]][k] for k in ("mean_dev", "var_ratio",
                                                            "var_dev")},
            "moving_mean_spread": _max_over_layers(layers, "moving_mean_spread"),
            "moving_var_spread": _max_over_layers(layers, "moving_var_spread"),
            "layers": layers,
            "train_seconds": self.train_s,
        })

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.test = metrics
        if self.rank == 0:
            self._record({"type": "eval", "step": step, "split": "test",
                          "loss": metrics["loss"], "accuracy": metrics["accuracy"],
                          "samples": metrics["samples"]})
        self._mark = time.perf_counter()  # evaluation is not training time

    def on_train_end(self, trainer, summary) -> None:
        from distbn.bench.study_report import per_replica_batch

        train_inf = trainer.evaluate("train")  # collective: every rank runs this hook
        wall = time.perf_counter() - self.start
        if self.rank != 0:
            return
        test, total, every, size = self.test, self.total, self.every, self.size
        gb = trainer.config.train.global_batch_size
        steps = [r for r in self.records if r["type"] == "step"]
        # Training-mode loss/accuracy over the last tenth of the steps (at least one
        # record).
        tail = [r for r in steps if r["step"] > total - max(total // 10, every)] or steps[-1:]
        n = sum(r["samples"] for r in tail)
        self.summary = self._record({
            "type": "summary", "ranks": size, "global_batch_size": gb,
            "per_replica_batch": per_replica_batch(gb, size), "steps": total, "every": every,
            "train_loss": sum(r["loss"] * r["samples"] for r in tail if r["samples"]) / n
            if n else None,
            "train_accuracy": sum(r["accuracy"] * r["samples"] for r in tail if r["samples"])
            / n if n else None,
            "train_eval_loss": train_inf["loss"], "train_eval_accuracy": train_inf["accuracy"],
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_samples": test["samples"],
            "mean_dev": float(np.mean([r["mean_dev"] for r in steps])),
            "var_ratio": float(np.mean([r["var_ratio"] for r in steps])),
            "var_dev": float(np.mean([r["var_dev"] for r in steps])),
            "moving_mean_spread": steps[-1]["moving_mean_spread"],
            "moving_var_spread": steps[-1]["moving_var_spread"],
            "layers": {name: {k: float(np.mean([r["layers"][name][k] for r in steps]))
                              for k in ("mean_dev", "var_ratio", "var_dev")}
                       | {k: steps[-1]["layers"][name][k]
                          for k in ("moving_mean_spread", "moving_var_spread")}
                       for name in self.probe.names},
            "train_seconds": self.train_s, "first_step_seconds": self.first_s,
            "measure_seconds": self.measure_s, "wall_seconds": wall,
        })
        print(f"{_PREFIX}: {self.mode}: done in {wall:.1f} s (training steps after the first "
              f"{self.train_s:.1f} s): test loss "
              f"{_fmt(test['loss'])} acc {_fmt(test['accuracy'])}, train (inference) acc "
              f"{_fmt(train_inf['accuracy'])}", file=self.err, flush=True)


def train_mode(config, mode, world, dataset=None, every=None, emit=None, err=None) -> dict:
    """Train one mode with `Trainer.fit` and a `StudyCallback` (collective: every rank
    calls it).

    The trainer's own progress output is off (`logging.progress: none`; its summary
    lines go to `err`): the callback reports the study's progress.

    Args:
        config: the mode's `Config` (`mode_config`).
        mode: its label ("replica-local", "synchronized" or "reference").
        world: the strategy whose replicas train (every rank of it calls this).
        dataset: a `builder.Dataset` shared between modes (default: load it).
        every: steps between records (default `default_every`).
        emit: rank 0 calls it with every record (a dict); None: records are only kept.
        err: stream for the progress lines (rank 0; default sys.stderr).

    Returns:
        On rank 0 the mode's summary record; on other ranks {}.
    """
    from distbn.train.trainer import Trainer

    err = err or sys.stderr
    config = dataclasses.replace(
        config, logging=dataclasses.replace(config.logging, progress="none"))
    trainer = Trainer(config, strategy=world, run_dir=None, out=err, dataset=dataset)
    callback = StudyCallback(mode, every=every, emit=emit, err=err)
    trainer.fit(callbacks=[callback])
    return callback.summary


# --------------------------------------------------------------------------------------
# Records file


def _meta(args, ranks) -> dict:
    import distbn

    return {"type": "meta", "command": _command_line(args), "config": str(args.config),
            "overrides": list(args.set or ()), "ranks": ranks,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "distbn": distbn.__version__}


def _command_line(args) -> str:
    argv = ["distbn", "compare", str(args.config), "--out", str(args.out)]
    if args.ranks is not None:
        argv += ["--ranks", str(args.ranks)]
    if args.reference:
        argv.append("--reference")
    for item in args.set or ():
        argv += ["--set", item]
    if args.every is not None:
        argv += ["--every", str(args.every)]
    return shlex.join(argv)


# --------------------------------------------------------------------------------------
# The command


def add_parser(sub) -> None:
    """Add the `compare` subcommand to the `distbn` subparsers.

    Args:
        sub: the object `ArgumentParser.add_subparsers()` returned.
    """
    p = sub.add_parser("compare", help="replica-local vs synchronized BN statistics study",
                       usage=_USAGE, description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", nargs="?",
                   help="the YAML config (default: configs/study.yaml, shipped in the package)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where report.md, report.png and study.jsonl go")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="ranks of both modes (>= 2; default 2, or the job's size under mpiexec)")
    p.add_argument("--reference", action="store_true",
                   help="also train the synchronized config in one process")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable; VALUE is read as YAML)")
    p.add_argument("--every", type=int, metavar="K",
                   help="measure every K steps (default: about 400 records per mode)")
    p.add_argument("--timeout", type=float, default=_DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds allowed for all the training (default {_DEFAULT_TIMEOUT:g})")
    p.add_argument("--mpiexec", metavar="PATH",
                   help="the mpiexec to launch with (default: $DISTBN_MPIEXEC, the venv's, PATH)")
    # Internal: the parts the parent process starts ("modes" under mpiexec, "reference"
    # as one process with one BLAS thread); the parent writes the report.
    p.add_argument("--part", choices=("modes", "reference"), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_compare)


def _error(message: str) -> int:
    print(f"{_PREFIX}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _resolve_config(args) -> None:
    """CONFIG left out: the packaged study config. A clone's path that this installation
    lacks (e.g. configs/study.yaml outside the clone) gets a hint to the packaged copy."""
    from distbn.configs import NAMES, packaged_config

    if args.config is None:
        args.config = str(packaged_config("study.yaml"))
        return
    path = Path(args.config)
    if not path.exists() and path.name in NAMES:
        raise StudyError(f"config {args.config!r} not found; distbn ships this config: "
                         f"leave CONFIG out for the study config, or pass "
                         f"{str(packaged_config(path.name))!r}")


def _check_args(args, size) -> tuple[list, int, object]:
    """Validate arguments and both configs. Returns (mode configs, ranks, dataset)."""
    from distbn.train import builder

    if args.part == "modes" and size == 1:
        raise StudyError("--part modes is internal: the ranks that `distbn compare` starts "
                         "through mpiexec use it; leave it out")
    if args.part == "reference" and size > 1:
        raise StudyError(f"--part reference is internal and runs in one process, got an MPI "
                         f"job of {size} ranks; leave it out")
    _resolve_config(args)
    if args.every is not None and args.every < 1:
        raise StudyError(f"--every must be >= 1, got {args.every}")
    if args.timeout is not None and not args.timeout > 0:
        raise StudyError(f"--timeout must be > 0 seconds, got {args.timeout}")
    ranks = args.ranks if args.ranks is not None else (size if size > 1 else 2)
    if ranks < 2:
        raise StudyError(f"--ranks must be >= 2 (one rank has nothing to compare), got {ranks}")
    if size > 1 and ranks != size:
        raise StudyError(f"--ranks {ranks} differs from this MPI job's {size} ranks; leave it "
                         "out under mpiexec/srun")
    configs = [mode_config(args.config, args.set, synchronized=(m == "synchronized"))
               for m in MODES]
    gb = configs[0].train.global_batch_size
    if gb < ranks:
        raise StudyError(f"train.global_batch_size ({gb}) is smaller than --ranks ({ranks}): "
                         "some replicas would have no samples to take statistics of")
    # The model must build: a shape error should end the command here, not in the ranks.
    dataset = builder.load_dataset(configs[0])
    builder.total_steps(configs[0], len(dataset.y_train))
    from distbn.distribute import LocalStrategy

    model = builder.build_model(configs[0], dataset.input_shape, dataset.num_classes,
                                LocalStrategy())
    if not StatsProbe(model).layers:
        types = sorted({spec.type for spec in configs[0].model.layers})
        raise StudyError(f"{args.config}: the model has no trainable BatchNormalization "
                         f"layer to compare (layer types: {', '.join(types)})")
    return configs, ranks, dataset


def cmd_compare(args: argparse.Namespace) -> int:
    """`distbn compare`: train both modes (launching mpiexec if needed) and report.

    Args:
        args: the parsed arguments.

    Returns:
        The exit code: 0 done, 2 usage or config error, 1 failure (a rank failed or
        the run timed out).
    """
    from distbn.train.config import ConfigError
    from distbn.train.data import DataError

    size = current_world_size()
    try:
        configs, ranks, dataset = _check_args(args, size)
    except (StudyError, ConfigError, DataError) as exc:
        if size > 1:
            from distbn.distribute import get_strategy

            # Every rank finds the same problem: rank 0 says it, all exit together.
            if get_strategy().replica_id == 0:
                _error(str(exc))
            finalize_mpi_for_exit()
            return 2
        return _error(str(exc))
    out = Path(args.out)
    if args.part == "reference":
        return _run_reference(args, configs[1], out, dataset)
    if size > 1:
        return _run_ranks(args, configs, ranks, out, dataset)
    start = time.perf_counter()
    try:
        _prepare_out(out)
    except OSError as exc:
        return _error(f"cannot write --out {str(out)!r}: {exc}")
    deadline = time.monotonic() + args.timeout
    code = _launch_part(args, "modes", ranks, out, deadline)
    if not code and args.reference:
        code = _launch_part(args, "reference", ranks, out, deadline)
    if code:
        return code
    return _write_report(out, start)


def _prepare_out(out: Path) -> None:
    """Create DIR and remove a previous study's files: no stale report can pass for new."""
    from distbn.bench.study_report import PLOT_FILE, REPORT_FILE

    out.mkdir(parents=True, exist_ok=True)
    for name in (RECORDS_FILE, REPORT_FILE, PLOT_FILE):
        (out / name).unlink(missing_ok=True)


def _run_ranks(args, configs, ranks, out, dataset) -> int:
    """Both modes on this MPI job's ranks; rank 0 writes the records.

    Started by the parent (`--part modes`), that is all; started by the user under
    mpiexec/srun, rank 0 then runs the reference itself (if asked) and writes the report.
    """
    from distbn.distribute import get_strategy

    world = get_strategy()
    rank = world.replica_id
    writer = None
    start = time.perf_counter()
    if rank == 0:
        if args.part is None:
            _prepare_out(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
        writer = JsonlWriter(out / RECORDS_FILE, append=False)
        writer(_meta(args, ranks))
    world.barrier(name="study.start")
    from distbn.train.trainer import TrainingError

    try:
        for mode, config in zip(MODES, configs, strict=True):
            train_mode(config, mode, world, dataset=dataset, every=args.every, emit=writer)
    except TrainingError as exc:
        # Raised on every rank at the same step (the gradient norm is all-reduced), so
        # all ranks leave together with the message printed once.
        if rank == 0:
            print(f"{_PREFIX}: error: {mode}: {exc}", file=sys.stderr, flush=True)
        finalize_mpi_for_exit()
        return 1
    finally:
        if writer is not None:
            writer.close()
    if rank != 0 or args.part is not None:
        return 0
    if args.reference:
        # The other ranks are done; this one trains alone with the user's thread settings.
        _run_reference(args, configs[1], out, dataset)
    return _write_report(out, start)


def _run_reference(args, config, out, dataset) -> int:
    """The synchronized config in this one process, appended to DIR/study.jsonl."""
    from distbn.distribute import LocalStrategy

    path = out / RECORDS_FILE
    if not path.is_file():
        return _error(f"{path} does not exist: the reference is added to a study's records")
    from distbn.train.trainer import TrainingError

    writer = JsonlWriter(path, append=True)
    try:
        train_mode(config, REFERENCE, LocalStrategy(), dataset, every=args.every, emit=writer)
    except TrainingError as exc:
        print(f"{_PREFIX}: error: {REFERENCE}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        writer.close()
    return 0


def _part_argv(args, part, ranks, out) -> list[str]:
    argv = ["-m", "distbn", "compare", str(args.config), "--out", str(out), "--ranks",
            str(ranks), "--part", part]
    if args.reference:  # for the command line the records keep
        argv.append("--reference")
    for item in args.set or ():
        argv += ["--set", item]
    if args.every is not None:
        argv += ["--every", str(args.every)]
    return argv


def _launch_part(args, part, ranks, out, deadline) -> int:
    """Run one part in a child process group with one BLAS thread per process.

    "modes" goes through `mpiexec -n ranks python -m mpi4py`; "reference" is a plain
    `python` (one process, no MPI; `ranks` only travels for the argument checks). The
    group is killed when `deadline` passes.
    """
    from distbn.launcher import run_group
    from distbn.mpiexec import mpiexec_command, one_thread_env

    if part == "modes":
        try:
            cmd = mpiexec_command(ranks, [sys.executable, "-m", "mpi4py",
                                          *_part_argv(args, part, ranks, out)],
                                  mpiexec=args.mpiexec)
        except FileNotFoundError as exc:
            return _error(str(exc))
        what = f"the {ranks}-rank run"
    else:
        cmd = [sys.executable, *_part_argv(args, part, ranks, out)]
        what = "the one-process reference run"
    print(f"{_PREFIX}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # Its own process group: on timeout or Ctrl-C the whole group (mpiexec and every
    # rank) is stopped (distbn.launcher's policy).
    res = run_group(cmd, env=one_thread_env(), timeout=max(deadline - time.monotonic(), 0.1))
    if res.timed_out:
        print(f"{_PREFIX}: error: {what} passed --timeout {args.timeout:g} s and was killed",
              file=sys.stderr, flush=True)
        return 1
    if res.interrupted:
        return res.exit_code
    if res.returncode:
        print(f"{_PREFIX}: error: {what} failed ({res.describe()})", file=sys.stderr,
              flush=True)
        return 2 if res.returncode == 2 else 1
    return 0


def _write_report(out, start) -> int:
    """report.md and report.png from DIR/study.jsonl; the table on stdout."""
    from distbn.bench import study_report

    path = out / RECORDS_FILE
    if not path.is_file():
        return _error(f"the ranks wrote no {path}")
    records = study_report.read_records(path)
    paths = study_report.write_report(records, out)
    if study_report.PLOT_FILE not in {p.name for p in paths}:
        from distbn.plot import NO_MATPLOTLIB

        print(f"{_PREFIX}: note: {NO_MATPLOTLIB}", file=sys.stderr, flush=True)
    print(f"{_PREFIX}: done in {time.perf_counter() - start:.0f} s -> "
          + ", ".join(str(p) for p in [*paths, path]), file=sys.stderr, flush=True)
    print(study_report.render_table(records), flush=True)
    return 0
