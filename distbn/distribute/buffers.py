"""Argument checks shared by every strategy, so one replica fails exactly like many.

The checks are a few attribute reads; they run before any communication, on every rank,
so a bad argument raises everywhere instead of leaving the other ranks waiting.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REDUCE_OPS", "check_buffer", "check_op", "check_root"]

# Names accepted by `all_reduce(op=...)`; the MPI objects are looked up by MPIStrategy.
REDUCE_OPS = ("sum", "max", "min")


def check_buffer(buf, what: str = "buf") -> np.ndarray:
    """Check that `buf` can be reduced or broadcast in place by the buffer API.

    Args:
        buf: the array the caller wants updated in place.
        what: the argument's name, for the error message.

    Returns:
        `buf` itself.

    Raises:
        TypeError: not a numpy array, or a dtype MPI reductions here do not support.
        ValueError: not C-contiguous, read-only, or not in native byte order.
    """
    if not isinstance(buf, np.ndarray):
        raise TypeError(
            f"{what} must be a numpy array updated in place, got {type(buf).__name__}: "
            f"{_short_repr(buf)}"
        )
    dt = buf.dtype
    if not dt.isnative:
        raise ValueError(f"{what} must be in native byte order, got dtype {dt.str!r}")
    if not (dt in (np.float32, np.float64) or (dt.kind in "iu" and dt.itemsize in (1, 2, 4, 8))):
        raise TypeError(
            f"{what} must have dtype float32, float64 or an integer type, got {dt.name!r} "
            f"(shape {buf.shape})"
        )
    # A copy (np.ascontiguousarray) would be reduced instead of the caller's array, so the
    # in-place contract is checked rather than silently repaired.
    if not buf.flags.c_contiguous:
        raise ValueError(
            f"{what} must be a C-contiguous array (it is updated in place), got shape "
            f"{buf.shape} with strides {buf.strides}; pass np.ascontiguousarray(...) and use "
            "the returned array"
        )
    if not buf.flags.writeable:
        raise ValueError(
            f"{what} must be writeable (it is updated in place), got a read-only array"
        )
    return buf


def check_op(op) -> str:
    """Check a reduction name.

    Args:
        op: one of "sum", "max", "min".

    Returns:
        `op`.

    Raises:
        ValueError: quoting the unknown value.
    """
    if op not in REDUCE_OPS:  # `in` on a tuple of str: any unhashable value just fails
        raise ValueError(f"op must be one of {', '.join(map(repr, REDUCE_OPS))}; got {op!r}")
    return op


def check_root(root, size: int) -> int:
    """Check a broadcast root against the number of replicas.

    Args:
        root: the replica whose value every replica receives.
        size: the number of replicas.

    Returns:
        `root` as an int.

    Raises:
        TypeError: not an integer (bool included).
        ValueError: outside [0, size).
    """
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"root must be an integer replica id, got {root!r}")
    if not 0 <= root < size:
        raise ValueError(f"root must be in [0, {size}) for {size} replica(s), got {root!r}")
    return int(root)


def _short_repr(obj, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."
