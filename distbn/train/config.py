"""The trainer's YAML configuration: safe loading with line numbers, schema, overrides.

A config is read with a `SafeLoader` subclass that builds plain values itself and
records the line of every key, refuses duplicate keys and every tag beyond plain
mappings, lists, strings, numbers, booleans and null (so `!!python/...` executes
nothing). Numbers such as `1e-3` are floats (YAML 1.2), not strings as in plain PyYAML.

`--set a.b.c=VALUE` overrides are parsed as YAML values and applied to the raw mapping
before validation, so they meet exactly the checks the file does. Validation turns the
mapping into frozen dataclasses (`Config` and its sections); every error is a
`ConfigError` whose message starts with where the offending value came from:

    config.yaml:12: train.optimizer.learning_rate: must be > 0, got -0.1
    --set train.stepz=3: unknown key 'train.stepz' (did you mean 'train.steps'?)

`epochs` versus `steps`: giving both in one place (both in the file, or both as
overrides) is an error. An override that sets one of them to a value clears the other
if that came from the file, so `--set train.steps=12` on a file with `epochs: 5` trains
for 12 steps. Giving neither means `epochs: 1`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "LayerSpec",
    "TrainConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "StrategyConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "load_config",
    "parse_config",
    "parse_override",
    "config_to_yaml",
    "config_hash",
    "format_path",
    "layer_path",
]

Path = tuple  # of str (mapping keys) and int (list indices)

_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("null", "bool", "int", "float", "str")}
# YAML 1.2 floats without a dot or without an exponent sign (1e-3, 1.0e5, 2E+4), which
# YAML 1.1 (and so PyYAML) would load as strings.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
# Alias expansion can blow a small file up exponentially; no real config comes close.
_MAX_NODES = 100_000


class ConfigError(ValueError):
    """A configuration problem; the message starts with where the value came from.

    Attributes:
        location: "file:line", "--set KEY=VALUE" or the source name; None if unknown.
        path: the dotted key path, e.g. "train.optimizer.learning_rate", or None.
    """

    def __init__(self, message, location=None, path=None):
        super().__init__(message)
        self.location = location
        self.path = path


def format_path(path) -> str:
    """Dotted form of a key path: `("model", "layers", 3, "lr")` -> `model.layers[3].lr`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def layer_path(i, key=None) -> str:
    """Dotted path of a `model.layers` entry or one of its arguments.

    Args:
        i: index of the layer entry.
        key: argument name, or None for the entry itself.

    Returns:
        e.g. "model.layers[3].momentum".
    """
    return format_path(("model", "layers", i) + (() if key is None else (key,)))


