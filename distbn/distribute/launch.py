"""Tell from the environment whether this process was started as one of several ranks.

`get_strategy()` must not initialise MPI in a plain `python script.py` (MPI_Init is slow,
can print warnings, and on some clusters fails outside a job step), so the launcher's
environment variables are read first and mpi4py is imported only when they say more
than one rank was started.
"""

from __future__ import annotations

import os
import sys

__all__ = ["launched_world_size", "mpi_world_size_if_initialized", "current_world_size",
           "finalize_mpi_for_exit"]

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


def _int(value) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def current_world_size() -> int:
    """The size of the MPI job this process belongs to (1 when it is not one of several
    ranks), without initialising MPI when the launcher's environment already says so."""
    return max(mpi_world_size_if_initialized() or 1, launched_world_size())


def finalize_mpi_for_exit() -> None:
    """End MPI cleanly before a collective non-zero exit (a no-op when MPI is not running
    across several ranks).

    Every rank returns the same code together, so finalizing is safe, and it keeps
    `python -m mpi4py` from turning the exit status into an MPI_Abort whose banner would
    bury the one-line error. Stall-watchdog threads are stopped first: none may be inside
    MPI while it finalizes.
    """
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        if mpi.COMM_WORLD.Get_size() > 1:
            from .watchdog import stop_all

            stop_all()
            mpi.Finalize()
