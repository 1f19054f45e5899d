"""From a validated `Config` to the objects training needs: data, model, optimizer, loss.

Everything here is local work (no collective), so every rank can build, and the caller
decides collectively whether all of them succeeded. Problems in the model section are
`ConfigError`s located at the layer entry's YAML line (`LayerSpec.error`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from distbn import random as _random
from distbn.layers import activations, registry
from distbn.layers.base import snake_case
from distbn.models import Model, Sequential
from distbn.train import data as _data
from distbn.train import entries
from distbn.train import losses as _losses
from distbn.train import optimizers as _optimizers
from distbn.train import schedules as _schedules
from distbn.train.config import ConfigError

__all__ = [
    "Dataset",
    "load_dataset",
    "layer_kwargs",
    "build_model",
    "total_steps",
    "build_schedule",
    "build_optimizer",
    "build_loss",
]


class Dataset:
    """The train and test splits, in the model's dtype and data format.

    Attributes:
        x_train, y_train, x_test, y_test: arrays; x in `data_format`, y int64 labels.
        mask_train, mask_test: (N, steps) bool masks of sequence data, or None.
        num_classes: the number of classes.
        input_shape: one sample's shape in `data_format` (no batch axis).
    """

    def __init__(self, x_train, y_train, x_test, y_test, num_classes, mask_train=None,
                 mask_test=None):
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.mask_train, self.mask_test = mask_train, mask_test
        self.num_classes = int(num_classes)
        self.input_shape = tuple(x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset(train={self.x_train.shape}, test={self.x_test.shape}, "
                f"num_classes={self.num_classes})")


def load_dataset(config) -> Dataset:
    """Load (or generate) the data a config names, cast and laid out for its model.

    Args:
        config: a validated `Config`.

    Returns:
        A `Dataset`. Raises `data.DataError` for an unusable .npz file.
    """
    d, m = config.data, config.model
    mask_train = mask_test = None
    if d.name == "patterns":
        x_train, y_train, x_test, y_test = _data.make_patterns(
            d.n_train, d.n_test, image_size=d.image_size, num_classes=d.num_classes,
            seed=config.seed, dtype=m.dtype)
    elif d.name == "npy":  # memory-mapped: converted a batch at a time, never loaded
        x_train, y_train, x_test, y_test = _data.open_npy_dir(d.path, num_classes=d.num_classes)
        if d.n_train is not None:
            x_train, y_train = x_train[:d.n_train], y_train[:d.n_train]
        if d.n_test is not None:
            x_test, y_test = x_test[:d.n_test], y_test[:d.n_test]
        return Dataset(_data.MappedSamples(x_train, m.dtype, m.data_format), y_train,
                       _data.MappedSamples(x_test, m.dtype, m.data_format), y_test,
                       d.num_classes)
    else:
        x_train, y_train, x_test, y_test = _data.load_npz(d.path, num_classes=d.num_classes)
        mask_train, mask_test = _data.load_npz_masks(d.path, x_train.shape, x_test.shape)
        # n_train/n_test: "the first n samples" of the user's file.
        if d.n_train is not None:
            x_train, y_train = x_train[:d.n_train], y_train[:d.n_train]
            mask_train = None if mask_train is None else mask_train[:d.n_train]
        if d.n_test is not None:
            x_test, y_test = x_test[:d.n_test], y_test[:d.n_test]
            mask_test = None if mask_test is None else mask_test[:d.n_test]
        x_train = x_train.astype(m.dtype, copy=False)
        x_test = x_test.astype(m.dtype, copy=False)
    if mask_train is not None and m.data_format == "channels_first":
        raise _data.DataError(f"{d.path}: masks follow the steps axis of channels_last "
                              "sequences; set model.data_format: channels_last")
    return Dataset(_data.to_data_format(x_train, m.data_format), y_train,
                   _data.to_data_format(x_test, m.data_format), y_test, d.num_classes,
                   mask_train=mask_train, mask_test=mask_test)


def layer_kwargs(spec, model_config) -> tuple[type, dict]:
    """Resolve one `model.layers` entry to its class and constructor arguments.

    Adds the model-wide defaults: `synchronized` for BatchNormalization entries that do
    not set it, `data_format` for layers that take one, and `dtype=model.dtype`.

    Args:
        spec: a `LayerSpec`.
        model_config: the `ModelConfig` it belongs to.

    Returns:
        (layer class, kwargs). Raises `ConfigError` quoting the entry's YAML line.
    """
    try:
        cls = registry.get_layer_class(spec.type)
    except ValueError as err:
        raise spec.error("type", str(err)) from None
    accepted, open_kwargs = entries.accepted_arguments(cls)
    kwargs = dict(spec.kwargs)
    kwargs.pop(INPUTS_KEY, None)  # the model's wiring, not the layer's (see build_model)
    if not open_kwargs:
        entries.check_arguments(spec, kwargs, accepted, f"layer type {spec.type!r}",
                                required=entries.required_arguments(cls))
    if "dtype" in kwargs and kwargs["dtype"] != model_config.dtype:
        # One dtype per model: mixing would silently cast activations between layers.
        raise spec.error("dtype", f"layers take model.dtype ({model_config.dtype!r}); "
                                  f"remove this key or set model.dtype, got {kwargs['dtype']!r}")
    kwargs["dtype"] = model_config.dtype
    if cls.has_moving_statistics:  # BN entries: model.synchronized is their default
        kwargs.setdefault("synchronized", model_config.synchronized)
    if "data_format" in accepted:
        kwargs.setdefault("data_format", model_config.data_format)
    return cls, kwargs


# A layer entry's key naming the layers (or "input") whose outputs it takes.
INPUTS_KEY = "inputs"


def _wiring(specs, names) -> dict:
    """{layer name: [source names]} from the entries that have `inputs`, checked for type;
    the graph itself (unknown names, cycles) is checked by `Model`, blamed here."""
    wiring = {}
    for spec, name in zip(specs, names, strict=True):
        if INPUTS_KEY not in spec.kwargs:
            continue
        srcs = spec.kwargs[INPUTS_KEY]
        if isinstance(srcs, str):
            srcs = [srcs]
        if not isinstance(srcs, list) or not srcs or not all(isinstance(x, str) for x in srcs):
            raise spec.error(INPUTS_KEY, "must be a layer name or a non-empty list of layer "
                                         f"names (or 'input'), got {srcs!r}")
        wiring[name] = srcs
    return wiring


def _auto_names(specs) -> list[str]:
    """Keras-style names per model (conv2d, conv2d_1, ...), avoiding names given in YAML.

    Per model rather than per process, so model.npz keys do not depend on what else the
    process built before.
    """
    taken = {s.kwargs["name"] for s in specs if isinstance(s.kwargs.get("name"), str)}
    counts: dict[str, int] = {}
    names = []
    for spec in specs:
        if "name" in spec.kwargs:
            names.append(spec.kwargs["name"])
            continue
        try:
            base = snake_case(registry.get_layer_class(spec.type).__name__)
        except ValueError:
            base = snake_case(spec.type)  # reported properly by layer_kwargs
        while True:
            n = counts.get(base, 0)
            counts[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
            if name not in taken:
                break
        taken.add(name)
        names.append(name)
    return names


def build_model(config, input_shape, num_classes=None, strategy=None) -> Sequential:
    """Build and initialise the model a config describes.

    The process-wide generator is reseeded with `config.seed` first, so every rank
    builds the same initial weights. Layers are created inside `strategy.scope()`, since
    BatchNormalization takes its strategy when constructed.

    Args:
        config: a validated `Config`.
        input_shape: one sample's shape (no batch axis), in `model.data_format`.
        num_classes: if given, the model's output must be `(batch, num_classes)`.
        strategy: the strategy synchronized layers use; None: the current one.

    Returns:
        A built `Sequential`, or a `Model` (a subclass) when some entry names its
        `inputs`. Raises `ConfigError` located at the offending entry.
    """
    _random.set_seed(config.seed)
    specs = config.model.layers
    names = _auto_names(specs)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    layers = []
    with scope:
        for spec, name in zip(specs, names, strict=True):
            cls, kwargs = layer_kwargs(spec, config.model)
            kwargs["name"] = name
            layers.append(entries.construct(spec, cls, kwargs, spec.type, keys=spec.kwargs))
    dups = [s for s, n in zip(specs, names, strict=True) if names.count(n) > 1]
    if dups:
        dup = next((s for s in dups if "name" in s.kwargs), dups[0])
        raise dup.error("name", f"duplicate layer name {names[dup.index]!r}; layer names "
                                "must be unique inside a model")
    wiring = _wiring(specs, names)
    spec_of = dict(zip(names, specs, strict=True))
    try:
        model = Model(layers, inputs=wiring, name="model") if wiring else Sequential(
            layers, name="model")
    except ValueError as err:  # a name that is not a layer, a cycle, a dangling output
        blamed = next((spec_of[n] for n in names if f"layer {n!r}" in str(err)), specs[-1])
        raise blamed.error(INPUTS_KEY if INPUTS_KEY in blamed.kwargs else None,
                           str(err)) from None
    # Build layer by layer so a shape problem is blamed on its entry.
    shape = (None,) + tuple(input_shape)
    built = model.build_layers(shape)
    for i in model.order:
        spec, layer = specs[i], layers[i]
        try:
            _, shape = next(built)
        except (TypeError, ValueError) as err:
            where = ", ".join(model.sources(i))
            raise spec.error(None, f"{spec.type} {layer.name!r} cannot take the output of "
                                   f"{where}: {err}") from None
    model.build((None,) + tuple(input_shape))
    shape = tuple(model.compute_output_shape((None,) + tuple(input_shape)))
    if num_classes is not None and shape != (None, num_classes):
        raise specs[-1].error(None, f"the model's output shape is {shape}, but the data "
                                    f"have {num_classes} classes: end with a layer of "
                                    f"output shape (None, {num_classes}), e.g. "
                                    f"{{type: Dense, units: {num_classes}}}")
    _check_output_activation(config, specs[-1], layers[-1])
    return model


def _check_output_activation(config, spec, last) -> None:
    """A softmax output and train.from_logits must agree: a softmax fed to a logits
    loss trains silently badly (the loss floors well above zero), and logits fed to a
    probabilities loss are not probabilities."""
    train = config.train
    if train.loss != "sparse_categorical_crossentropy":
        return
    activation = getattr(last, "activation", None)
    softmax = activation is not None and activations.serialize(activation) == "softmax"
    if softmax and train.from_logits:
        raise spec.error(None, f"{spec.type} {last.name!r} ends the model with a softmax, but "
                               "train.from_logits is true (the loss would apply a second "
                               "softmax): set train.from_logits: false, or drop the "
                               "softmax and keep logits")
    if not softmax and not train.from_logits:
        raise spec.error(None, f"{spec.type} {last.name!r} outputs unnormalised scores (no "
                               "softmax), but train.from_logits is false (Keras' default: "
                               "the loss expects probabilities): set train.from_logits: "
                               "true, or end the model with activation: softmax")


def total_steps(config, n_train) -> int:
    """Optimizer steps the run takes: `train.steps`, or epochs times batches per epoch.

    Args:
        config: a validated `Config`.
        n_train: number of training samples.

    Returns:
        The number of steps (>= 1). Raises `ConfigError` when an epoch has no batch.
    """
    t = config.train
    per_epoch = _data.steps_per_epoch(n_train, t.global_batch_size, t.drop_last)
    if per_epoch == 0:
        raise ConfigError(f"{config.source}: train.global_batch_size: {t.global_batch_size} "
                          f"is larger than the {n_train} training samples with drop_last "
                          "true, so an epoch has no batch", path="train.global_batch_size")
    return t.steps if t.steps is not None else t.epochs * per_epoch


def build_schedule(optimizer_config, steps) -> _schedules.LearningRateSchedule:
    """The learning-rate schedule of `train.optimizer` (its `schedule` entry, with the
    optimizer's `learning_rate` as the base rate).

    Args:
        optimizer_config: an `OptimizerConfig`.
        steps: total training steps (cosine with decay_steps null decays over
            `steps - warmup_steps`, at least 1).

    Returns:
        A `LearningRateSchedule`.
    """
    s = optimizer_config.schedule
    cls = _schedules.get_class(s.name)
    return entries.construct(s, cls, s.arguments(optimizer_config.learning_rate, steps),
                             cls.__name__, keys=s.kwargs)


def build_optimizer(optimizer_config, steps) -> _optimizers.Optimizer:
    """The optimizer of `train.optimizer`, with its schedule.

    Args:
        optimizer_config: an `OptimizerConfig`.
        steps: total training steps (for a cosine schedule's default length).

    Returns:
        An `Optimizer`.
    """
    o = optimizer_config
    cls = _optimizers.get_class(o.name)
    return entries.construct(o, cls, o.arguments(build_schedule(o, steps)), cls.__name__,
                             keys=o.kwargs)


def build_loss(train_config, num_classes, dtype):
    """The loss as `fn(outputs, labels) -> (per-sample losses, d(sum)/d(outputs))`.

    Args:
        train_config: a `TrainConfig` (its `loss`).
        num_classes: number of classes (mse compares against one-hot labels).
        dtype: the model dtype (of the one-hot targets).

    Returns:
        The function.
    """
    if train_config.loss == "sparse_categorical_crossentropy":
        from_logits = train_config.from_logits

        def crossentropy(outputs, labels):
            return _losses.sparse_categorical_crossentropy(outputs, labels, from_logits)

        return crossentropy
    eye = np.eye(num_classes, dtype=dtype)

    def mse_one_hot(outputs, labels):
        return _losses.mean_squared_error(outputs, eye[labels])

    return mse_one_hot
