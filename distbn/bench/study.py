"""`distbn compare`: what the normalization batch does to BatchNormalization, measured.

The same config is trained in several *modes* (`distbn.bench.modes`), each a
normalization group: replica-local BN, BN synchronized over sync groups of K ranks or
over all ranks, ghost batches of S samples, GroupNorm/LayerNorm in place of every BN.
All train at the same number of ranks, from the same seed, on the same global batches in
the same order; gradients are all-reduced in every mode, so the modes differ only in
the statistics the normalization layers use. The default modes, `local,sync`, are the
original two-mode study. Each mode's *normalization batch size* (samples per
normalization group) is recorded. `--seeds` repeats everything per seed (the seed also
generates the `patterns` data); the report gives mean +- std over seeds. A
one-process run of the synchronized config (`--reference`) shows what N synchronized
ranks must reproduce.

At the end of each BN mode the model is evaluated twice on the test split and the whole
training split (inference mode): with the EMA moving statistics (averaged over replicas,
what model.npz holds) and with PreciseBN population statistics
(`distbn.train.precise_bn.recompute_bn_statistics` over a fixed schedule of training
batches, pooled over all ranks), on a copy of the statistics, so training is untouched.

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
maximum over layers. GroupNorm/LayerNorm modes have no batch statistics: their records
hold the training loss and accuracy only.

Each mode is one `Trainer.fit` with a `StudyCallback` (no loop of its own): the
training loss and accuracy come from the step's local sums `train_step()` returns, the
per-rank statistics from each BN layer's public `batch_moments` (computed on access from
the input the layer keeps for its backward pass), gathered with one `allgather_object`
per measurement, on the world strategy but outside the training collectives, so
measuring changes no result.

A study config may carry a top-level `study:` section (`modes`, `seeds`,
`precise_bn_samples`), the defaults of the options of the same names; `distbn compare`
reads and removes it before validating the rest as a training config.

`distbn compare CONFIG --out DIR` run as one process launches
`mpiexec -n N python -m mpi4py -m distbn compare --part modes ...`, which trains every
seed and mode one after the other and writes DIR/study.jsonl, then (`--reference`) a plain
one-process `--part reference` that appends to it; each part runs in its own process
group with one BLAS thread per process and is killed on timeout. The parent then writes
DIR/report.md, DIR/report.png and DIR/error-vs-batch.png (`study_report`). Under
mpiexec/srun with several ranks the command trains the modes itself and rank 0 runs the
reference and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from distbn.bench.modes import (
    DEFAULT_MODES,
    MODE_SYNTAX,
    Mode,
    StudyError,
    bn_entries,
    check_modes,
    mode_overrides,
    normalization_batch,
    parse_modes,
)
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
    "read_study_section",
    "parse_seeds",
    "layer_divergence",
    "StatsProbe",
    "StudyCallback",
    "train_mode",
    "precise_bn_batches",
    "default_every",
]

#: The labels of the default modes (`local,sync`), in the order they are trained.
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
#: Training samples PreciseBN pools by default (capped at the training split): the
#: population statistics of a few thousand samples are within about 1% of the
#: whole set's for the layers here, at the cost of a few forward passes.
DEFAULT_PRECISE_SAMPLES = 4096
# PreciseBN's global batch: its statistics are pooled over every sample, so the batch
# only sets memory and speed; large batches keep numpy's per-call overhead small.
_PRECISE_BATCH = 256
_STUDY_KEYS = ("modes", "seeds", "precise_bn_samples")

_USAGE = ("distbn compare [CONFIG] --out DIR [--ranks N] [--modes M,M,...] [--seeds S]\n"
          "                      [--precise-bn-samples N] [--reference] "
          "[--set KEY.PATH=VALUE ...]\n"
          "                      [--every K] [--timeout S] [--mpiexec PATH]")
_DESCRIPTION = f"""\
Train CONFIG in several normalization modes at the same number of ranks, seed, data
order and global batch (default: replica-local and synchronized BatchNormalization), and
measure test error against the normalization batch size (samples per normalization
group), with the EMA moving statistics and with PreciseBN population statistics, the
train/test gap, how far each rank's batch statistics are from the global batch's and
how far the replicas' moving statistics drift apart.

