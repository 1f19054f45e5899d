"""Driver self-test input: rank 0 skips a barrier the others wait in (a deadlock)."""

import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_hangs():
    comm = MPI.COMM_WORLD
    if comm.rank != 0:
        comm.Barrier()