# --------------------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that builds plain values from nodes, refusing duplicate keys and tags.

    Only composition (parsing into nodes) is PyYAML's; `load_located` walks the nodes,
    checks every tag before anything is constructed, and records the 1-based line of
    every mapping key and list item under its key path.
    """

    def __init__(self, stream, source):
        super().__init__(stream)
        self.source = source
        self.lines: dict[Path, int] = {}
        self._active: set[int] = set()
        self._count = 0

    def load_located(self):
        """Parse the single document: `(value, lines)` (an empty document is None)."""
        try:
            node = self.get_single_node()
            return (None if node is None else self._value(node, ())), self.lines
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"{self.source}:{mark.line + 1}" if mark else str(self.source)
            raise ConfigError(_yaml_error_text(self.source, err), location=where) from None
        finally:
            self.dispose()

    def _fail(self, node, message, path=None):
        mark = node.start_mark
        where = f"{self.source}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(f"{where}: {message}", location=f"{self.source}:{mark.line + 1}",
                          path=None if path is None else format_path(path))

    def _check_tag(self, node, allowed):
        if node.tag not in allowed:
            tag = node.tag.replace(_YAML, "!!")
            hint = " (quote the value to make it a string)" if node.tag.startswith(_YAML) \
                and isinstance(node, yaml.ScalarNode) else ""
            self._fail(node, f"tag {tag!r} is not allowed: a config holds only mappings, "
                             f"lists, strings, numbers, booleans and null{hint}")

    def _value(self, node, path):
        self._count += 1
        if self._count > _MAX_NODES:
            self._fail(node, f"more than {_MAX_NODES} values (aliases expanding?)")
        if id(node) in self._active:
            self._fail(node, "recursive alias")
        if isinstance(node, yaml.ScalarNode):
            self._check_tag(node, _PLAIN_TAGS)
            return self.construct_object(node, deep=True)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                self._check_tag(node, {_YAML + "seq"})
                out = []
                for i, item in enumerate(node.value):
                    self.lines[path + (i,)] = item.start_mark.line + 1
                    out.append(self._value(item, path + (i,)))
                return out
            self._check_tag(node, {_YAML + "map"})
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _mapping(self, node, path):
        out: dict = {}
        merges = [v for k, v in node.value if k.tag == _YAML + "merge"]
        # `<<: *base` (or a list of them): merged first, earlier sources winning, so the
        # explicit keys that follow override them.
        for merged in reversed(merges):
            sources = merged.value if isinstance(merged, yaml.SequenceNode) else [merged]
            for src in reversed(sources):
                if not isinstance(src, yaml.MappingNode):
                    self._fail(src, "a merge key '<<' needs a mapping or a list of mappings")
                out.update(self._value(src, path))
        seen: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _YAML + "merge":
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                where = format_path(path) or "the top level"
                self._fail(key_node, f"keys must be plain scalars, in {where}")
            self._check_tag(key_node, _PLAIN_TAGS)
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = format_path(path) or "the top level"
                self._fail(key_node, f"duplicate key {key!r} in {where} "
                                     f"(first on line {seen[key]}, again on line {line})",
                           path + (key,))
            seen[key] = line
            self.lines[path + (key,)] = line
            out[key] = self._value(value_node, path + (key,))
        return out


_Loader.add_implicit_resolver(_YAML + "float", _FLOAT_12, list("-+0123456789."))


def _yaml_error_text(source, err) -> str:
    mark = err.problem_mark or err.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
    text = f"{where}: malformed YAML: {err.problem or err.context}"
    if err.context and err.problem:
        cm = err.context_mark
        at = f" at line {cm.line + 1}, column {cm.column + 1}" if cm else ""
        text += f" ({err.context}{at})"
    return text


def _load_text(text, source):
    return _Loader(text, source).load_located()


# --------------------------------------------------------------------------------------
# Schema


def _f(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, ge=None, gt=None,
       le=None, lt=None, required=False, internal=False, compare=True):
    """A dataclass field with the validator's metadata (bounds, required, internal)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "required": required, "internal": internal}
    return field(default=default, default_factory=factory, metadata=meta, compare=compare,
                 repr=not internal)


class _Section:
    """Shared behaviour of the schema dataclasses."""

    def to_dict(self) -> dict:
        """Plain dict/list/str/number/bool/None form; `parse_config` of it gives an equal object."""
        return _to_plain(self)

    def _check(self, path, ctx):
        """Cross-field checks once each field is valid; returns the (completed) section."""
        return self


@dataclass(frozen=True)
class DataConfig(_Section):
    """`data`: which data set to train on.

    Attributes:
        name: "patterns" (the embedded generated set, `data.make_patterns`), "npz"
            (a user file with x_train, y_train, x_test, y_test; `data.load_npz`) or "npy"
            (a directory of x_train.npy, y_train.npy, x_test.npy, y_test.npy, memory-
            mapped: each rank reads only the rows of its slices; `data.open_npy_dir`).
        path: the .npz file or the .npy directory, required for "npz" and "npy", not
            allowed for "patterns". A relative
            path is taken from the config file's directory (from the working directory
            when it comes from `--set`); the resolved config holds the absolute path.
        n_train: patterns: samples to generate (default 10000); npz: use the first
            n_train samples (default: all). >= 1.
        n_test: as n_train for the test split (patterns default 2000). >= 1.
        image_size: patterns: image height and width in pixels (>= 4); default 16.
        num_classes: number of classes (>= 2); labels must lie in [0, num_classes).
            patterns supports at most 10. Default 10.
    """

    name: Literal["patterns", "npz", "npy"] = "patterns"
    path: str | None = None
    n_train: int | None = _f(None, ge=1)
    n_test: int | None = _f(None, ge=1)
    image_size: int = _f(16, ge=4)
    num_classes: int = _f(10, ge=2)

    def _check(self, path, ctx):
        if self.name in ("npz", "npy"):
            if self.path is None:
                raise ctx.error(path + ("path",), f"required when data.name is {self.name!r}",
                                at=path + ("name",))
            where = ctx.locate(path + ("path",))
            base = "." if where.startswith("--set") or ctx.source.startswith("<") else (
                os.path.dirname(os.path.abspath(ctx.source)))
            full = os.path.normpath(os.path.join(base, os.path.expanduser(self.path)))
            exists = os.path.isfile if self.name == "npz" else os.path.isdir
            if not exists(full):
                relative = "" if os.path.isabs(self.path) else (
                    f" (relative to {'the working directory' if base == '.' else base})")
                what = "data file" if self.name == "npz" else "data directory"
                raise ctx.error(path + ("path",), f"{what} {self.path!r} not found: "
                                                  f"looked for {full}{relative}")
            return dataclasses.replace(self, path=os.path.abspath(full))
        if self.path is not None:
            raise ctx.error(path + ("path",),
                            f"only used when data.name is 'npz' or 'npy', got {self.path!r}")
        if self.num_classes > 10:
            raise ctx.error(path + ("num_classes",),
                            f"must be <= 10 for data.name 'patterns', got {self.num_classes!r}")
        return dataclasses.replace(
            self,
            n_train=10000 if self.n_train is None else self.n_train,
            n_test=2000 if self.n_test is None else self.n_test,
        )


