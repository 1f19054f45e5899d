"""What a suite runs with: the size profile, the communicator, and progress output."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from distbn.bench import timing

__all__ = ["MODES", "Context"]

#: Size profiles: "full" (the default), "quick" (minutes on a laptop), "tiny" (seconds;
#: for the tests, where only the plumbing matters).
MODES = ("full", "quick", "tiny")


class Context:
    """The run a suite belongs to: size profile, ranks, and where progress goes.

    Suites are called on every rank of `comm` together (their timings are collective)
    and return records on rank 0 only.

    Args:
        mode: one of MODES.
        comm: an mpi4py Intracomm, or None for one process without MPI.
        stream: where progress lines go (default sys.stderr); only rank 0 writes.
        start: `time.perf_counter()` value progress times count from (default now).
    """

    def __init__(self, mode: str = "full", comm=None, stream=None, start=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        self.mode = mode
        self.comm = comm
        self.size = 1 if comm is None else comm.Get_size()
        self.rank = 0 if comm is None else comm.Get_rank()
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter() if start is None else start

    @property
    def is_root(self) -> bool:
        """Whether this rank writes output and returns the records."""
        return self.rank == 0

    def pick(self, full, quick, tiny):
        """The value for this run's mode."""
        return {"full": full, "quick": quick, "tiny": tiny}[self.mode]

    def progress(self, message: str) -> None:
        """One line to stderr on rank 0, prefixed with the elapsed time and world size."""
        if self.is_root:
            elapsed = time.perf_counter() - self.start
            print(f"[bench n={self.size} {elapsed:6.1f}s] {message}", file=self.stream,
                  flush=True)

    def barrier(self) -> None:
        """Wait for every rank (nothing with one)."""
        if self.comm is not None and self.size > 1:
            self.comm.Barrier()

    def agree_max(self, value: float) -> float:
        """The maximum of `value` over ranks (so that every rank loops the same count)."""
        if self.comm is None or self.size == 1:
            return value
        return self.comm.allreduce(value, op=_mpi_max())

    def calibrate(self, fn: Callable[[], object], target_s: float, max_inner: int = 10000) -> int:
        """`timing.calibrate_inner`, agreed over ranks (every rank must call `fn` alike).

        Ranks calibrate separately, so `fn` must not communicate; use `inner` for
        collectives via `calibrate_collective`.
        """
        return int(self.agree_max(timing.calibrate_inner(fn, target_s, max_inner)))

    def calibrate_collective(self, fn: Callable[[], object], target_s: float,
                             max_inner: int = 10000) -> int:
        """Calls per sample for a collective `fn`: every rank makes the same calls.

        Grows the count by 4x until a sample lasts `target_s / 4` on the slowest rank.
        """
        n = 1
        fn()
        while n < max_inner:
            self.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if self.agree_max(time.perf_counter() - t0) >= target_s / 4:
                break
            n *= 4
        return min(n, max_inner)

    def time(self, fn: Callable[[], object], repeats: int, warmup: int,
             inner: int = 1) -> timing.Stats:
        """Per-call seconds of `fn`: slowest rank per sample, barrier before each sample.

        Args:
            fn: the operation, called the same number of times on every rank.
            repeats, warmup, inner: as `timing.sample`.

        Returns:
            `Stats` in seconds.
        """
        s = timing.sample(fn, repeats, warmup, inner, before=self.barrier)
        return timing.Stats(timing.collective_max(self.comm, s))

    def time_pair(self, fn_a, fn_b, repeats: int, warmup: int,
                  inner: int = 1) -> tuple[timing.Stats, timing.Stats, np.ndarray, np.ndarray]:
        """Alternating timing of two operations (see `timing.sample_pair`), slowest rank.

        Returns:
            (stats_a, stats_b, samples_a, samples_b): seconds; the samples pairwise aligned.
        """
        a, b = timing.sample_pair(fn_a, fn_b, repeats, warmup, inner, before=self.barrier)
        a = timing.collective_max(self.comm, a)
        b = timing.collective_max(self.comm, b)
        return timing.Stats(a), timing.Stats(b), a, b


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX
