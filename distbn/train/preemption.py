"""Preemption: SIGTERM, SIGUSR1 and SIGINT ask training to checkpoint and stop.

The handler only sets a flag. At the next step boundary the ranks agree (an all-reduce
MAX of the flag, so a signal that reached one rank stops them all at the same step),
write a checkpoint, and exit with `PREEMPTED_EXIT_CODE`, which a SLURM job script can
turn into `scontrol requeue` (see launch/slurm.sbatch).
"""

from __future__ import annotations

import signal
import threading

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "Preempted", "PreemptionFlag"]

#: EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Training stopped at a step boundary after a signal; a checkpoint was written.

    Attributes:
        step: the step the checkpoint holds.
        signum: the signal that asked for it.
        path: the checkpoint's directory (None on ranks other than 0).
    """

    def __init__(self, step: int, signum: int, path=None):
        super().__init__(f"stopped at step {step} after {signal.Signals(signum).name}")
        self.step, self.signum, self.path = step, signum, path


class PreemptionFlag:
    """Catches the stop signals while installed; `signum` is the last one seen (0: none)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Install the handlers (main thread only; elsewhere a no-op). Returns self."""
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
