"""Environment report: versions, BLAS, MPI library, and where each rank runs."""

from __future__ import annotations

import os
import platform
import socket
import sys

__all__ = ["blas_info", "kernels_info", "environment", "format_info"]


def blas_info() -> str:
    """Return the BLAS numpy was built with, e.g. 'scipy-openblas 0.3.29'."""
    import numpy as np

    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy has no dict mode; the report is informational only
        return "unknown"


def kernels_info() -> str:
    """The active batch-norm kernel backend, e.g. 'numba 0.68.1 (fused), 1 thread'."""
    from distbn import ops

    try:
        info = ops.backend_info()
    except (ValueError, RuntimeError) as exc:  # a bad DISTBN_KERNELS: show why
        return f"error: {exc}"
    if info["name"] == "numba":
        threads = info["threads"]
        return f"numba {info['numba']} (fused), {threads} thread{'s' * (threads != 1)}"
    return "numpy" + (f" ({info['fallback']})" if "fallback" in info else "")


def environment(comm=None) -> dict:
    """Collect the environment; under MPI, every rank's host and pid (gathered to all)."""
    import mpi4py
    import numpy as np
    from mpi4py import MPI

    import distbn

    comm = MPI.COMM_WORLD if comm is None else comm
    ranks = comm.allgather({"rank": comm.rank, "host": socket.gethostname(), "pid": os.getpid()})
    return {
        "distbn": distbn.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "blas": blas_info(),
        "kernels": kernels_info(),
        "mpi4py": mpi4py.__version__,
        "mpi_library": " ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "world_size": comm.size,
        "ranks": ranks,
    }


def format_info(env: dict) -> str:
    """Human-readable form of `environment()`."""
    lines = [
        f"distbn       {env['distbn']}",
        f"python       {env['python']} ({env['python_executable']})",
        f"numpy        {env['numpy']} (BLAS: {env['blas']})",
        f"BN kernels   {env.get('kernels', '?')}",
        f"mpi4py       {env['mpi4py']}",
        f"MPI library  {env['mpi_library']} (MPI {env['mpi_standard']})",
        f"world size   {env['world_size']}",
    ]
    for r in env["ranks"]:
        lines.append(f"  rank {r['rank']:>3}  host {r['host']}  pid {r['pid']}")
    return "\n".join(lines)
