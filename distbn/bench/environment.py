"""Where a benchmark ran: hosts, MPI, numpy/BLAS, CPU, distbn revision, date, threads, load."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["cpu_model", "git_revision", "git_dirty", "thread_settings", "kernel_backend",
           "kernel_backend_info", "load_average", "environment"]


def cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo (Linux), else `platform.processor()` or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "processor\t: ")):
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    return platform.processor() or None


def git_revision() -> str | None:
    """`git rev-parse HEAD` of the repository distbn is imported from, or None outside one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def git_dirty() -> bool | None:
    """Whether the working tree has uncommitted changes (None when git cannot tell)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def thread_settings() -> dict:
    """The thread-count environment variables (None where unset) and the CPU count."""
    from distbn.mpiexec import THREAD_VARS

    out = {var: os.environ.get(var) for var in THREAD_VARS}
    out["cpu_count"] = os.cpu_count()
    return out


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def kernel_backend() -> str:
    """The name of the active BN kernel backend (`distbn.ops.backend_name()`), else "numpy"."""
    from distbn import ops

    fn = getattr(ops, "backend_name", None)
    if callable(fn):
        return str(fn())
    return str(fn) if isinstance(fn, str) else "numpy"


def kernel_backend_info() -> dict:
    """Details of the active kernel backend (`distbn.ops.backend_info()`: numba version,
    threads, why numpy), or just its name where distbn.ops has no such function."""
    from distbn import ops

    fn = getattr(ops, "backend_info", None)
    info = dict(fn()) if callable(fn) else {}
    info.setdefault("name", kernel_backend())
    return info


def environment(comm=None) -> dict:
    """Where the benchmark ran: hosts, MPI, numpy/BLAS, CPU, distbn revision, date, threads.

    Collective over `comm` (gathers every rank's host and pid); with comm None, a
    one-process report without MPI details.

    Args:
        comm: an mpi4py communicator, or None.

    Returns:
        A JSON-friendly dict.
    """
    import numpy as np

    import distbn
    from distbn.info import blas_info

    if comm is not None:
        from distbn.info import environment as mpi_environment

        env = mpi_environment(comm)
    else:
        env = {
            "distbn": distbn.__version__, "python": platform.python_version(),
            "python_executable": sys.executable, "numpy": np.__version__,
            "blas": blas_info(), "mpi4py": None, "mpi_library": None, "mpi_standard": None,
            "world_size": 1,
            "ranks": [{"rank": 0, "host": socket.gethostname(), "pid": os.getpid()}],
        }
    env["hosts"] = sorted({r["host"] for r in env["ranks"]})
    env["cpu_model"] = cpu_model()
    env["git_revision"] = git_revision()
    env["git_dirty"] = git_dirty() if env["git_revision"] else None
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["threads"] = thread_settings()
    env["torch"] = _torch_version()
    env["kernel_backend"] = kernel_backend()
    env["kernel_backend_info"] = kernel_backend_info()
    env["DISTBN_KERNELS"] = os.environ.get("DISTBN_KERNELS")  # the backend switch, if set
    from distbn.memory import malloc_setting

    env["malloc"] = malloc_setting()  # "retain": freed memory kept for reuse (memory.py)
    env["platform"] = platform.platform()
    env["load_average"] = load_average()
    return env


def load_average() -> list | None:
    """1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None
