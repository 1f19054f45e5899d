"""Run the `distbn` command in a subprocess with a hard timeout (its process group is
stopped on expiry by `distbn.launcher`, so a hang fails the test instead of the suite)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from distbn.launcher import run_group
from distbn.mpiexec import mpiexec_command, rank_env

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def report(self) -> str:
        what = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (f"{what} after {self.seconds:.1f}s\n--- stdout:\n{self.stdout[-8000:]}\n"
                f"--- stderr:\n{self.stderr[-8000:]}")


def distbn(args, timeout: float = 120, cwd=None, env=None) -> Result:
    """Run `python -m distbn ARGS...` (one BLAS thread per process)."""
    return run([sys.executable, "-m", "distbn", *map(str, args)], timeout, cwd, env)


def mpiexec_python(nprocs: int, args, timeout: float = 60, via_mpi4py: bool = True) -> Result:
    """Run `mpiexec -n N python [-m mpi4py] ARGS...`."""
    python = [sys.executable, *(["-m", "mpi4py"] if via_mpi4py else [])]
    return run(mpiexec_command(nprocs, [*python, *map(str, args)]), timeout)


def run(cmd, timeout: float, cwd=None, env=None) -> Result:
    """Run `cmd` in its own process group, stopped whole after `timeout` seconds
    (`distbn.launcher`'s policy: SIGTERM to the group, a grace period, SIGKILL)."""
    full_env = rank_env(env)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.pop("DISTBN_CHECK_COLLECTIVES", None)
    res = run_group(cmd, cwd=cwd or REPO, env=full_env, timeout=timeout,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return Result(res.returncode, res.stdout, res.stderr, res.seconds, res.timed_out)
