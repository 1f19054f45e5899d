"""Training progress on the console: a tqdm bar, periodic log lines, or nothing.

Rank 0 reports (`logging.progress`: "auto" is a bar on a terminal when tqdm is
installed, lines otherwise); other ranks are quiet unless `--verbose`, and then print
lines. Every line carries its rank, so interleaved output from several ranks stays
readable: `[rank 0] step 40/390 epoch 0 loss 1.2300 acc 0.5600 lr 0.049 1234 samples/s`.
"""

from __future__ import annotations

import os
import sys

__all__ = ["TTY_ENV", "Progress", "LineProgress", "BarProgress", "make_progress",
           "format_step", "tqdm_available"]

#: `distbn launch` sets this when its own stderr is a terminal: under mpiexec the ranks'
#: streams are pipes, but what they write still ends on that terminal.
TTY_ENV = "DISTBN_PROGRESS_TTY"


def tqdm_available() -> bool:
    """Whether tqdm can be imported (the `progress` extra)."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def format_step(rank, step, total, stats) -> str:
    """One log line for a logged training step.

    Args:
        rank: the replica id printed in front.
        step: steps done so far; total: steps in the run.
        stats: dict with epoch, loss, accuracy, learning_rate, samples_per_sec.

    Returns:
        e.g. "[rank 0] step 40/390 epoch 0 loss 1.2300 acc 0.5600 lr 0.049 1234 samples/s".
    """
    return (f"[rank {rank}] step {step}/{total} epoch {stats['epoch']} "
            f"loss {stats['loss']:.4f} acc {stats['accuracy']:.4f} "
            f"lr {stats['learning_rate']:.3g} {stats['samples_per_sec']:.0f} samples/s")


class Progress:
    """Reports nothing (`progress: none`, and quiet ranks); the interface of the others.

    Args:
        rank: this replica's id.
        total: the number of training steps.
        out: the stream for lines (default sys.stdout).
    """

    def __init__(self, rank, total, out=None):
        self.rank = rank
        self.total = total
        self.out = out

    def step(self, step, stats=None) -> None:
        """Called after every step; `stats` (see `format_step`) on logged steps only."""

    def message(self, text) -> None:
        """A free-form line such as an evaluation result (prefixed with the rank)."""

    def close(self) -> None:
        """Finish (close the bar)."""

    def _print(self, text) -> None:
        print(f"[rank {self.rank}] {text}", file=self.out or sys.stdout, flush=True)


class LineProgress(Progress):
    """One line per logged step and per message."""

    def step(self, step, stats=None) -> None:
        if stats is not None:
            print(format_step(self.rank, step, self.total, stats),
                  file=self.out or sys.stdout, flush=True)

    def message(self, text) -> None:
        self._print(text)


class BarProgress(Progress):
    """A tqdm bar on stderr: steps, with loss, accuracy and samples/s as its postfix."""

    def __init__(self, rank, total, out=None):
        super().__init__(rank, total, out)
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=f"[rank {rank}] train", unit="step",
                         dynamic_ncols=True, file=sys.stderr, leave=True)

    def step(self, step, stats=None) -> None:
        self._bar.update(step - self._bar.n)
        if stats is not None:
            self._bar.set_postfix(
                {"epoch": stats["epoch"], "loss": f"{stats['loss']:.4f}",
                 "acc": f"{stats['accuracy']:.4f}",
                 "samples/s": f"{stats['samples_per_sec']:.0f}"}, refresh=False)

    def message(self, text) -> None:
        from tqdm import tqdm

        tqdm.write(f"[rank {self.rank}] {text}", file=self.out or sys.stdout)

    def close(self) -> None:
        self._bar.close()


def _on_terminal() -> bool:
    if os.environ.get(TTY_ENV) == "1":
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def make_progress(mode, rank, total, verbose=False, out=None) -> Progress:
    """The progress reporter for this rank.

    Args:
        mode: `logging.progress`: "auto", "bar", "lines" or "none".
        rank: this replica's id; only rank 0 reports unless `verbose`.
        total: the number of training steps.
        verbose: other ranks print lines too.
        out: the stream for lines (default sys.stdout).

    Returns:
        A `Progress`.
    """
    if mode not in ("auto", "bar", "lines", "none"):
        raise ValueError(f"progress mode must be 'auto', 'bar', 'lines' or 'none', got {mode!r}")
    if rank != 0:
        return LineProgress(rank, total, out) if verbose else Progress(rank, total, out)
    if mode == "none":
        return Progress(rank, total, out)
    if mode == "bar" or (mode == "auto" and _on_terminal()):
        if tqdm_available():
            return BarProgress(rank, total, out)
    return LineProgress(rank, total, out)
