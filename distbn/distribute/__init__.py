"""Strategies: who the replicas are and how they communicate.

`get_strategy()` returns the innermost active `strategy.scope()`, else an `MPIStrategy`
over COMM_WORLD when the process is one of several MPI ranks, else a `LocalStrategy`.
Nothing here imports mpi4py until an `MPIStrategy` is created.
"""

from .abort import install_abort_hook
from .check import CollectiveMismatchError
from .launch import launched_world_size
from .mpi import MPIStrategy
from .strategy import LocalStrategy, Strategy, get_strategy

__all__ = [
    "CollectiveMismatchError",
    "LocalStrategy",
    "MPIStrategy",
    "Strategy",
    "get_strategy",
    "install_abort_hook",
    "launched_world_size",
]
