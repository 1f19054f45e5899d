"""Shared plumbing of the configurable object families: initializers, regularizers,
constraints and learning-rate schedules.

`Configurable` gives each family's base class Keras' `get_config` / `from_config` and a
`__repr__` built from the config. Keras 3 names initializers, regularizers and
constraints by a string (class name or snake_case alias), by a serialized dict
`{"module", "class_name", "config", "registered_name"}`, or by the object itself;
`resolve` and `serialize` handle all three the same way for each family.
"""

from __future__ import annotations

import inspect

__all__ = ["Configurable", "build", "resolve", "serialize"]


class Configurable:
    """Base of an object family whose constructor arguments are its config."""

    def get_config(self) -> dict:
        """The constructor arguments (JSON-serializable); subclasses add theirs."""
        return {}

    @classmethod
    def from_config(cls, config: dict):
        """Rebuild from `get_config()`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def build(identifier, kwargs: dict, base: type, get_class, kind: str):
    """The `get` of the optimizer and schedule families: an instance of `base` (returned
    as is), a dict `{"type": name, **arguments}`, or a name with its arguments in `kwargs`.

    Args:
        identifier: what the user gave.
        kwargs: constructor arguments (none with an instance).
        base: the family's base class.
        get_class: name -> class, raising ValueError for an unknown name.
        kind: the family's name for messages, with its article ("an optimizer").

    Returns:
        The object. Raises ValueError quoting an unknown name or bad arguments.
    """
    if isinstance(identifier, base):
        if kwargs:
            raise ValueError(f"arguments {sorted(kwargs)} given with {kind} instance")
        return identifier
    if isinstance(identifier, dict):
        if "type" not in identifier:
            raise ValueError(f"{kind} dict needs a 'type' key, got {identifier!r}")
        kwargs = {**{k: v for k, v in identifier.items() if k != "type"}, **kwargs}
        identifier = identifier["type"]
    cls = get_class(identifier)
    try:
        return cls(**kwargs)
    except TypeError as err:
        name = kind.split(" ", 1)[-1]
        raise ValueError(f"bad arguments for {name} {identifier!r}: {err}") from err


def resolve(identifier, table: dict, kind: str, module: str):
    """Turn a name, Keras dict, class, instance or callable into an object of a family.

    Args:
        identifier: the value given by the user; None stays None (no such object).
        table: name -> class or factory (classes are instantiated with no arguments).
        kind: the family's name for error messages, e.g. "initializer".
        module: the Keras module of the family, e.g. "keras.initializers".

    Returns:
        A callable object, or None.
    """
    if identifier is None:
        return None
    if isinstance(identifier, dict):
        class_name = identifier.get("class_name")
        if class_name not in table:
            raise ValueError(f"Could not interpret {kind} identifier: {identifier!r}")
        given_module = identifier.get("module")
        if given_module not in (None, module, "builtins"):
            raise ValueError(
                f"{kind} dict has module {given_module!r}, expected {module!r}: {identifier!r}"
            )
        config = identifier.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError(f"{kind} dict has a non-dict config: {identifier!r}")
        try:
            return table[class_name](**config)
        except TypeError as err:
            raise ValueError(f"bad config for {kind} {class_name!r}: {config!r} ({err})") from err
    if isinstance(identifier, str):
        if identifier not in table:
            raise ValueError(
                f"Could not interpret {kind} identifier: {identifier!r} "
                f"(known: {', '.join(sorted(table))})"
            )
        return table[identifier]()
    if inspect.isclass(identifier):
        return identifier()
    if callable(identifier):
        return identifier
    raise ValueError(f"Could not interpret {kind} identifier: {identifier!r}")


def serialize(obj, module: str):
    """The Keras 3 serialized form of an object with `get_config` (None stays None).

    Args:
        obj: an initializer, regularizer or constraint, a plain function, or None.
        module: the Keras module name written into the dict.

    Returns:
        None, a dict `{"module", "class_name", "config", "registered_name"}`, or, for a
        plain function, its name (which only round-trips if it is a registered name).
    """
    if obj is None:
        return None
    if hasattr(obj, "get_config"):
        return {
            "module": module,
            "class_name": getattr(obj, "keras_name", type(obj).__name__),
            "config": obj.get_config(),
            "registered_name": None,
        }
    return getattr(obj, "__name__", repr(obj))
