"""Process-wide seeded random generator used by initializers (and Dropout's default).

Data-parallel training seeds it identically on every rank (then broadcasts rank 0's
weights anyway), so a model built after `set_seed(s)` is the same in every process.
"""

from __future__ import annotations

import numpy as np

__all__ = ["set_seed", "generator"]

_rng = np.random.default_rng(0)


def set_seed(seed: int) -> None:
    """Reseed the process-wide generator."""
    global _rng
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _rng = np.random.default_rng(int(seed))


def generator() -> np.random.Generator:
    """The process-wide generator (reseeded by `set_seed`)."""
    return _rng
