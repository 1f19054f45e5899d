"""Typed config entries: a mapping that names a class and gives its constructor's arguments.

`model.layers` entries (`{type: Conv2D, filters: 8}`), `train.optimizer`
(`{name: sgd, momentum: 0.9}`) and `train.optimizer.schedule` (`{name: cosine, alpha:
0.1}`) are checked one way: the constructor's signature decides which arguments exist
(an unknown one is refused with "did you mean" or the accepted list, and a required one
that is missing is named), and the constructor itself checks the values, so every bound
lives in one place, the class. Errors come from the entry's `error(key, message)`, which
locates them at the key's YAML line (or the `--set` that gave it).
"""

from __future__ import annotations

import difflib
import inspect

__all__ = ["accepted_arguments", "required_arguments", "check_arguments", "blame",
           "construct"]


def accepted_arguments(cls) -> tuple[list[str], bool]:
    """Keyword arguments `cls(...)` accepts, following `**kwargs` up the MRO.

    Returns:
        (names, open): open is True when some __init__ takes **kwargs that no base
        class consumes, i.e. any name is accepted.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind in
                  (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names, False
        if klass.__name__ == "Layer":  # Layer's **kwargs only exists to reject extras
            return names, False
    return names, True


def required_arguments(cls) -> list[str]:
    """The arguments of `cls.__init__` that have no default (in signature order)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_arguments(entry, keys, accepted, what, *, also=(), supplied=(), siblings=None,
                    required=()) -> None:
    """Refuse a key the class does not take, and name a required one that is missing.

    Args:
        entry: the entry (a `LayerSpec`, `OptimizerConfig`, ...): its `error(key, message)`
            builds the located error.
        keys: the argument names the entry gives.
        accepted: the constructor's argument names (`accepted_arguments`).
        what: the class as the message names it, e.g. "layer type 'Conv2D'" or
            "optimizer 'adam'".
        also: other keys the entry may hold (e.g. `schedule`); offered as suggestions.
        supplied: constructor arguments the config fills in itself (not the user's).
        siblings: {choice: accepted names} of the other classes the entry could name; a
            key one of them takes is pointed there ("'momentum' is an argument of 'sgd'").
        required: the constructor's required arguments (`required_arguments`).

    Raises:
        ConfigError: from `entry.error`.
    """
    allowed = [a for a in accepted if a not in supplied] + [a for a in also if a not in accepted]
    for key in keys:
        if key in allowed:
            continue
        # A truncated name ("warmup") offers every completion; else the closest one.
        close = [a for a in allowed if a.startswith(key)][:2] or difflib.get_close_matches(
            key, allowed, n=1, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                else "accepted: " + ", ".join(allowed))
        takers = [name for name, args in (siblings or {}).items() if key in args]
        if takers:
            hint += (" " if close else "; ") + f"{key!r} is an argument of " + " and ".join(
                repr(t) for t in takers)
        raise entry.error(key, f"unknown argument {key!r} for {what} ({hint})")
    for key in required:
        if key not in keys and key not in supplied:
            raise entry.error(key, f"required for {what}")


def blame(message: str, keys) -> str | None:
    """The argument an error message is about ("momentum=1.5" names momentum), or None."""
    for key in keys:
        if f"{key}=" in message or message.startswith(f"{key} "):
            return key
    return None


def construct(entry, cls, kwargs: dict, label: str, keys=None):
    """`cls(**kwargs)`, with the constructor's own complaint located at its argument.

    Args:
        entry: the entry (its `error(key, message)` locates the message).
        cls: the class.
        kwargs: the constructor arguments.
        label: the message's prefix, e.g. the class name ("SGD: momentum must be ...").
        keys: the argument names to blame (default: those of `kwargs`).

    Returns:
        The object. Raises `ConfigError` for a TypeError, ValueError or
        NotImplementedError of the constructor.
    """
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, NotImplementedError) as err:
        raise entry.error(blame(str(err), kwargs if keys is None else keys),
                          f"{label}: {err}") from None
