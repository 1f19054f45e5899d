"""Timing primitives: repeated samples, their summary, and collective (max over ranks) timing.

Every benchmark number is the median of `repeats` samples taken after `warmup` untimed
calls; the spread travels with it. A sample of a fast operation averages `inner` calls
so that the timer's resolution and the loop's overhead stay far below the measured time.
Under MPI a sample is the slowest rank's time, which is what a synchronous step waits for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Stats", "summarize", "calibrate_inner", "sample", "sample_pair",
           "sample_interleaved", "collective_max"]

_clock = time.perf_counter


class Stats:
    """Median and spread of a set of samples.

    Attributes:
        samples: the samples (float64 array), in the order taken.
        median, min, max, q1, q3, iqr, stdev: their summary.
    """

    def __init__(self, samples: Sequence[float]):
        s = np.asarray(samples, dtype=np.float64).reshape(-1)
        if s.size == 0:
            raise ValueError("Stats needs at least one sample, got none")
        self.samples = s
        self.median = float(np.median(s))
        self.min = float(s.min())
        self.max = float(s.max())
        self.q1, self.q3 = (float(q) for q in np.percentile(s, [25, 75]))
        self.iqr = self.q3 - self.q1
        self.stdev = float(s.std(ddof=1)) if s.size > 1 else 0.0

    def scaled(self, factor: float) -> Stats:
        """The same samples multiplied by `factor` (e.g. seconds to microseconds)."""
        return Stats(self.samples * factor)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Stats:
        """Stats of `fn(samples)`, e.g. a bandwidth from times (`lambda t: bytes / t`)."""
        return Stats(fn(self.samples))

    def spread(self, warmup: int | None = None) -> dict:
        """The record's `spread` dict: min, max, q1, q3, iqr, stdev, repeats (and warmup)."""
        out = {"min": self.min, "max": self.max, "q1": self.q1, "q3": self.q3,
               "iqr": self.iqr, "stdev": self.stdev, "repeats": int(self.samples.size)}
        if warmup is not None:
            out["warmup"] = int(warmup)
        return out

    def __repr__(self) -> str:
        return (f"Stats(median={self.median:.4g}, iqr={self.iqr:.3g}, "
                f"n={self.samples.size})")


def summarize(samples: Sequence[float]) -> Stats:
    """`Stats` of `samples`.

    Args:
        samples: one or more numbers.

    Returns:
        A `Stats`.
    """
    return Stats(samples)


def calibrate_inner(fn: Callable[[], object], target_s: float, max_inner: int = 10000) -> int:
    """How many calls of `fn` one sample should average so that it lasts about `target_s`.

    Args:
        fn: the operation (called a few times here; these calls also warm it up).
        target_s: the wanted duration of one sample, in seconds.
        max_inner: upper bound on the result.

    Returns:
        An int in [1, max_inner].
    """
    fn()
    n, elapsed = 1, 0.0
    while n < max_inner:
        t0 = _clock()
        for _ in range(n):
            fn()
        elapsed = _clock() - t0
        if elapsed >= target_s / 4:
            break
        n *= 4
    per_call = max(elapsed / n, 1e-9)
    return int(min(max(round(target_s / per_call), 1), max_inner))


def sample(fn: Callable[[], object], repeats: int, warmup: int, inner: int = 1,
           before: Callable[[], object] | None = None) -> np.ndarray:
    """Time `fn`: `warmup` untimed samples, then `repeats` timed ones.

    Args:
        fn: the operation.
        repeats: timed samples (>= 1).
        warmup: untimed samples first.
        inner: calls per sample; a sample is their mean time.
        before: called untimed before every sample (e.g. a barrier).

    Returns:
        float64 array of `repeats` per-call times in seconds.
    """
    return sample_interleaved({"op": fn}, repeats, warmup, inner, before=before)["op"]


def sample_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int,
                warmup: int, inner: int = 1,
                before: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Time two operations alternately, so slow phases of a noisy machine hit both alike.

    Per-pair ratios or differences of the results are then much steadier than ratios of
    medians taken minutes apart.

    Args:
        fn_a, fn_b: the two operations.
        repeats, warmup, inner, before: as `sample`.

    Returns:
        (times_a, times_b): float64 arrays of per-call seconds, pairwise aligned.
    """
    out = sample_interleaved({"a": fn_a, "b": fn_b}, repeats, warmup, inner, before=before)
    return out["a"], out["b"]


def sample_interleaved(fns: dict, repeats: int, warmup: int, inner=1, settle: int = 0,
                       before: Callable[[], object] | None = None) -> dict:
    """Time several operations in turn, one sample of each per round (`sample_pair` for
    any number), so per-round ratios see the same moment of the machine.

    Args:
        fns: {name: operation}, timed in this order within a round.
        repeats: timed rounds (>= 1).
        warmup: untimed rounds first.
        inner: calls per sample: an int, or {name: int}.
        settle: untimed calls of an operation just before its sample: after another one
            ran, its first calls refill the caches the other evicted; `settle` keeps
            that out, so each is timed in its steady state, as in a loop.
        before: called untimed before every sample.

    Returns:
        {name: float64 array of `repeats` per-call seconds}, aligned by round.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got repeats={repeats!r}")
    counts = {k: int(inner[k] if isinstance(inner, dict) else inner) for k in fns}
    out = {k: np.empty(repeats) for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            if before is not None:
                before()
            n = counts[name]
            t0 = _clock()
            for _ in range(n):
                fn()
            dt = (_clock() - t0) / n
            if i >= warmup:
                out[name][i - warmup] = dt
    return out


def collective_max(comm, values: np.ndarray) -> np.ndarray:
    """Elementwise maximum of `values` over the ranks of `comm` (None: unchanged).

    A synchronous step takes as long as its slowest rank, so per-sample times are
    combined with MAX before they are summarised.

    Args:
        comm: an mpi4py communicator or None.
        values: float64 array, the same shape on every rank.

    Returns:
        A new float64 array (every rank gets it).
    """
    out = np.ascontiguousarray(values, dtype=np.float64).copy()
    if comm is None or comm.Get_size() == 1:
        return out
    from mpi4py import MPI

    comm.Allreduce(MPI.IN_PLACE, out, op=MPI.MAX)
    return out
