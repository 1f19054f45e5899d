"""The config's schema: frozen dataclasses for every section, and the typed entries.

Each field's type hint and metadata (`_f`: bounds, required, internal) is what
`distbn.train.config` validates a raw mapping against. Three sections are typed entries
(`distbn.train.entries`) instead of fixed keys: a `model.layers` item (`LayerSpec`:
`type` plus the layer's arguments), `train.optimizer` (`OptimizerConfig`: `name` plus
the optimizer's arguments) and its `schedule` (`ScheduleConfig`): their arguments are
whatever the named class's constructor takes, checked by that constructor, so the
bounds of those arguments live in the classes, not here.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from typing import Literal

from distbn.train import entries, optimizers, schedules
from distbn.train.yaml_io import ConfigError, format_path

__all__ = [
    "Config", "DataConfig", "ModelConfig", "LayerSpec", "TrainConfig", "OptimizerConfig",
    "ScheduleConfig", "PreciseBNConfig", "StrategyConfig", "CheckpointConfig",
    "LoggingConfig", "OPTIMIZER_DEFAULTS", "SCHEDULE_DEFAULTS", "layer_path",
]


def layer_path(i, key=None) -> str:
    """Dotted path of a `model.layers` entry or one of its arguments.

    Args:
        i: index of the layer entry.
        key: argument name, or None for the entry itself.

    Returns:
        e.g. "model.layers[3].momentum".
    """
    return format_path(("model", "layers", i) + (() if key is None else (key,)))


def _f(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, ge=None, gt=None,
       le=None, lt=None, required=False, internal=False, compare=True, repr=None):
    """A dataclass field with the validator's metadata (bounds, required, internal:
    not a YAML key of the section; hidden from repr unless `repr` says otherwise)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "required": required, "internal": internal}
    return field(default=default, default_factory=factory, metadata=meta, compare=compare,
                 repr=not internal if repr is None else repr)


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


class _Entry(_Section):
    """A typed entry: a class name plus that class's constructor arguments (`kwargs`).

    `error(key, message)` locates a problem with one argument at its YAML line (or the
    `--set` that gave it), falling back to the entry's own line.
    """

    def _at(self) -> tuple:
        """The entry's key path, e.g. ("model", "layers", 3)."""
        raise NotImplementedError

    def path(self, key=None) -> str:
        """Dotted path of this entry or one of its arguments: "model.layers[3].momentum"."""
        return format_path(self._at() + (() if key is None else (key,)))

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
class LayerSpec(_Entry):
    """One `model.layers` entry: a layer class name and its keyword arguments.

    Only the structure is validated here; the model builder checks the arguments
    against the layer class (`distbn.train.entries`) and reports problems with
    `error(key, message)`.

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

    def _at(self) -> tuple:
        return ("model", "layers", self.index)


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


# Where the config's defaults differ from the constructors' (Keras') defaults; the
# resolved config writes them out. Every other argument takes the constructor's default.
OPTIMIZER_DEFAULTS = {
    "sgd": {"learning_rate": 0.01, "momentum": 0.9},
    "adam": {"learning_rate": 0.01},
    "adamw": {"learning_rate": 0.01, "weight_decay": 0.0},
}
# cosine: a null decay_steps decays over the rest of training (the builder knows how long).
SCHEDULE_DEFAULTS = {"constant": {}, "step": {}, "cosine": {"decay_steps": None}}


class _ArgumentsEntry(_Entry):
    """An entry named by `name` whose arguments also read as attributes."""

    AT = ()  # the entry's key path (a class attribute, not a field)

    def _at(self) -> tuple:
        return self.AT

    def _defaults(self) -> dict:
        """The named class's constructor defaults (what an omitted argument means)."""
        raise NotImplementedError

    def __getattr__(self, attr):
        # Called only for names that are not fields: `optimizer.momentum` is the given
        # value, else the constructor's default; a name the class does not take is an
        # AttributeError (as `copy` and `pickle` expect for their hooks).
        if attr.startswith("_"):
            raise AttributeError(attr)
        kwargs = self.__dict__.get("kwargs", {})
        if attr in kwargs:
            return kwargs[attr]
        defaults = self._defaults()
        if attr in defaults:
            return defaults[attr]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no "
                             f"argument {attr!r}")

    def to_dict(self) -> dict:
        """The entry as written in YAML: `{"name": ..., **kwargs, ...}`."""
        out = {"name": self.name, **copy.deepcopy(self.kwargs)}
        for f in _fields(type(self)):
            if f.name != "name":
                out[f.name] = _to_plain(getattr(self, f.name))
        return out


