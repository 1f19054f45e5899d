"""Abort the whole MPI job when any rank dies of an uncaught exception.

Without this, a rank that raises simply exits while the others wait forever in their
next collective (`python -m mpi4py` aborts, plain `python script.py` does not). The
hook prints the traceback once, every line prefixed `[rank N]` so interleaved output
from several ranks stays readable, then calls `MPI.COMM_WORLD.Abort(1)`, which makes
the launcher end every rank.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

__all__ = ["install_abort_hook", "abort_hook_installed", "abort_job", "format_rank_traceback"]

_lock = threading.Lock()
_previous = None  # the excepthook we replaced, chained for custom hooks


#: Seconds between printing the traceback and aborting (see `_abort_excepthook`).
ABORT_GRACE_SECONDS = 0.5


def install_abort_hook() -> None:
    """Install the abort-on-uncaught-exception `sys.excepthook` (once per process).

    A hook the user installed before is still called first (the default hook is not,
    since this one prints the traceback itself).
    """
    global _previous
    with _lock:
        if _previous is not None:
            return
        _previous = sys.excepthook
        sys.excepthook = _abort_excepthook


def abort_hook_installed() -> bool:
    """Whether `install_abort_hook` has run and its hook is still `sys.excepthook`.

    Returns:
        True when uncaught exceptions end the whole MPI job.
    """
    return _previous is not None and sys.excepthook is _abort_excepthook


def format_rank_traceback(rank: int, exc_type, exc, tb) -> str:
    """The traceback as the default hook prints it, each line prefixed `[rank N] `.

    Args:
        rank: the rank to name.
        exc_type, exc, tb: as given to `sys.excepthook`.

    Returns:
        The text, ending in a newline.
    """
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    return "".join(f"[rank {rank}] {line}\n" for line in text.splitlines())


def _abort_excepthook(exc_type, exc, tb):
    mpi = sys.modules.get("mpi4py.MPI")
    world = None
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        world = mpi.COMM_WORLD
    if world is None or world.Get_size() == 1:
        # Nothing to tear down: behave exactly like the hook we replaced.
        _previous(exc_type, exc, tb)
        return
    if _previous is not sys.__excepthook__:
        try:
            _previous(exc_type, exc, tb)
        except BaseException:  # a broken user hook must not stop the abort
            pass
    try:
        sys.stderr.write(format_rank_traceback(world.Get_rank(), exc_type, exc, tb))
        sys.stderr.flush()
        sys.stdout.flush()
    except BaseException:  # closed or broken streams: aborting matters more than printing
        pass
    abort_job(1)


def abort_job(code: int = 1) -> None:
    """End the whole MPI job: `COMM_WORLD.Abort(code)`, after a short pause.

    The launcher's proxy forwards this rank's stderr asynchronously, and Abort makes it
    kill every rank: without the pause, a report just written can be lost (seen with
    Hydra, about one run in fifty). The job still ends within a second.
    """
    from mpi4py import MPI

    time.sleep(ABORT_GRACE_SECONDS)
    MPI.COMM_WORLD.Abort(code)