Modes ({MODE_SYNTAX}):
local = replica-local BN; sync = BN synchronized over all ranks;
sync:K = over sync groups of K ranks; ghost:S = ghost batches of S samples per replica;
groupnorm[:G] = GroupNormalization (at most G groups, default 32) and layernorm =
LayerNormalization in place of every BN. --seeds 0,1,2 (those seeds) or --seeds 3 (three
seeds from the config's): every number is reported as mean +- std over seeds.

Run as one process it launches the ranks through mpiexec (one thread per rank); under
mpiexec/srun with several ranks it runs at that job's size. Writes DIR/report.md,
DIR/report.png (curves per mode) and DIR/error-vs-batch.png (when matplotlib is
installed) and DIR/study.jsonl (every record, per seed)."""


# --------------------------------------------------------------------------------------
# Configs of the modes


def read_study_section(path) -> tuple:
    """Split a config file into its training config and its optional `study:` section.

    The section's lines are blanked, not removed, so the training config's errors keep
    their line numbers.

    Args:
        path: the YAML file.

    Returns:
        (text, values, where): the text without the section (None when the file cannot
        be read or parsed: `load_config` then reports it), the section's values
        ({key: value}) and where each key is ({key: "FILE:LINE"}). Raises `StudyError`
        for a section that is not a mapping or holds an unknown key.
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, {}, {}
    if not isinstance(root, yaml.MappingNode):
        return text, {}, {}
    for key, node in root.value:
        if key.value != "study":
            continue
        at = f"{path}:{key.start_mark.line + 1}"
        if not isinstance(node, yaml.MappingNode):
            raise StudyError(f"{at}: study: expected a mapping of {', '.join(_STUDY_KEYS)}")
        values = yaml.safe_load(yaml.serialize(node))
        where = {}
        for k, _ in node.value:
            line = f"{path}:{k.start_mark.line + 1}"
            if k.value not in _STUDY_KEYS:
                raise StudyError(f"{line}: unknown key 'study.{k.value}' (known keys: "
                                 f"{', '.join(_STUDY_KEYS)})")
            where[k.value] = line
        # The section's last value ends it (the mapping's own end mark runs on over any
        # comments that follow, up to the next key).
        last = node.value[-1][1].end_mark if node.value else node.end_mark
        end = last.line + (1 if last.column else 0)
        lines = text.splitlines(keepends=True)
        for i in range(key.start_mark.line, min(end, len(lines))):
            lines[i] = "\n"
        return "".join(lines), values, where
    return text, {}, {}


def _load(config_path, overrides):
    from distbn.train.config import load_config, parse_config

    text, _, _ = read_study_section(config_path)
    if text is None:
        return load_config(config_path, overrides)  # its error names the problem
    return parse_config(text, source=os.fspath(config_path), overrides=overrides)


def mode_config(config_path, overrides=(), synchronized=True, mode=None, channels=None):
    """The config of one mode: every BatchNormalization layer replaced or reconfigured.

    `model.synchronized` is set, and so is `synchronized` of every BN entry that gives its
    own, so no layer escapes the comparison (see `modes.mode_overrides`).

    Args:
        config_path: the YAML config (its `study:` section, if any, is ignored).
        overrides: "KEY.PATH=VALUE" strings (`--set`), applied first.
        synchronized: without `mode`: the synchronized (True) or replica-local mode.
        mode: a `modes.Mode` (overrides `synchronized`).
        channels: {layer index: channels} of the BN layers, for groupnorm's groups.

    Returns:
        The validated `Config`. Raises `ConfigError` for a bad config, `StudyError` when
        the config sets a BN sync group (the modes set it) or `train.precise_bn` (the
        study evaluates PreciseBN itself, on a copy).
    """
    overrides = list(overrides or ())
    if mode is None:
        mode = Mode("sync" if synchronized else "local")
    base = _load(config_path, overrides)
    if base.strategy.sync_group is not None:
        raise StudyError(f"{config_path}: strategy.sync_group: distbn compare sets the sync "
                         "group per mode (sync:K in --modes), so it must be null, got "
                         f"{base.strategy.sync_group!r}")
    precise = getattr(base.train, "precise_bn", None)
    if precise is not None and precise.batches:
        raise StudyError(f"{config_path}: train.precise_bn.batches: distbn compare evaluates "
                         "the EMA and the PreciseBN statistics itself (--precise-bn-samples) "
                         "and trains on the EMA ones, so it must be 0, got "
                         f"{precise.batches!r}")
    return _load(config_path, overrides + mode_overrides(base, mode, channels))


def parse_seeds(value, base_seed: int, where: str = "--seeds") -> list[int]:
    """Parse `--seeds`: "0,1,2" (those seeds) or "3" (three seeds from `base_seed`).

    Args:
        value: a string, an int (a count) or a list of ints.
        base_seed: the config's `seed` (a count starts there).
        where: what to name in errors.

    Returns:
        The seeds, in order. Raises `StudyError` quoting a bad value.
    """
    if isinstance(value, bool):
        raise StudyError(f"{where}: expected seeds like 0,1,2 or a count like 3, got {value!r}")
    if isinstance(value, int):
        tokens, count = [value], True
    elif isinstance(value, str):
        tokens = [t.strip() for t in value.split(",")]
        count = len(tokens) == 1
    elif isinstance(value, (list, tuple)):
        tokens, count = list(value), False
    else:
        raise StudyError(f"{where}: expected seeds like 0,1,2 or a count like 3, got {value!r}")
    seeds = []
    for t in tokens:
        if isinstance(t, bool) or not (isinstance(t, int) or (isinstance(t, str)
                                                             and t.isdigit())):
            raise StudyError(f"{where}: seeds are non-negative integers (0,1,2) or one count "
                             f"(3), got {t!r} in {value!r}")
        seeds.append(int(t))
    if count:
        if seeds[0] < 1:
            raise StudyError(f"{where}: a count of seeds must be >= 1, got {value!r}")
        return [base_seed + i for i in range(seeds[0])]
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where}: a seed is given twice in {value!r}")
    return seeds


