"""docs/configuration.md cannot drift from the code: every config key, layer type and
layer argument, optimizer, schedule and data source the code accepts is named there."""

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest

from distbn.layers import registry
from distbn.train import config as cfg
from distbn.train import entries, optimizers, schedules

DOC = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
# Every name the page uses, in tables, prose or examples.
CODE_NAMES = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", DOC))


def _sections():
    """(dotted prefix, dataclass) for every config section."""
    out, todo = [], [("", cfg.Config)]
    while todo:
        prefix, klass = todo.pop()
        out.append((prefix, klass))
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            kind = hints.get(f.name)
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                todo.append((f"{prefix}{f.name}.", kind))
    return out


def _keys():
    for prefix, klass in _sections():
        for f in dataclasses.fields(klass):
            if not f.metadata.get("internal") and klass is not cfg.LayerSpec:
                yield prefix + f.name


@pytest.mark.parametrize("key", sorted(set(_keys())))
def test_every_config_key_is_documented(key):
    assert key.rsplit(".", 1)[-1] in CODE_NAMES, f"docs/configuration.md lacks `{key}`"


@pytest.mark.parametrize("name", registry.layer_names())
def test_every_layer_type_and_its_arguments_are_documented(name):
    assert name in CODE_NAMES, f"docs/configuration.md lacks layer `{name}`"
    cls = registry.get_layer_class(name)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass.__name__ == "Layer":
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name not in ("self", "kwargs") and p.kind is not p.VAR_POSITIONAL:
                assert p.name in CODE_NAMES, (
                    f"docs/configuration.md lacks argument `{p.name}` of {name}")


def test_every_choice_is_documented():
    for prefix, klass in _sections():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            kind = hints.get(f.name)
            args = typing.get_args(kind)
            choices = [a for a in args if isinstance(a, str)]
            for arg in args:  # Literal inside Optional
                choices += [c for c in typing.get_args(arg) if isinstance(c, str)]
            if typing.get_origin(kind) is typing.Literal or choices:
                for choice in choices:
                    assert choice in CODE_NAMES, (
                        f"docs/configuration.md lacks `{choice}` ({prefix}{f.name})")


@pytest.mark.parametrize("kind,name", [("optimizer", n) for n in cfg.OPTIMIZER_DEFAULTS]
                         + [("schedule", n) for n in cfg.SCHEDULE_DEFAULTS])
def test_every_optimizer_and_schedule_argument_is_documented(kind, name):
    # Typed entries: the constructor's signature is the list of keys.
    cls = (optimizers if kind == "optimizer" else schedules).get_class(name)
    assert name in CODE_NAMES, f"docs/configuration.md lacks {kind} `{name}`"
    for arg in entries.accepted_arguments(cls)[0]:
        assert arg in CODE_NAMES, f"docs/configuration.md lacks argument `{arg}` of {name}"
