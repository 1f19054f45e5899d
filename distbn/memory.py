"""Keep freed array memory mapped, so that a training loop reuses it without page faults.

A training step allocates and frees arrays of the same few sizes (each layer's output
and input gradient). By default glibc's malloc serves large requests with fresh `mmap`s
(always above 32 MiB; from 128 KiB up, until a freed chunk raises the threshold) and
gives the top of its heap back to the kernel once more than M_TRIM_THRESHOLD of it is
free. Either way the next step faults every page in again and the kernel zeroes it:
about 1000 page faults per step for two 16 MiB arrays after the process has allocated
and freed a few large ones, and for every array above 32 MiB (`tests/test_memory.py`
counts them). `retain_freed_memory` sets, once, for the whole process:

* M_MMAP_MAX = 0: every allocation comes from the heap, so freed memory is reused;
* M_TRIM_THRESHOLD = 1 GiB: up to that much freed memory at the top of the heap stays
  mapped for the next step instead of going back to the kernel.

The price: the process keeps up to 1 GiB more resident than it uses, and memory in the
middle of the heap is only reused, never returned, until the process ends.
distbn's commands (`distbn train`, `bench`, `compare`, `distbn bench kernel`)
call it; importing distbn does not. `DISTBN_MALLOC=default` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["retain_freed_memory", "malloc_setting"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
_CHOICES = ("retain", "default")
_applied = {"setting": "default"}


def malloc_setting() -> str:
    """What this process runs with: "retain" once `retain_freed_memory` took effect,
    else "default"."""
    return _applied["setting"]


def retain_freed_memory() -> bool:
    """Set glibc's malloc thresholds as the module docstring says, unless told not to.

    Returns:
        True when the thresholds are now set; False with `DISTBN_MALLOC=default` or
        where the C library has no glibc `mallopt` (musl, macOS: nothing to do there).

    Raises:
        ValueError: `DISTBN_MALLOC` is neither "retain" nor "default".
    """
    choice = os.environ.get("DISTBN_MALLOC", "retain")
    if choice not in _CHOICES:
        raise ValueError(
            f"DISTBN_MALLOC must be one of {', '.join(_CHOICES)}, got DISTBN_MALLOC={choice!r}"
        )
    if choice == "default":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError where not glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        _applied["setting"] = "retain"
    return ok