def default_every(total_steps: int) -> int:
    """Steps between records when --every is not given (about 400 records per mode).

    Args:
        total_steps: the run's optimizer steps.

    Returns:
        An int >= 1.
    """
    return max(1, math.ceil(total_steps / _TARGET_RECORDS))


def precise_bn_batches(dataset, global_batch: int, samples: int, seed: int, rank: int,
                       world: int) -> tuple:
    """PreciseBN's fixed schedule of training batches (`precise_bn.ScheduleBatches`).

    The first batches of the seed's schedule over the training split, global batches of
    max(global_batch, 256) samples (fewer when the split is smaller): the statistics
    pool every sample, so the batch only sets memory and speed. Every rank and every mode
    of a seed pools the same samples.

    Args:
        dataset: the `builder.Dataset`.
        global_batch: the training global batch size.
        samples: samples to pool (>= 1; capped at the training split).
        seed: the run's seed.
        rank, world: this replica and the number of replicas.

    Returns:
        (the re-iterable batches, their number, samples pooled).
    """
    from distbn.train.precise_bn import ScheduleBatches

    n = len(dataset.y_train)
    samples = min(int(samples), n)
    chunk = min(max(int(global_batch), _PRECISE_BATCH), samples)
    num = samples // chunk
    batches = ScheduleBatches(dataset.x_train, getattr(dataset, "mask_train", None), chunk,
                              seed, True, num, rank, world)
    return batches, num, num * chunk


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
    (inference mode, replica-local statistics averaged as for model.npz), then, for a
    model with BN and `precise_bn_samples`, recomputes the moving statistics with
    PreciseBN on a copy, evaluates both splits again and puts the EMA statistics back;
    then it writes the "summary" record. Measuring is outside the training collectives
    and changes no result.

    Args:
        mode: the label of the records ("replica-local", "sync:2", "reference", ...).
        every: steps between records (default `default_every` of the run's steps).
        emit: rank 0 calls it with every record (a dict); None: records are only kept.
        err: stream for the progress lines (rank 0; default sys.stderr).
        seed: the run's seed, written into every record (None: left out).
        norm_mode: the `modes.Mode` (for the normalization batch size; default: from
            the label, "synchronized" for the reference).
        precise_bn_samples: training samples PreciseBN pools (0: no PreciseBN).
        precise_strategy: the strategy PreciseBN pools over (default: the trainer's);
            the study passes the world, so every replica gets the same statistics.
        tag: prefix of the progress lines ("seed 1, 2/6").

    Attributes:
        records: rank 0's records, in order (empty elsewhere).
        summary: rank 0's summary record once training ended ({} elsewhere).
    """

    def __init__(self, mode, every=None, emit=None, err=None, seed=None, norm_mode=None,
                 precise_bn_samples=0, precise_strategy=None, tag=""):
        self.mode = mode
        self.every = every
        self.emit = emit
        self.err = err or sys.stderr
        self.seed = seed
        self.norm_mode = norm_mode or (parse_modes(mode)[0] if mode != REFERENCE
                                       else Mode("sync"))
        self.precise_bn_samples = int(precise_bn_samples or 0)
        self.precise_strategy = precise_strategy
        self.tag = f"{tag}: " if tag else ""
        self.records: list[dict] = []
        self.summary: dict = {}

    def _record(self, rec) -> dict:
        head = {"type": rec.pop("type"), "mode": self.mode}
        if self.seed is not None:
            head["seed"] = self.seed
        rec = {**head, **rec}
        self.records.append(rec)
        if self.emit is not None:
            self.emit(rec)
        return rec

    def _say(self, text) -> None:
        print(f"{_PREFIX}: {self.tag}{self.mode}: {text}", file=self.err, flush=True)

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
        gb = trainer.config.train.global_batch_size
        self.norm_batch = normalization_batch(self.norm_mode, self.size, gb)
        if self.rank == 0:
            self._say(f"{self.size} rank(s), global batch {gb} "
                      f"({per_replica_batch(gb, self.size)} per replica), normalization batch "
                      f"{self.norm_batch[1]}, {self.total} steps, "
                      f"{len(self.probe.layers)} BN layer(s)")
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
            stats = "" if last["mean_dev"] is None else (
                f", batch mean dev {last['mean_dev']:.3f} (first BN), moving-mean spread "
                f"{last['moving_mean_spread']:.3g}")
            self._say(f"step {step}/{self.total}: loss {_fmt(last['loss'])} acc "
                      f"{_fmt(last['accuracy'])}{stats} "
                      f"({time.perf_counter() - self.start:.1f} s)")
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
        first = layers[self.probe.names[0]] if self.probe.names else {}
        self.last = self._record({
            "type": "step", "step": step,
            "loss": window[0] / window[2] if window[2] else None,
            "accuracy": window[1] / window[2] if window[2] else None,
            "samples": int(window[2]),
            # The first BN layer's: below it, replica-local normalisation has already
            # removed each rank's offsets, so deeper layers' numbers measure the mode as
            # much as the data (all are under "layers"). None without BN.
            **{k: first.get(k) for k in ("mean_dev", "var_ratio", "var_dev")},
            "moving_mean_spread": _max_over_layers(layers, "moving_mean_spread")
            if layers else None,
            "moving_var_spread": _max_over_layers(layers, "moving_var_spread")
            if layers else None,
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

    def _precise(self, trainer) -> dict | None:
        """Test and train metrics with PreciseBN statistics, on a copy (collective)."""
        if not self.probe.layers or not self.precise_bn_samples:
            return None
        from distbn.train.precise_bn import recompute_bn_statistics

        start = time.perf_counter()
        cfg = trainer.config
        world = self.precise_strategy or trainer.strategy
        batches, num, samples = precise_bn_batches(
            trainer.dataset, cfg.train.global_batch_size, self.precise_bn_samples, cfg.seed,
            world.replica_id, world.num_replicas_in_sync)
        saved = [(v, v.numpy()) for v in trainer.model.non_trainable_weights]
        try:
            recompute_bn_statistics(trainer.model, batches, num, strategy=world,
                                    progress=_Lines(self) if self.rank == 0 else None)
            test, train = trainer.evaluate("test"), trainer.evaluate("train")
        finally:
            for var, value in saved:  # the EMA statistics, as training left them
                var.assign(value)
        return {"test": test, "train": train, "samples": samples, "batches": num,
                "seconds": time.perf_counter() - start}

    def on_train_end(self, trainer, summary) -> None:
        from distbn.bench.study_report import per_replica_batch

        train_inf = trainer.evaluate("train")  # collective: every rank runs this hook
        precise = self._precise(trainer)
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
        bn = bool(self.probe.names)

        def mean_of(key):
            return float(np.mean([r[key] for r in steps])) if bn else None

        self.summary = self._record({
            "type": "summary", "ranks": size, "global_batch_size": gb,
            "per_replica_batch": per_replica_batch(gb, size), "steps": total, "every": every,
            "norm_batch": self.norm_batch[0], "norm_batch_text": self.norm_batch[1],
            "train_loss": sum(r["loss"] * r["samples"] for r in tail if r["samples"]) / n
            if n else None,
            "train_accuracy": sum(r["accuracy"] * r["samples"] for r in tail if r["samples"])
            / n if n else None,
            "train_eval_loss": train_inf["loss"], "train_eval_accuracy": train_inf["accuracy"],
            "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "test_samples": test["samples"],
            "precise_test_loss": None if precise is None else precise["test"]["loss"],
            "precise_test_accuracy": None if precise is None else precise["test"]["accuracy"],
            "precise_train_eval_loss": None if precise is None else precise["train"]["loss"],
            "precise_train_eval_accuracy": None if precise is None
            else precise["train"]["accuracy"],
            "precise_samples": None if precise is None else precise["samples"],
            "precise_seconds": None if precise is None else precise["seconds"],
            "mean_dev": mean_of("mean_dev"), "var_ratio": mean_of("var_ratio"),
            "var_dev": mean_of("var_dev"),
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
        pbn = "" if precise is None else (
            f"; PreciseBN ({precise['samples']} samples): test acc "
            f"{_fmt(precise['test']['accuracy'])}, train (inference) acc "
            f"{_fmt(precise['train']['accuracy'])}")
        self._say(f"done in {wall:.1f} s (training steps after the first {self.train_s:.1f} "
                  f"s): test loss {_fmt(test['loss'])} acc {_fmt(test['accuracy'])}, train "
                  f"(inference) acc {_fmt(train_inf['accuracy'])}{pbn}")


class _Lines:
    """PreciseBN's progress lines (`Progress.message`) as the study's."""

    def __init__(self, callback):
        self.callback = callback

    def message(self, text) -> None:
        self.callback._say(text)


def _bn_strategy(world, config):
    """The strategy BN layers synchronize over: the world's, or one with the mode's sync
    group (`strategy.sync_group`, which `mode_config` sets for sync:K)."""
    k = config.strategy.sync_group
    if world.num_replicas_in_sync == 1 or k is None or k == world.num_replicas_in_sync:
        return world
    from distbn.distribute import MPIStrategy

    return MPIStrategy(comm=world.comm, sync_group=k,
                       stall_timeout=config.strategy.stall_timeout)


def train_mode(config, mode, world, dataset=None, every=None, emit=None, err=None,
               seed=None, norm_mode=None, precise_bn_samples=0, tag="") -> dict:
    """Train one mode with `Trainer.fit` and a `StudyCallback` (collective: every rank
    calls it).

    The trainer's own progress output is off (`logging.progress: none`; its summary
    lines go to `err`): the callback reports the study's progress.

    Args:
        config: the mode's `Config` (`mode_config`).
        mode: its label ("replica-local", "sync:2", "reference", ...).
        world: the strategy whose replicas train (every rank of it calls this); a sync
            group (`config.strategy.sync_group`) gets a strategy of its own over it.
        dataset: a `builder.Dataset` shared between modes (default: load it).
        every: steps between records (default `default_every`).
        emit: rank 0 calls it with every record (a dict); None: records are only kept.
        err: stream for the progress lines (rank 0; default sys.stderr).
        seed, norm_mode, precise_bn_samples, tag: as `StudyCallback` (PreciseBN pools
            over `world`).

    Returns:
        On rank 0 the mode's summary record; on other ranks {}.
    """
    from distbn.train.trainer import Trainer

    err = err or sys.stderr
    config = dataclasses.replace(
        config, logging=dataclasses.replace(config.logging, progress="none"))
    strategy = _bn_strategy(world, config)
    try:
        trainer = Trainer(config, strategy=strategy, run_dir=None, out=err, dataset=dataset)
        callback = StudyCallback(mode, every=every, emit=emit, err=err, seed=seed,
                                 norm_mode=norm_mode, precise_bn_samples=precise_bn_samples,
                                 precise_strategy=world, tag=tag)
        trainer.fit(callbacks=[callback])
    finally:
        if strategy is not world:
            strategy.close()
    return callback.summary


# --------------------------------------------------------------------------------------
# Records file


def _meta(args, plan) -> dict:
    import distbn

    return {"type": "meta", "command": _command_line(args), "config": str(args.config),
            "overrides": list(args.set or ()), "ranks": plan.ranks,
            "modes": [m.label for m in plan.modes], "seeds": list(plan.seeds),
            "precise_bn_samples": plan.precise,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "distbn": distbn.__version__}


def _option_argv(args) -> list[str]:
    """The options that travel to the parts and into the records' command line."""
    argv = []
    for flag, value in (("--modes", args.modes), ("--seeds", args.seeds),
                        ("--precise-bn-samples", args.precise_bn_samples)):
        if value is not None:
            argv += [flag, str(value)]
    if args.reference:
        argv.append("--reference")
    for item in args.set or ():
        argv += ["--set", item]
    if args.every is not None:
        argv += ["--every", str(args.every)]
    return argv


def _command_line(args) -> str:
    argv = ["distbn", "compare", str(args.config), "--out", str(args.out)]
    if args.ranks is not None:
        argv += ["--ranks", str(args.ranks)]
    return shlex.join(argv + _option_argv(args))


# --------------------------------------------------------------------------------------
# The command


def add_parser(sub) -> None:
    """Add the `compare` subcommand to the `distbn` subparsers.

    Args:
        sub: the object `ArgumentParser.add_subparsers()` returned.
    """
    p = sub.add_parser("compare", help="normalization-batch study: BN modes, EMA vs PreciseBN",
                       usage=_USAGE, description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", nargs="?",
                   help="the YAML config (default: configs/study.yaml, shipped in the package)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where report.md, the plots and study.jsonl go")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="ranks of every mode (>= 2; default 2, or the job's size under mpiexec)")
    p.add_argument("--modes", metavar="M,M,...",
                   help=f"normalization modes ({MODE_SYNTAX}); default: the config's "
                        f"study.modes, else {DEFAULT_MODES}")
    p.add_argument("--seeds", metavar="S",
                   help="seeds: a list (0,1,2) or a count from the config's seed (3); default: "
                        "the config's study.seeds, else 1")
    p.add_argument("--precise-bn-samples", type=int, metavar="N",
                   help="training samples PreciseBN pools for its statistics (0: no "
                        "PreciseBN); default: the config's study.precise_bn_samples, else "
                        f"{DEFAULT_PRECISE_SAMPLES}")
    p.add_argument("--reference", action="store_true",
                   help="also train the synchronized config in one process (every seed)")
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