@dataclass(frozen=True)
class LayerSpec(_Section):
    """One `model.layers` entry: a layer class name and its keyword arguments.

    Only the structure is validated here; the model builder checks the arguments
    against the layer class and reports problems with `error(key, message)`, which
    quotes the entry's YAML line (or the `--set` that gave the value).

    Attributes:
        type: the layer class name, e.g. "Conv2D" or "BatchNormalization".
        kwargs: the other keys of the entry (plain YAML values); treat as read-only.
        index: position in `model.layers`.
        locations: key -> "file:line" or "--set ..." ("" for the entry itself).
    """

    type: str
    kwargs: dict = _f(factory=dict)
    index: int = _f(0, internal=True)
    locations: dict = _f(factory=dict, internal=True, compare=False)

    def to_dict(self) -> dict:
        """The entry as written in YAML: `{"type": ..., **kwargs}`."""
        return {"type": self.type, **copy.deepcopy(self.kwargs)}

    def path(self, key=None) -> str:
        """Dotted path of this entry or one of its arguments: "model.layers[3].momentum"."""
        return layer_path(self.index, key)

    def error(self, key, message) -> ConfigError:
        """A `ConfigError` about argument `key` (None: the entry), located at its YAML line.

        Args:
            key: argument name or None.
            message: what is wrong, quoting the value, e.g. "must be in [0, 1], got 1.5".

        Returns:
            The error (raise it).
        """
        where = self.locations.get(key) or self.locations.get("") or None
        text = f"{self.path(key)}: {message}"
        return ConfigError(f"{where}: {text}" if where else text, location=where,
                           path=self.path(key))


