"""Run pytest under mpiexec from inside a serial pytest, with a hard timeout.

A deadlock stops the whole process group (`distbn.launcher`: SIGTERM, a grace period,
SIGKILL) and is reported as a failure with the ranks' output; nothing is left running.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from distbn.launcher import run_mpiexec

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class MPIRun:
    nprocs: int
    returncode: int
    output: str
    timed_out: bool

    def failure_report(self, tail: int = 12000) -> str:
        what = "timed out (deadlock?)" if self.timed_out else f"exit code {self.returncode}"
        return f"mpiexec -n {self.nprocs}: {what}; ranks' output (tail):\n{self.output[-tail:]}"


def run_mpi(nprocs: int, argv: list[str], timeout: float, env=None) -> MPIRun:
    """Run `mpiexec -n nprocs python -m mpi4py argv...`; stop everything after `timeout` s.

    Args:
        nprocs, argv, timeout: the ranks, their arguments after `-m mpi4py`, seconds.
        env: extra environment variables for the ranks (on top of os.environ).
    """
    base = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")
    res = run_mpiexec(nprocs, [sys.executable, "-m", "mpi4py", *argv], tag_output=True,
                      env=base, cwd=REPO, timeout=timeout, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT)
    return MPIRun(nprocs, res.returncode, res.stdout, timed_out=res.timed_out)


def run_mpi_pytest(
    nprocs: int, paths: list[str], timeout: float, per_test_timeout: float | None = 60,
    env: dict | None = None,
) -> MPIRun:
    """Run pytest with pytest-mpi on `paths` at `nprocs` ranks.

    `per_test_timeout` uses pytest-timeout's thread method, which dumps the stacks and exits
    the rank, so mpiexec ends the others at once; `None` leaves only the outer timeout.
    `env`: extra environment variables for the ranks.
    """
    argv = ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", *paths]
    if per_test_timeout is None:
        argv += ["-p", "no:timeout"]
    else:
        argv += [f"--timeout={per_test_timeout}", "--timeout-method=thread"]
    return run_mpi(nprocs, argv, timeout, env=env)