@dataclasses.dataclass
class _Plan:
    """What the study trains: validated before anything is written or trained."""

    ranks: int
    modes: list
    seeds: list
    precise: int
    configs: dict  # (seed, mode label) -> Config
    reference: dict  # seed -> the synchronized Config
    first_dataset: object

    def dataset(self, seed):
        """The seed's data (the seed generates the patterns set)."""
        from distbn.train import builder

        if seed == self.seeds[0]:
            return self.first_dataset
        return builder.load_dataset(self.reference[seed])


def _bn_channels(config, dataset) -> dict:
    """{layer index: channels} of the BN layers of a built model."""
    from distbn.distribute import LocalStrategy
    from distbn.train import builder

    model = builder.build_model(config, dataset.input_shape, dataset.num_classes,
                                LocalStrategy())
    layers = [la for la in model.layers if la.has_moving_statistics]
    return {spec.index: int(la.moving_mean.numpy().size)
            for spec, la in zip(bn_entries(config), layers, strict=False)}


def _check_args(args, size) -> _Plan:
    """Validate arguments, the modes and every mode's config before any training."""
    from distbn.distribute import LocalStrategy
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
    _, section, where = read_study_section(args.config)

    def option(name, flag, default):
        value = getattr(args, name)
        if value is not None:
            return value, flag
        if name in section:
            return section[name], f"{where[name]}: study.{name}"
        return default, flag

    modes_value, modes_at = option("modes", "--modes", DEFAULT_MODES)
    modes = parse_modes(modes_value, modes_at)
    precise, at = option("precise_bn_samples", "--precise-bn-samples", DEFAULT_PRECISE_SAMPLES)
    if isinstance(precise, bool) or not isinstance(precise, int) or precise < 0:
        raise StudyError(f"{at}: must be an integer >= 0 (0: no PreciseBN), got {precise!r}")
    sync = Mode("sync")
    base = mode_config(args.config, args.set, mode=sync)
    seeds_value, seeds_at = option("seeds", "--seeds", 1)
    seeds = parse_seeds(seeds_value, base.seed, seeds_at)
    gb = base.train.global_batch_size
    if gb < ranks:
        raise StudyError(f"train.global_batch_size ({gb}) is smaller than --ranks ({ranks}): "
                         "some replicas would have no samples to take statistics of")
    reference = {s: mode_config(args.config, [*(args.set or ()), f"seed={s}"], mode=sync)
                 for s in seeds}
    # The model must build: a shape error should end the command here, not in the ranks.
    dataset = builder.load_dataset(reference[seeds[0]])
    builder.total_steps(base, len(dataset.y_train))
    n_train = len(dataset.y_train)
    check_modes(modes, ranks, gb, getattr(dataset, "mask_train", None) is not None,
                where=modes_at, last_batch=0 if base.train.drop_last else n_train % gb)
    channels = _bn_channels(base, dataset)
    if not channels:
        types = sorted({spec.type for spec in base.model.layers})
        raise StudyError(f"{args.config}: the model has no BatchNormalization layer to "
                         f"compare (layer types: {', '.join(types)})")
    configs = {}
    for seed in seeds:
        for m in modes:
            configs[(seed, m.label)] = mode_config(
                args.config, [*(args.set or ()), f"seed={seed}"], mode=m, channels=channels)
    for m in modes:  # every mode's model builds (GroupNormalization's groups, ...)
        model = builder.build_model(configs[(seeds[0], m.label)], dataset.input_shape,
                                    dataset.num_classes, LocalStrategy())
        if m.uses_bn and not StatsProbe(model).layers:
            raise StudyError(f"{args.config}: the model has no trainable BatchNormalization "
                             "layer to compare (every BN layer is frozen)")
    return _Plan(ranks, modes, seeds, precise, configs, reference, dataset)


