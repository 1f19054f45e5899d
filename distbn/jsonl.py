"""JSON Lines: one strict-JSON record a line (metrics.jsonl, study.jsonl), read and written.

Strict means no NaN/Infinity tokens (other tools' JSON parsers refuse them): `json_safe`
turns non-finite floats into null, numpy scalars and arrays into plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["json_safe", "JsonlWriter", "read_jsonl"]


def json_safe(obj):
    """`obj` with non-finite floats as None, numpy values as Python ones, tuples as lists.

    Args:
        obj: nested dicts, lists, tuples, numbers, strings, numpy scalars or arrays.

    Returns:
        The converted copy (strict JSON can hold it).
    """
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy value
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


class JsonlWriter:
    """Appends strict-JSON records to a file, one a line, flushed after each.

    Args:
        path: the file.
        append: keep what is there (else it is truncated).
    """

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        """Write one record (through `json_safe`)."""
        self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._fh.flush()

    write = __call__

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path, on_partial: Callable[[int, str], None] | None = None) -> list:
    """The records of a JSON Lines file, in order (blank lines skipped).

    Args:
        path: the file.
        on_partial: for a file still being written: a last line without its newline
            that is not JSON (a record half written) is skipped and this is called with
            its line number and text; None makes it an error like any other bad line.

    Returns:
        The parsed records.

    Raises:
        ValueError: a line that is not JSON, quoting "path:line".
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if on_partial is not None and number == len(lines) and not text.endswith("\n"):
                on_partial(number, line)
                continue
            raise ValueError(f"{path}:{number}: not JSON ({err})") from err
    return records
