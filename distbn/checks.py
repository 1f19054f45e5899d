"""Argument checks shared by the layers, initializers, regularizers, optimizers, schedules
and the training helpers: "an int but not a bool", "a positive integer", "a number in bounds".

A leaf (numpy only), so any module may import it. Every failure is a ValueError whose
text names the argument and quotes the value: "<name> must be <what>, got <name>=<value>"
(`named=False`: "got <value>", the form some older messages keep; `where`: a prefix such as
the class name). Python's bool is an int subclass, and numpy's integers and floats are not
Python ints and floats: the predicates settle both once.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["is_bool", "is_int", "is_number", "fail", "check_bool", "check_int",
           "check_positive_int", "check_number"]


def is_bool(value) -> bool:
    """True for Python and numpy booleans."""
    return isinstance(value, (bool, np.bool_))


def is_int(value) -> bool:
    """True for Python and numpy integers, not for booleans."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for real Python and numpy numbers (ints and floats), not for booleans."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def fail(name: str, what: str, value, *, named: bool = True, where: str | None = None):
    """Raise the ValueError "<where>: <name> must be <what>, got <name>=<value!r>".

    Args:
        name: the argument's name.
        what: what it must be, e.g. "a positive integer".
        value: the value received (quoted with repr).
        named: False quotes the value alone ("got 5").
        where: an optional prefix, e.g. the class or function name.

    Raises:
        ValueError: always.
    """
    got = f"{name}={value!r}" if named else repr(value)
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}{name} must be {what}, got {got}")


def check_bool(value, name: str, *, what: str = "a bool", named: bool = True,
               where: str | None = None) -> bool:
    """`value` as a bool; a ValueError for anything else (0 and 1 included).

    Args:
        value: the argument.
        name, what, named, where: as for `fail`.

    Returns:
        bool(value).
    """
    if not is_bool(value):
        fail(name, what, value, named=named, where=where)
    return bool(value)


def _int_what(minimum, maximum) -> str:
    if minimum is None and maximum is None:
        return "an integer"
    if maximum is None:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}")
    if minimum is None:
        return f"an integer <= {maximum}"
    return f"an integer in {minimum}..{maximum}"


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              what: str | None = None, named: bool = True, where: str | None = None) -> int:
    """`value` as an int (not a bool), optionally in `minimum..maximum` (inclusive).

    Args:
        value: the argument.
        name: its name, for the message.
        minimum, maximum: inclusive bounds, or None.
        what: the message's description; by default from the bounds ("a positive
            integer", "an integer >= 4", "an integer in 1..10").
        named, where: as for `fail`.

    Returns:
        int(value).
    """
    if (not is_int(value) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        fail(name, what or _int_what(minimum, maximum), value, named=named, where=where)
    return int(value)


def check_positive_int(value, name: str, *, what: str = "a positive integer",
                       named: bool = True, where: str | None = None) -> int:
    """`value` as an int >= 1 (not a bool); see `check_int`."""
    return check_int(value, name, minimum=1, what=what, named=named, where=where)


def _number_what(low, high, low_open, high_open, finite) -> str:
    if low is not None and high is not None:
        return f"a float in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    fin = "finite " if finite else ""
    if low is None and high is None:
        return f"a {fin}float"
    if high is None and low == 0:
        return f"a {'positive' if low_open else 'non-negative'} {fin}float"
    if high is None:
        return f"a {fin}float {'>' if low_open else '>='} {low:g}"
    return f"a {fin}float {'<' if high_open else '<='} {high:g}"


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True,
                 what: str | None = None, named: bool = True,
                 where: str | None = None) -> float:
    """`value` as a float: a real number (not a bool), finite unless `finite=False`, in
    the interval the bounds give.

    Args:
        value: the argument.
        name: its name, for the message.
        low, high: the interval's ends, or None for unbounded.
        low_open, high_open: exclude that end.
        finite: refuse nan and the infinities (an interval with both ends does anyway).
        what: the message's description; by default from the bounds ("a float in
            [0, 1)", "a non-negative finite float", "a positive finite float").
        named, where: as for `fail`.

    Returns:
        float(value).
    """
    ok = is_number(value)
    if ok:
        v = float(value)
        ok = ((not finite or math.isfinite(v))
              and (low is None or (v > low if low_open else v >= low))
              and (high is None or (v < high if high_open else v <= high)))
    if not ok:
        fail(name, what or _number_what(low, high, low_open, high_open, finite), value,
             named=named, where=where)
    return float(value)
