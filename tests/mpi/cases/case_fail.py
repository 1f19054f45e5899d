"""Driver self-test input: an assertion that fails on the last rank only."""

import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_fails_on_last_rank():
    comm = MPI.COMM_WORLD
    assert comm.rank != comm.size - 1, "deliberate failure on the last rank"