@dataclass(frozen=True)
class ModelConfig(_Section):
    """`model`: the network, as a list of layers applied in order.

    Attributes:
        layers: required, non-empty list of mappings, each with `type` (layer class
            name) and that layer's keyword arguments, e.g.
            `{type: Conv2D, filters: 16, kernel_size: 3}` (see `LayerSpec`).
        dtype: "float32" (default) or "float64": weights and computation.
        data_format: "channels_last" (NHWC, default) or "channels_first" (NCHW); the
            data are converted to it and layers that take `data_format` default to it.
        synchronized: default `synchronized` for BatchNormalization entries that do not
            set it. Default true, so N replicas compute the statistics of the global
            batch and reproduce a one-process run.
    """

    layers: list = _f(factory=list, required=True)
    dtype: Literal["float32", "float64"] = "float32"
    data_format: Literal["channels_last", "channels_first"] = "channels_last"
    synchronized: bool = True


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """`train.optimizer.schedule`: the learning-rate schedule.

    Attributes:
        name: "constant" (default), "step" (multiply by decay_rate every decay_steps
            steps) or "cosine" (from learning_rate down to alpha * learning_rate over
            decay_steps steps).
        warmup_steps: linear warm-up from 0 over this many steps before the schedule
            starts (>= 0, default 0).
        decay_steps: step: the period (required); cosine: its length (null: the rest
            of training after warm-up). >= 1.
        decay_rate: step: the factor, in (0, 1]; default 0.1.
        alpha: cosine: final learning rate as a fraction of learning_rate, in [0, 1];
            default 0.
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = _f(0, ge=0)
    decay_steps: int | None = _f(None, ge=1)
    decay_rate: float = _f(0.1, gt=0.0, le=1.0)
    alpha: float = _f(0.0, ge=0.0, le=1.0)

    def _check(self, path, ctx):
        if self.name == "step" and self.decay_steps is None:
            raise ctx.error(path + ("decay_steps",), "required when schedule.name is 'step'",
                            at=path + ("name",))
        return self


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """`train.optimizer`: the optimizer and its hyperparameters (Keras names).

    Attributes:
        name: "sgd" (default), "adam" or "adamw".
        learning_rate: base learning rate, > 0; default 0.01.
        momentum: sgd: momentum in [0, 1); default 0.9 (Keras' default is 0).
        nesterov: sgd: Nesterov momentum; default false.
        weight_decay: >= 0, default 0 (decoupled for adamw).
        beta_1: adam/adamw: in [0, 1); default 0.9.
        beta_2: adam/adamw: in [0, 1); default 0.999.
        epsilon: adam/adamw: > 0; default 1e-7.
        global_clipnorm: clip the global gradient norm to this (> 0); null: off.
        schedule: learning-rate schedule (`ScheduleConfig`); default constant.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: float = _f(0.01, gt=0.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = _f(0.0, ge=0.0)
    beta_1: float = _f(0.9, ge=0.0, lt=1.0)
    beta_2: float = _f(0.999, ge=0.0, lt=1.0)
    epsilon: float = _f(1e-7, gt=0.0)
    global_clipnorm: float | None = _f(None, gt=0.0)
    schedule: ScheduleConfig = _f(factory=ScheduleConfig)


@dataclass(frozen=True)
class PreciseBNConfig(_Section):
    """`train.precise_bn`: PreciseBN before each evaluation (`distbn.train.precise_bn`).

    Attributes:
        batches: recompute every BatchNormalization layer's moving statistics as the
            population statistics of this many training batches (>= 0; the schedule's
            first steps, weights frozen, layers in order, pooled exactly over all
            replicas) before each evaluation; training continues from them. 0
            (default): off, evaluation uses the moving averages.
    """

    batches: int = _f(0, ge=0)


@dataclass(frozen=True)
class TrainConfig(_Section):
    """`train`: how long and how to train.

    Attributes:
        global_batch_size: samples per step over all replicas (>= 1); default 128.
        epochs: passes over the training set (>= 1); exclusive with steps.
        steps: optimizer steps (>= 1), continuing across epochs; exclusive with epochs.
            Neither given: epochs = 1. See the module docstring for overrides.
        drop_last: drop each epoch's final short global batch; default false.
        optimizer: `OptimizerConfig`.
        loss: "sparse_categorical_crossentropy" (default) or "mse" (against one-hot
            labels).
        from_logits: whether the model outputs logits (true: the crossentropy applies
            the softmax) or probabilities (false, Keras' default: the last layer has
            `activation: softmax`). A softmax output with from_logits true, or a
            non-softmax output with from_logits false, is refused. Ignored by mse.
        eval_every: evaluate on the test split every this many steps (>= 0); 0 (default):
            only at the end.
        on_nonfinite: what a non-finite loss (on any rank) or gradient norm does, decided
            by every rank together: "raise" (default: every rank stops with exit 1,
            naming the step and the first layer whose output was non-finite) or
            "skip_step" (no optimizer update, BatchNormalization moving statistics put
            back as they were, a warning; the step counter still advances, the
            optimizer's iteration count and so its schedule do not).
        check_replicas_every: every this many steps (>= 0), compare a SHA-256 of every
            parameter and synchronized moving statistic across ranks and stop every rank
            (exit 1) naming the ranks and the first tensor that drifted; 0 (default): off.
        precise_bn: `PreciseBNConfig` (PreciseBN before each evaluation; default off).
    """

    global_batch_size: int = _f(128, ge=1)
    epochs: int | None = _f(None, ge=1)
    steps: int | None = _f(None, ge=1)
    drop_last: bool = False
    optimizer: OptimizerConfig = _f(factory=OptimizerConfig)
    loss: Literal["sparse_categorical_crossentropy", "mse"] = "sparse_categorical_crossentropy"
    from_logits: bool = False
    eval_every: int = _f(0, ge=0)
    on_nonfinite: Literal["raise", "skip_step"] = "raise"
    check_replicas_every: int = _f(0, ge=0)
    precise_bn: PreciseBNConfig = _f(factory=PreciseBNConfig)

    def _check(self, path, ctx):
        if self.epochs is not None and self.steps is not None:
            raise ctx.error(
                path + ("steps",),
                f"give either train.epochs or train.steps, not both (epochs={self.epochs!r} "
                f"at {ctx.locate(path + ('epochs',))})",
            )
        if self.epochs is None and self.steps is None:
            return dataclasses.replace(self, epochs=1)
        return self


@dataclass(frozen=True)
class StrategyConfig(_Section):
    """`strategy`: how replicas are grouped, and the collectives' safety nets.

    Attributes:
        sync_group: replicas whose synchronized BN statistics are pooled: null (default:
            all replicas), an int >= 1 (consecutive groups of that many ranks) or "node"
            (the ranks sharing a node).
        check_steps: run the first this many training steps of a run (>= 0) in check
            mode, where every collective is compared across ranks first and a mismatch
            (shape, order, kind) is named on every rank instead of hanging; then switch
            it off (it costs one small allgather per collective). Default 2; 0: off
            (`DISTBN_CHECK_COLLECTIVES=1` keeps it on throughout).
        stall_timeout: seconds (> 0) a rank may wait in one collective before the stall
            watchdog names the collective and the ranks that have not arrived and aborts
            the job; null (default) leaves `DISTBN_STALL_TIMEOUT` in charge (unset: off).
            Keep it above the longest legitimate wait: the first step's JIT compilation,
            a checkpoint write, an uneven evaluation.
    """

    sync_group: int | Literal["node"] | None = _f(None, ge=1)
    check_steps: int = _f(2, ge=0)
    stall_timeout: float | None = _f(None, gt=0.0)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """`checkpoint`: periodic checkpoints under `RUN_DIR/checkpoints/`, and resuming.

    Rerunning the same command with the same `--run-dir` resumes from the newest
    complete checkpoint there. When any checkpointing is on, a checkpoint is also
    written at the end and when a preemption signal arrives.

    Attributes:
        every_steps: save every this many steps (>= 0); 0 (default): not by steps.
        every_epochs: save at the end of every this many epochs (>= 0); 0 (default):
            not by epochs.
        keep: how many of the latest checkpoints to keep (>= 1); default 3.
        moving_stats: what replica-local BatchNormalization moving statistics (which
            differ between replicas) the checkpoint's weights hold: "mean" (default,
            their mean over replicas) or "rank0" (rank 0's). Each replica's own values
            are stored beside them, so a resume at the same world size is exact.
    """

    every_steps: int = _f(0, ge=0)
    every_epochs: int = _f(0, ge=0)
    keep: int = _f(3, ge=1)
    moving_stats: Literal["mean", "rank0"] = "mean"

    @property
    def enabled(self) -> bool:
        """Whether any checkpointing was asked for."""
        return bool(self.every_steps or self.every_epochs)


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """`logging`: metrics and progress output (rank 0 only).

    Attributes:
        every_steps: write a metrics line every this many steps (>= 1); default 10.
        progress: "auto" (default: a bar on a terminal, lines otherwise), "bar",
            "lines" or "none".
    """

    every_steps: int = _f(10, ge=1)
    progress: Literal["auto", "bar", "lines", "none"] = "auto"


@dataclass(frozen=True)
class Config(_Section):
    """The whole training configuration (the YAML file after overrides, validated).

    Attributes:
        seed: non-negative int seeding data generation, shuffling and initialisation;
            default 0.
        data: `DataConfig`.
        model: `ModelConfig` (required, for its `layers`).
        train: `TrainConfig`.
        strategy: `StrategyConfig`.
        checkpoint: `CheckpointConfig`.
        logging: `LoggingConfig`.
        source: where it was read from (a path, "<string>"); not part of `to_dict`.
    """

    seed: int = _f(0, ge=0)
    data: DataConfig = _f(factory=DataConfig)
    model: ModelConfig = _f(factory=ModelConfig, required=True)
    train: TrainConfig = _f(factory=TrainConfig)
    strategy: StrategyConfig = _f(factory=StrategyConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)
    logging: LoggingConfig = _f(factory=LoggingConfig)
    source: str = _f("<string>", internal=True, compare=False)


# --------------------------------------------------------------------------------------
# Validation


class _Context:
    """Where each raw value came from, for error messages."""

    def __init__(self, source, lines):
        self.source = str(source)
        self.origins: dict[Path, str] = {p: f"{self.source}:{line}" for p, line in lines.items()}

    def locate(self, path) -> str:
        """The nearest known origin of `path` or its ancestors; else the source name."""
        path = tuple(path)
        while path:
            if path in self.origins:
                return self.origins[path]
            path = path[:-1]
        return self.origins.get((), self.source)

    def error(self, path, message, at=None) -> ConfigError:
        """A `ConfigError` about `path`, located at `at` (default: `path` itself)."""
        where = self.locate(path if at is None else at)
        dotted = format_path(path)
        text = f"{dotted}: {message}" if dotted else message
        return ConfigError(f"{where}: {text}", location=where, path=dotted or None)

    def unknown(self, path, key, known) -> ConfigError:
        full = path + (key,)
        where = self.locate(full)
        dotted = format_path(full)
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {format_path(path + (close[0],))!r}?"
        else:
            hint = "known keys: " + ", ".join(known)
        return ConfigError(f"{where}: unknown key {dotted!r} ({hint})", location=where,
                           path=dotted)


_HINTS: dict = {}


def _hints(cls):
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls, raw, path, ctx):
    """Validate a raw mapping into the dataclass `cls` (recursively)."""
    if raw is None:  # an empty section (`train:`) means all defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.error(path, f"expected a mapping, got {raw!r}")
    known = [f.name for f in _fields(cls)]
    for key in raw:
        if key not in known:
            raise ctx.unknown(path, key, known)
    hints = _hints(cls)
    values = {}
    for f in _fields(cls):
        p = path + (f.name,)
        if f.name in raw:
            values[f.name] = _coerce(hints[f.name], raw[f.name], p, ctx, f.metadata)
        elif f.metadata.get("required"):
            raise ctx.error(p, "required key is missing")
    if cls is Config:
        values["source"] = ctx.source
    return cls(**values)._check(path, ctx)


def _atoms(hint):
    """Flatten Optional/Union/Literal hints into a list of accepted kinds."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [a for arg in typing.get_args(hint) for a in _atoms(arg)]
    if typing.get_origin(hint) is Literal:
        return [("literal", typing.get_args(hint))]
    return [hint]


def _match(atom, value):
    if atom is type(None):
        return value is None, None
    if atom is bool:
        return isinstance(value, bool), value
    if atom is int:  # bool is an int subclass in Python, but never an int here
        return isinstance(value, int) and not isinstance(value, bool), value
    if atom is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if atom is str:
        return isinstance(value, str), value
    if isinstance(atom, tuple) and atom[0] == "literal":
        return isinstance(value, str) and value in atom[1], value
    raise TypeError(f"unsupported schema type {atom!r}")  # a bug in the schema, not the config


def _describe(atom) -> str:
    if isinstance(atom, tuple):
        return "one of " + ", ".join(repr(c) for c in atom[1])
    return {type(None): "null", bool: "true or false", int: "an int", float: "a number",
            str: "a string"}[atom]


def _bounds_text(meta) -> str:
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    low = (ge, "[") if ge is not None else (gt, "(") if gt is not None else None
    high = (le, "]") if le is not None else (lt, ")") if lt is not None else None
    if low and high:
        return f"must be in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low:
        return f"must be {'>=' if low[1] == '[' else '>'} {low[0]:g}"
    return f"must be {'<=' if high[1] == ']' else '<'} {high[0]:g}"


def _in_bounds(value, meta) -> bool:
    checks = (("ge", lambda b: value >= b), ("gt", lambda b: value > b),
              ("le", lambda b: value <= b), ("lt", lambda b: value < b))
    return all(meta.get(k) is None or ok(meta[k]) for k, ok in checks)


def _coerce(hint, value, path, ctx, meta):
    """Check one raw value against its field's type and bounds; return the clean value."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, ctx)
    if path[-1:] == ("layers",) and hint is list:
        return _build_layers(value, path, ctx)
    atoms = _atoms(hint)
    for atom in atoms:
        ok, clean = _match(atom, value)
        if ok:
            break
    else:
        message = f"expected {' or '.join(_describe(a) for a in atoms)}, got {value!r}"
        choices = [c for a in atoms if isinstance(a, tuple) for c in a[1]]
        if isinstance(value, str) and choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        raise ctx.error(path, message)
    if isinstance(clean, float) and not math.isfinite(clean):
        raise ctx.error(path, f"must be a finite number, got {value!r}")
    if isinstance(clean, (int, float)) and not isinstance(clean, bool) \
            and not _in_bounds(clean, meta):
        raise ctx.error(path, f"{_bounds_text(meta)}, got {value!r}")
    return clean


def _plain(value, path, ctx):
    """A layer argument as plain YAML data (tuples become lists, numpy scalars Python)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, path + (i,), ctx) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ctx.error(path, f"mapping keys must be strings, got {k!r}")
            out[k] = _plain(v, path + (k,), ctx)
        return out
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return _plain(value.item(), path, ctx)
    raise ctx.error(path, f"expected plain YAML data, got {value!r} ({type(value).__name__})")


def _build_layers(value, path, ctx):
    if not isinstance(value, list):
        raise ctx.error(path, f"expected a list of layer mappings, got {value!r}")
    if not value:
        raise ctx.error(path, "must list at least one layer")
    specs = []
    for i, entry in enumerate(value):
        p = path + (i,)
        if not isinstance(entry, dict):
            raise ctx.error(p, f"expected a mapping with a 'type' key, got {entry!r}")
        if "type" not in entry:
            raise ctx.error(p, "missing 'type' (the layer class name, e.g. 'Dense'), "
                               f"got keys {list(entry)!r}")
        if not isinstance(entry["type"], str) or not entry["type"]:
            raise ctx.error(p + ("type",), f"expected a layer class name, got {entry['type']!r}")
        kwargs = {}
        for key, arg in entry.items():
            if not isinstance(key, str):
                raise ctx.error(p, f"layer argument names must be strings, got {key!r}")
            if key != "type":
                kwargs[key] = _plain(arg, p + (key,), ctx)
        locations = {"": ctx.locate(p)}
        locations.update({key: ctx.locate(p + (key,)) for key in entry})
        specs.append(LayerSpec(type=entry["type"], kwargs=kwargs, index=i, locations=locations))
    return specs


def _to_plain(obj):
    if isinstance(obj, LayerSpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return copy.deepcopy(obj)


# --------------------------------------------------------------------------------------
# Overrides


_TOKEN = re.compile(r"^([^\[\]]*)((?:\[\d+\])*)$")


def parse_override(text):
    """Parse one `--set KEY.PATH=VALUE`.

    Args:
        text: e.g. "train.optimizer.learning_rate=0.05" or "model.layers.2.momentum=0.9"
            (list indices as `.2` or `[2]`); VALUE is read as YAML (safe, plain tags only;
            empty means null).

    Returns:
        `(path, value)`, path a tuple of str keys and int indices.
    """
    where = f"--set {text}"
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{where}: expected KEY.PATH=VALUE, e.g. train.steps=100",
                          location=where)
    path = []
    for part in key.strip().split("."):
        m = _TOKEN.match(part.strip())
        if not m or not m.group(1) and not m.group(2):
            raise ConfigError(f"{where}: bad key path {key.strip()!r} (empty or malformed "
                              f"part {part!r})", location=where)
        name, indices = m.group(1), re.findall(r"\[(\d+)\]", m.group(2))
        if name:
            path.append(int(name) if name.isdigit() else name)
        path.extend(int(i) for i in indices)
    if isinstance(path[0], int):
        raise ConfigError(f"{where}: bad key path {key.strip()!r}: starts with an index",
                          location=where)
    value, _ = _load_text(raw, where)
    return tuple(path), value


def _apply_override(raw, ctx, text, path, value):
    where = f"--set {text}"
    node = raw
    done: list = []
    for depth, token in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, dict):
            token = str(token) if isinstance(token, int) else token
            if not last and not isinstance(node.get(token), (dict, list)):
                if node.get(token) is not None:
                    here = format_path(done + [token])
                    raise ConfigError(
                        f"{where}: cannot set {format_path(path)!r}: {here!r} is "
                        f"{node[token]!r}, not a mapping or list", location=where)
                node[token] = {}
                ctx.origins[tuple(done + [token])] = where
        elif isinstance(node, list):
            here = format_path(done)
            if not isinstance(token, int):
                raise ConfigError(f"{where}: {here!r} is a list: index it with a number, "
                                  f"e.g. {here}.0", location=where)
            if not 0 <= token < len(node):
                raise ConfigError(f"{where}: index {token} out of range: {here!r} has "
                                  f"{len(node)} entries", location=where)
        else:
            raise ConfigError(f"{where}: cannot set {format_path(path)!r}: "
                              f"{format_path(done)!r} is {node!r}", location=where)
        done.append(token)
        if last:
            node[token] = value
        else:
            node = node[token]
    full = tuple(done)
    for p in [p for p in ctx.origins if p[:len(full)] == full]:
        del ctx.origins[p]
    ctx.origins[full] = where  # everything under it is located by this prefix
    return full


# --------------------------------------------------------------------------------------
# Public entry points


def parse_config(text_or_mapping, source="<string>", overrides=()) -> Config:
    """Validate a config given as YAML text or as a mapping, after applying overrides.

    Args:
        text_or_mapping: YAML text, or a mapping of plain values (e.g. `Config.to_dict()`).
        source: name used in error messages (a file path, "<string>").
        overrides: iterable of "KEY.PATH=VALUE" strings, applied in order.

    Returns:
        The validated `Config`.
    """
    if isinstance(text_or_mapping, str):
        raw, lines = _load_text(text_or_mapping, source)
    elif isinstance(text_or_mapping, Mapping):
        raw, lines = copy.deepcopy(dict(text_or_mapping)), {}
    else:
        raise TypeError(f"parse_config expects YAML text or a mapping, got "
                        f"{type(text_or_mapping).__name__}")
    ctx = _Context(source, lines)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {raw!r}",
                          location=str(source))
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):  # a lone string would otherwise be split into chars
        overrides = [overrides]
    set_paths = set()
    for text in overrides:
        path, value = parse_override(text)
        set_paths.add(_apply_override(raw, ctx, text, path, value))
    train = raw.get("train")
    if isinstance(train, dict):
        # An override of epochs/steps replaces the other one given in the file.
        for mine, other in (("steps", "epochs"), ("epochs", "steps")):
            if ("train", mine) in set_paths and train.get(mine) is not None \
                    and ("train", other) not in set_paths:
                train.pop(other, None)
    return _build(Config, raw, (), ctx)


def load_config(path, overrides=()) -> Config:
    """Read, override and validate a YAML config file.

    Args:
        path: the YAML file.
        overrides: iterable of "KEY.PATH=VALUE" strings (as given to `--set`).

    Returns:
        The validated `Config` (its `source` is `path`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist", location=path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a regular file", location=path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}", location=path) from err
    return parse_config(text, source=path, overrides=overrides)


def config_hash(config) -> str:
    """sha256 (hex) of the canonical JSON of `config.to_dict()`: equal configs, equal hashes."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _FlowMap(dict):
    """A mapping written on one line (layer entries)."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes layer entries in flow style and quotes 1e-3-like strings."""


_Dumper.add_representer(
    _FlowMap, lambda d, data: d.represent_mapping(_YAML + "map", data, flow_style=True))
# Strings our loader would read back as floats must be quoted.
_Dumper.add_implicit_resolver(_YAML + "float", _FLOAT_12, list("-+0123456789."))


def config_to_yaml(config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds).

    Args:
        config: a `Config`.

    Returns:
        YAML text that `parse_config` turns back into an equal `Config`.
    """
    data = config.to_dict()
    data["model"]["layers"] = [_FlowMap(layer) for layer in data["model"]["layers"]]
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=100)
    return f"# distbn resolved config, sha256 {config_hash(config)}\n{body}"

