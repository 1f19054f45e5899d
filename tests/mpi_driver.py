"""Run pytest under mpiexec from inside a serial pytest, with a hard timeout.

A deadlock kills the whole process group and is reported as a failure with the ranks'
output; nothing is left running.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

from distbn.mpiexec import mpiexec_command, one_thread_env

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


def run_mpi(nprocs: int, argv: list[str], timeout: float) -> MPIRun:
    """Run `mpiexec -n nprocs python -m mpi4py argv...`; kill everything after `timeout` s."""
    cmd = mpiexec_command(nprocs, [sys.executable, "-m", "mpi4py", *argv], tag_output=True)
    env = one_thread_env()
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # own process group: a timeout kills mpiexec and every rank
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return MPIRun(nprocs, proc.returncode, out, timed_out=False)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return MPIRun(nprocs, proc.returncode, out, timed_out=True)


def run_mpi_pytest(
    nprocs: int, paths: list[str], timeout: float, per_test_timeout: float | None = 60
) -> MPIRun:
    """Run pytest with pytest-mpi on `paths` at `nprocs` ranks.

    `per_test_timeout` uses pytest-timeout's thread method, which dumps the stacks and exits
    the rank, so mpiexec ends the others at once; `None` leaves only the outer timeout.
    """
    argv = ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", *paths]
    if per_test_timeout is None:
        argv += ["-p", "no:timeout"]
    else:
        argv += [f"--timeout={per_test_timeout}", "--timeout-method=thread"]
    return run_mpi(nprocs, argv, timeout)
