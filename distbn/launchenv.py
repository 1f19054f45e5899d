"""What the launcher's environment says about this process: world size and rank.

A leaf module (it imports nothing of distbn and never imports mpi4py): the strategy
(`distbn.distribute`), the kernel backend (`distbn.ops.backend`, for its thread count) and
the fault hook (`distbn.faults`) all read the launcher's variables here.

`get_strategy()` must not initialise MPI in a plain `python script.py` (MPI_Init is slow,
can print warnings, and on some clusters fails outside a job step), so the launcher's
environment variables are read first and mpi4py is imported only when they say more
than one rank was started.
"""

from __future__ import annotations

import os
import sys

__all__ = ["launched_world_size", "launched_rank", "mpi_world_size_if_initialized",
           "current_world_size", "world_rank"]

# Variables that state the world size outright: MPICH/Intel MPI Hydra and Slurm's pmi2
# (PMI_SIZE), Open MPI (OMPI_COMM_WORLD_SIZE), MVAPICH2 (MV2_COMM_WORLD_SIZE).
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Ranks on this node (Hydra): more than one local rank means more than one rank.
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
# Set only for processes a PMI/PMIx server launched (srun --mpi=..., mpiexec).
_PMI_VARS = ("PMI_RANK", "PMI_FD", "PMI_SIZE", "PMIX_RANK", "PMIX_NAMESPACE")
# Slurm task counts. An sbatch script has SLURM_NTASKS too, but there it is the
# allocation, not a launched step, so these count only next to a PMI variable.
_SLURM_VARS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
# This process's rank, as the launchers state it.
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def _int(value) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def launched_world_size(environ=None) -> int:
    """The number of ranks the launcher started, judged from environment variables only.

    Args:
        environ: the environment mapping (default os.environ).

    Returns:
        The world size the launcher announced, or 1 when nothing says more (a plain
        `python` run, or an sbatch script outside `srun`). Malformed values are ignored.
    """
    env = os.environ if environ is None else environ
    stated = [n for n in map(_int, (env.get(v) for v in _SIZE_VARS)) if n is not None]
    if stated:
        return max(max(stated), 1)
    lower_bounds = [n for n in map(_int, (env.get(v) for v in _LOCAL_SIZE_VARS)) if n]
    if any(v in env for v in _PMI_VARS):
        for var in _SLURM_VARS:  # the step's count wins over the allocation's
            n = _int(env.get(var))
            if n is not None:
                lower_bounds.append(n)
                break
    return max(lower_bounds, default=1)


def launched_rank(environ=None) -> int:
    """This process's rank as the launcher's variables state it (0 when none does).

    Args:
        environ: the environment mapping (default os.environ).
    """
    env = os.environ if environ is None else environ
    for var in _RANK_VARS:
        n = _int(env.get(var))
        if n is not None and n >= 0:
            return n
    return 0


def mpi_world_size_if_initialized() -> int | None:
    """COMM_WORLD's size if mpi4py.MPI is already imported and MPI initialised, else None.

    Never imports mpi4py. Covers launchers whose variables `launched_world_size` does not
    know, when the user (or `python -m mpi4py`) has already started MPI.

    Returns:
        The size, or None.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD.Get_size()


def current_world_size(environ=None) -> int:
    """The size of the MPI job this process belongs to (1 when it is not one of several
    ranks), without initialising MPI when the launcher's environment already says so."""
    return max(mpi_world_size_if_initialized() or 1, launched_world_size(environ))


def world_rank() -> int:
    """This process's COMM_WORLD rank, without initialising MPI: 0 when not under MPI."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    return launched_rank()
