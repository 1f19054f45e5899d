"""The trainer's configuration: validation with line numbers, typed entries, overrides.

A config is read by `yaml_io.load_yaml` (safe: plain values only, duplicate keys refused,
the line of every key recorded; `1e-3` is a float, as in YAML 1.2).

`--set a.b.c=VALUE` overrides are parsed as YAML values and applied to the raw mapping
before validation, so they meet exactly the checks the file does. Validation turns the
mapping into frozen dataclasses (`Config` and its sections); every error is a
`ConfigError` whose message starts with where the offending value came from:

    config.yaml:12: train.global_batch_size: must be >= 1, got 0
    --set train.stepz=3: unknown key 'train.stepz' (did you mean 'train.steps'?)

`epochs` versus `steps`: giving both in one place (both in the file, or both as
overrides) is an error. An override that sets one of them to a value clears the other
if that came from the file, so `--set train.steps=12` on a file with `epochs: 5` trains
for 12 steps. Giving neither means `epochs: 1`.

Typed entries (`model.layers` items, `train.optimizer`, its `schedule`) name a class and
give its constructor's arguments; the optimizer and the schedule are checked here by
their constructors (`distbn.train.entries`), the layers when the model is built:

    config.yaml:15: train.optimizer.momentum: unknown argument 'momentum' for optimizer
    'adam' (accepted: ...; 'momentum' is an argument of 'sgd')

The module is the validation, the overrides and the entry points; the schema (the
dataclasses) is `distbn.train.config_schema`, the YAML reading and writing
`distbn.train.yaml_io`, the typed-entry checks `distbn.train.entries`. Their public
names are importable from here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Literal, Union

from distbn.checks import is_bool, is_int, is_number
from distbn.train import entries, optimizers, schedules
from distbn.train.config_schema import (
    OPTIMIZER_DEFAULTS,
    SCHEDULE_DEFAULTS,
    CheckpointConfig,
    Config,
    DataConfig,
    LayerSpec,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    PreciseBNConfig,
    ScheduleConfig,
    StrategyConfig,
    TrainConfig,
    _fields,
    layer_path,
)
from distbn.train.yaml_io import ConfigError, config_hash, config_to_yaml, format_path, load_yaml

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "ModelConfig",
    "LayerSpec",
    "TrainConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "PreciseBNConfig",
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
        return is_bool(value), bool(value) if is_bool(value) else None
    if atom is int:  # bool is an int subclass in Python, but never an int here
        ok = is_int(value)
        return ok, int(value) if ok else None
    if atom is float:
        ok = is_number(value)
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
    if hint is OptimizerConfig:
        return _build_optimizer(value, path, ctx)
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
    if is_number(clean) and not _in_bounds(clean, meta):
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


# `train.optimizer` keys that are the trainer's, not the optimizer constructor's.
_TRAINER_KEYS = ("global_clipnorm", "schedule")


def _entry_arguments(raw, path, ctx, selector="name", skip=()):
    """The raw mapping of a typed entry: (mapping, {argument: plain value}, locations)."""
    if raw is None:  # `optimizer:` alone means all defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.error(path, f"expected a mapping, got {raw!r}")
    given = {}
    for key, arg in raw.items():
        if not isinstance(key, str):
            raise ctx.error(path, f"argument names must be strings, got {key!r}")
        if key != selector and key not in skip:
            given[key] = _plain(arg, path + (key,), ctx)
    locations = {"": ctx.locate(path)}
    locations.update({key: ctx.locate(path + (key,)) for key in raw})
    return raw, given, locations


def _accepted(cls, supplied) -> list[str]:
    return [a for a in entries.accepted_arguments(cls)[0] if a not in supplied]


def _build_optimizer(raw, path, ctx) -> OptimizerConfig:
    """`train.optimizer`: a typed entry, checked by the optimizer's constructor (and its
    schedule by the schedule's)."""
    raw, given, locations = _entry_arguments(raw, path, ctx, skip=_TRAINER_KEYS)
    hints = _hints(OptimizerConfig)
    name = _coerce(hints["name"], raw.get("name", "sgd"), path + ("name",), ctx, {})
    clip = _coerce(hints["global_clipnorm"], raw.get("global_clipnorm"),
                   path + ("global_clipnorm",), ctx, {})
    if clip is not None:
        try:
            optimizers.check_clipnorm(clip, "global_clipnorm")
        except ValueError as err:
            raise ctx.error(path + ("global_clipnorm",), str(err)) from None
    entry = OptimizerConfig(name=name, global_clipnorm=clip,
                            kwargs={**OPTIMIZER_DEFAULTS[name], **given}, locations=locations)
    cls = optimizers.get_class(name)
    # The entry's `name` selects the class; the constructor's own `name` is not the user's.
    siblings = {n: _accepted(optimizers.get_class(n), ("name",))
                for n in OPTIMIZER_DEFAULTS if n != name}
    entries.check_arguments(entry, entry.kwargs, _accepted(cls, ("name",)),
                            f"optimizer {name!r}", also=("name",) + _TRAINER_KEYS,
                            siblings=siblings, required=entries.required_arguments(cls))
    rate = entry.kwargs.get("learning_rate")
    if isinstance(rate, (dict, list)):
        raise entry.error("learning_rate", "expected a number (a schedule goes in "
                                           f"train.optimizer.schedule), got {rate!r}")
    entries.construct(entry, cls, entry.kwargs, cls.__name__)
    schedule = _build_schedule(raw.get("schedule"), path + ("schedule",), ctx, rate)
    return dataclasses.replace(entry, schedule=schedule)


def _build_schedule(raw, path, ctx, learning_rate) -> ScheduleConfig:
    """`train.optimizer.schedule`: a typed entry, checked by the schedule's constructor."""
    raw, given, locations = _entry_arguments(raw, path, ctx)
    name = _coerce(_hints(ScheduleConfig)["name"], raw.get("name", "constant"),
                   path + ("name",), ctx, {})
    entry = ScheduleConfig(name=name, kwargs={**SCHEDULE_DEFAULTS[name], **given},
                           locations=locations)
    cls = schedules.get_class(name)
    supplied = ScheduleConfig.RATE_ARGUMENTS
    siblings = {n: _accepted(schedules.get_class(n), supplied)
                for n in SCHEDULE_DEFAULTS if n != name}
    entries.check_arguments(entry, entry.kwargs, _accepted(cls, supplied),
                            f"schedule {name!r}", also=("name",), supplied=supplied,
                            siblings=siblings, required=entries.required_arguments(cls))
    entries.construct(entry, cls, entry.arguments(learning_rate), cls.__name__,
                      keys=entry.kwargs)
    return entry



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
    value, _ = load_yaml(raw, where)
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
        raw, lines = load_yaml(text_or_mapping, source)
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


