"""The MPI harness itself: ranks see each other and collectives reduce what they should."""

import numpy as np
import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_world_has_several_ranks(comm):
    assert comm.size >= 2
    ranks = comm.allgather(comm.rank)
    assert ranks == list(range(comm.size))


@pytest.mark.mpi
def test_allreduce_sums_every_rank(comm):
    buf = np.full(5, comm.rank + 1.0)
    comm.Allreduce(MPI.IN_PLACE, buf)
    np.testing.assert_array_equal(buf, np.full(5, comm.size * (comm.size + 1) / 2))


@pytest.mark.mpi
def test_one_thread_per_rank():
    import os

    assert os.environ.get("OMP_NUM_THREADS") == "1"
