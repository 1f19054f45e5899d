"""Preemption: SIGTERM, SIGUSR1 and SIGINT ask training to checkpoint and stop.

So does the death of the process that started this one (mpiexec's proxy, a shell), or
of the `distbn launch` process on this host (`LAUNCHER_ENV`): ranks whose launcher was
killed would otherwise train on unseen and then wait forever for a rank that is gone.
It reads as `ORPHANED`, checked at every step.

The handler only sets a flag. At the next step boundary the ranks agree (an all-reduce
MAX of the flag, so a signal that reached one rank stops them all at the same step),
write a checkpoint, and exit with `PREEMPTED_EXIT_CODE`, which a SLURM job script can
turn into `scontrol requeue` (see launch/slurm.sbatch).
"""

from __future__ import annotations

import os
import signal
import socket
import threading

__all__ = ["LAUNCHER_ENV", "ORPHANED", "PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "Preempted",
           "PreemptionFlag"]

#: EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: `distbn launch` sets it to "<host>:<pid>" of itself for the ranks it starts.
LAUNCHER_ENV = "DISTBN_LAUNCHER"

# The parent when this process started training (import time: before any file is
# written, so a launcher that dies early is still noticed).
_PARENT_AT_START = os.getppid()

#: The stop "signal" of a process whose parent exited: above every signal number, so the
#: ranks' all-reduce MAX of their stop flags carries it.
ORPHANED = 256


def _local_launcher() -> int | None:
    """The pid in LAUNCHER_ENV when it names this host (pids mean nothing elsewhere)."""
    host, _, pid = os.environ.get(LAUNCHER_ENV, "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return int(pid)


def _alive(pid) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's (a reused pid): not ours to judge
        return True
    return True


class Preempted(Exception):
    """Training stopped at a step boundary after a signal; a checkpoint was written.

    Attributes:
        step: the step the checkpoint holds.
        signum: the signal that asked for it.
        path: the checkpoint's directory (None on ranks other than 0).
    """

    def __init__(self, step: int, signum: int, path=None):
        why = ("its launcher exited" if signum == ORPHANED
               else signal.Signals(signum).name)
        super().__init__(f"stopped at step {step} after {why}")
        self.step, self.signum, self.path = step, signum, path


class PreemptionFlag:
    """Catches the stop signals while installed; `pending()` says whether to stop."""

    def __init__(self):
        self.signum = 0  # the last stop signal caught (0: none)
        self._parent = None
        self._launcher = None  # the pid of `distbn launch` when it runs on this host
        self._previous = {}

    def pending(self) -> int:
        """The stop signal caught, else ORPHANED if the parent process has exited since
        this process started, else 0."""
        if self.signum:
            return self.signum
        if self._parent is not None and (os.getppid() != self._parent
                                         or not _alive(self._launcher)):
            return ORPHANED
        return 0

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Install the handlers (main thread only; elsewhere a no-op). Returns self."""
        self._parent = _PARENT_AT_START
        self._launcher = _local_launcher()
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
