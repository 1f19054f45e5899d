"""Environment report: versions, BLAS, MPI library, and where each rank runs."""

from __future__ import annotations

import os
import platform
import socket
import sys

from distbn import blas

__all__ = ["blas_info", "kernels_info", "environment", "format_info", "loaded_mpi_library",
           "mpi_problem", "MPI_HINT"]


def blas_info() -> str:
    """The BLAS numpy was built with and, for OpenBLAS, the core its kernels are for, e.g.
    'scipy-openblas 0.3.29, core Haswell (OPENBLAS_CORETYPE=Haswell is set; the CPU has
    AVX-512, which OpenBLAS's SkylakeX kernels use)'."""
    import numpy as np

    try:
        config = np.show_config(mode="dicts")
        built = config["Build Dependencies"]["blas"]
        text = f"{built.get('name', '?')} {built.get('version', '')}".strip()
    except Exception:  # older numpy has no dict mode; the report is informational only
        return "unknown"
    core = blas.openblas_core()
    if core is None:
        return text
    text += f", core {core}"
    if blas.held_below_cpu():
        pinned = os.environ.get(blas.CORETYPE_ENV)
        why = f"{blas.CORETYPE_ENV}={pinned} is set; " if pinned else ""
        text += f" ({why}the CPU has AVX-512, which OpenBLAS's SkylakeX kernels use)"
    return text


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


def loaded_mpi_library() -> str | None:
    """The file of the MPI library this process has loaded (from /proc/self/maps), e.g.
    '/venv/lib/libmpi.so.12'; None where that cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            paths = [line.split()[-1] for line in fh if "/libmpi" in line]
    except OSError:
        return None
    return paths[0] if paths else None


# What to do when mpi4py cannot load an MPI library.
MPI_HINT = ("load your cluster's MPI (e.g. `module load mpich` or `module load openmpi`), "
            "point MPI4PY_LIBMPI at its libmpi.so, or install MPICH from PyPI into this "
            "environment (`pip install mpich`, or `pip install -e \".[mpich]\"` from the clone)")


def mpi_problem() -> str | None:
    """None when mpi4py loads an MPI library, else why not (one line)."""
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception as exc:  # ImportError, or RuntimeError: cannot load MPI library
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = "; ".join(lines[:3]) or type(exc).__name__
        return f"{type(exc).__name__}: {reason}"
    return None


def environment(comm=None) -> dict:
    """Collect the environment; under MPI, every rank's host and pid (gathered to all).

    Without a loadable MPI library it still reports Python, numpy, BLAS and the kernels,
    with `mpi_library` saying why MPI does not load (and one rank).
    """
    import numpy as np

    import distbn

    env = {
        "distbn": distbn.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "blas": blas_info(),
        "kernels": kernels_info(),
    }
    try:
        import mpi4py

        env["mpi4py"] = mpi4py.__version__
    except ImportError as exc:
        env["mpi4py"] = f"not importable ({exc})"
    problem = mpi_problem()
    me = {"rank": 0, "host": socket.gethostname(), "pid": os.getpid()}
    if problem is not None:
        env.update(mpi_library=f"not loadable ({problem})", mpi_library_file=None,
                   mpi_standard=None, mpi_hint=MPI_HINT, world_size=1, ranks=[me])
        return env
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    me["rank"] = comm.rank
    env.update(
        mpi_library=" ".join(MPI.Get_library_version().strip().splitlines()[0].split()),
        mpi_library_file=loaded_mpi_library(),
        mpi_standard="{}.{}".format(*MPI.Get_version()),
        world_size=comm.size,
        ranks=comm.allgather(me),
    )
    return env


def format_info(env: dict) -> str:
    """Human-readable form of `environment()`."""
    if env.get("mpi_standard") is None:
        mpi = [f"MPI library  {env['mpi_library']}", f"             to fix: {env['mpi_hint']}"]
    else:
        mpi = [f"MPI library  {env['mpi_library']} (MPI {env['mpi_standard']})",
               f"             file: {env.get('mpi_library_file') or 'unknown'}"]
    lines = [
        f"distbn       {env['distbn']}",
        f"python       {env['python']} ({env['python_executable']})",
        f"numpy        {env['numpy']} (BLAS: {env['blas']})",
        f"BN kernels   {env.get('kernels', '?')}",
        f"mpi4py       {env['mpi4py']}",
        *mpi,
        f"world size   {env['world_size']}",
    ]
    for r in env["ranks"]:
        lines.append(f"  rank {r['rank']:>3}  host {r['host']}  pid {r['pid']}")
    return "\n".join(lines)
