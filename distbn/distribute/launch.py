"""MPI process-level helpers for commands: the world size (from `distbn.launchenv`) and a
clean MPI shutdown before a collective non-zero exit.
"""

from __future__ import annotations

# Re-exported: the launcher's environment is read in one leaf module (distbn.launchenv),
# which the kernel backend and the fault hook import too.
from distbn.launchenv import (
    current_world_size,
    launched_world_size,
    mpi_world_size_if_initialized,
)

__all__ = ["launched_world_size", "mpi_world_size_if_initialized", "current_world_size",
           "finalize_mpi_for_exit"]


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