def cmd_compare(args: argparse.Namespace) -> int:
    """`distbn compare`: train every seed and mode (launching mpiexec if needed) and report.

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
        plan = _check_args(args, size)
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
        return _run_reference(args, plan, out)
    if size > 1:
        return _run_ranks(args, plan, out)
    start = time.perf_counter()
    try:
        _prepare_out(out)
    except OSError as exc:
        return _error(f"cannot write --out {str(out)!r}: {exc}")
    deadline = time.monotonic() + args.timeout
    code = _launch_part(args, "modes", plan.ranks, out, deadline)
    if not code and args.reference:
        code = _launch_part(args, "reference", plan.ranks, out, deadline)
    if code:
        return code
    return _write_report(out, start)


def _prepare_out(out: Path) -> None:
    """Create DIR and remove a previous study's files: no stale report can pass for new."""
    from distbn.bench.study_report import OUTPUT_FILES

    out.mkdir(parents=True, exist_ok=True)
    for name in (RECORDS_FILE, *OUTPUT_FILES):
        (out / name).unlink(missing_ok=True)


def _run_ranks(args, plan, out) -> int:
    """Every seed and mode on this MPI job's ranks; rank 0 writes the records.

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
        writer(_meta(args, plan))
    world.barrier(name="study.start")
    from distbn.train.trainer import TrainingError

    runs = [(s, m) for s in plan.seeds for m in plan.modes]
    label = None
    try:
        for i, (seed, m) in enumerate(runs):
            label = m.label
            tag = f"[{i + 1}/{len(runs)} seed {seed}]" if len(runs) > 2 or len(plan.seeds) > 1 \
                else ""
            train_mode(plan.configs[(seed, m.label)], m.label, world,
                       dataset=plan.dataset(seed), every=args.every, emit=writer, seed=seed,
                       norm_mode=m, precise_bn_samples=plan.precise, tag=tag)
    except TrainingError as exc:
        # Raised on every rank at the same step (the gradient norm is all-reduced), so
        # all ranks leave together with the message printed once.
        if rank == 0:
            print(f"{_PREFIX}: error: {label}: {exc}", file=sys.stderr, flush=True)
        finalize_mpi_for_exit()
        return 1
    finally:
        if writer is not None:
            writer.close()
    if rank != 0 or args.part is not None:
        return 0
    if args.reference:
        # The other ranks are done; this one trains alone with the user's thread settings.
        _run_reference(args, plan, out)
    return _write_report(out, start)


def _run_reference(args, plan, out) -> int:
    """The synchronized config of every seed in this one process, appended to
    DIR/study.jsonl."""
    from distbn.distribute import LocalStrategy

    path = out / RECORDS_FILE
    if not path.is_file():
        return _error(f"{path} does not exist: the reference is added to a study's records")
    from distbn.train.trainer import TrainingError

    writer = JsonlWriter(path, append=True)
    try:
        for seed in plan.seeds:
            train_mode(plan.reference[seed], REFERENCE, LocalStrategy(), plan.dataset(seed),
                       every=args.every, emit=writer, seed=seed, norm_mode=Mode("sync"),
                       precise_bn_samples=plan.precise,
                       tag=f"[seed {seed}]" if len(plan.seeds) > 1 else "")
    except TrainingError as exc:
        print(f"{_PREFIX}: error: {REFERENCE}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        writer.close()
    return 0


def _part_argv(args, part, ranks, out) -> list[str]:
    return ["-m", "distbn", "compare", str(args.config), "--out", str(out), "--ranks",
            str(ranks), "--part", part, *_option_argv(args)]


def _launch_part(args, part, ranks, out, deadline) -> int:
    """Run one part in a child process group with one BLAS thread per process.

    "modes" goes through `mpiexec -n ranks python -m mpi4py`; "reference" is a plain
    `python` (one process, no MPI; `ranks` only travels for the argument checks). The
    group is killed when `deadline` passes.
    """
    from distbn.launcher import run_group
    from distbn.mpiexec import mpiexec_command, rank_env

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
    res = run_group(cmd, env=rank_env(), timeout=max(deadline - time.monotonic(), 0.1))
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
    """report.md and the plots from DIR/study.jsonl; the tables on stdout."""
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
    batch_table = study_report.render_batch_table(records)
    if batch_table:
        print("", batch_table, sep="\n", flush=True)
    return 0
