"""Run tests/mpi under mpiexec at 2 and 3 ranks; a failure or a hang fails this test."""

import pytest
from mpi_driver import run_mpi_pytest


@pytest.mark.parametrize("nprocs", [2, 3])
def test_mpi_suite(nprocs):
    run = run_mpi_pytest(nprocs, ["tests/mpi"], timeout=200, per_test_timeout=60)
    if run.returncode != 0 or run.timed_out:
        pytest.fail(run.failure_report(), pytrace=False)
    assert " passed" in run.output, run.failure_report()