def _constructor_defaults(cls) -> dict:
    out = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None and klass is not object:
            out.update({p.name: p.default for p in inspect.signature(init).parameters.values()
                        if p.default is not p.empty})
    return out


@dataclass(frozen=True)
class ScheduleConfig(_ArgumentsEntry):
    """`train.optimizer.schedule`: the learning-rate schedule, a typed entry.

    `name` picks the class of `distbn.train.schedules` ("constant": `Constant`, "step":
    `StepDecay`, "cosine": `CosineDecay`); the other keys are its constructor's
    arguments (`warmup_steps`, `warmup_from`, `decay_steps`, `decay_rate`, `alpha`),
    checked by it. The base rate is the optimizer's `learning_rate`. A cosine
    `decay_steps` of null (the default) decays over the rest of training after warm-up.

    Attributes:
        name: "constant" (default), "step" or "cosine".
        kwargs: the constructor arguments given (config defaults filled in).
        locations: key -> "file:line" or "--set ..." ("" for the entry itself).
    """

    AT = ("train", "optimizer", "schedule")
    # The base-rate argument (Constant's, the decays'): the optimizer's learning_rate.
    RATE_ARGUMENTS = ("learning_rate", "initial_learning_rate")

    name: Literal["constant", "step", "cosine"] = "constant"
    kwargs: dict = _f(factory=dict, internal=True, repr=True)
    locations: dict = _f(factory=dict, internal=True, compare=False)

    def _defaults(self) -> dict:
        return _constructor_defaults(schedules.get_class(self.name))

    def arguments(self, learning_rate, steps=None) -> dict:
        """The schedule constructor's arguments.

        Args:
            learning_rate: the optimizer's `learning_rate` (the base rate).
            steps: total training steps: a null cosine `decay_steps` becomes `steps`
                minus the warm-up (at least 1); None (checking a config before the data
                size is known): 1.

        Returns:
            The keyword arguments for `schedules.get_class(name)`.
        """
        cls = schedules.get_class(self.name)
        accepted = entries.accepted_arguments(cls)[0]
        rate = next(a for a in self.RATE_ARGUMENTS if a in accepted)
        out = {rate: learning_rate, **self.kwargs}
        if self.name == "cosine" and out.get("decay_steps") is None:
            warmup = out.get("warmup_steps", 0)
            out["decay_steps"] = 1 if steps is None else max(steps - warmup, 1)
        return out


@dataclass(frozen=True)
class OptimizerConfig(_ArgumentsEntry):
    """`train.optimizer`: the optimizer, a typed entry (Keras names and rules).

    `name` picks the class of `distbn.train.optimizers` ("sgd": `SGD`, "adam": `Adam`,
    "adamw": `AdamW`); the other keys are its constructor's arguments, checked by it
    (an argument the class does not take is an error), except two that belong to the
    trainer: `global_clipnorm` and `schedule`. The config's defaults differ from
    Keras' in `OPTIMIZER_DEFAULTS` (learning_rate 0.01 for all, sgd momentum 0.9,
    adamw weight_decay 0). Arguments read as attributes: `optimizer.momentum`.

    Attributes:
        name: "sgd" (default), "adam" or "adamw".
        global_clipnorm: clip the global gradient norm to this (> 0, checked by
            `optimizers.check_clipnorm`) after the gradient all-reduce; null: off.
        schedule: `ScheduleConfig`; default constant.
        kwargs: the constructor arguments given (config defaults filled in).
        locations: key -> "file:line" or "--set ..." ("" for the entry itself).
    """

    AT = ("train", "optimizer")

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    global_clipnorm: float | None = None
    schedule: ScheduleConfig = _f(factory=ScheduleConfig)
    kwargs: dict = _f(factory=lambda: dict(OPTIMIZER_DEFAULTS["sgd"]), internal=True,
                      repr=True)
    locations: dict = _f(factory=dict, internal=True, compare=False)

    def _defaults(self) -> dict:
        return _constructor_defaults(optimizers.get_class(self.name))

    def arguments(self, schedule) -> dict:
        """The optimizer constructor's arguments, with `schedule` (a
        `LearningRateSchedule` built from `self.schedule`) as the learning rate."""
        return {**self.kwargs, "learning_rate": schedule}


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

def _fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _to_plain(obj):
    if isinstance(obj, _Entry):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in _fields(type(obj))}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return copy.deepcopy(obj)

