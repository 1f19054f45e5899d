"""The driver reports a failing MPI test and a hanging one as failures, and cleans up."""

from mpi_driver import run_mpi_pytest


def test_failing_mpi_test_fails_the_run():
    run = run_mpi_pytest(2, ["tests/mpi/cases/case_fail.py"], timeout=60)
    assert run.returncode != 0 and not run.timed_out
    assert "deliberate failure on the last rank" in run.output
    # The collective outcome hook fails the test on rank 0 too.
    assert "failed on rank(s) [1]" in run.output


def test_hang_is_ended_by_the_per_test_timeout():
    run = run_mpi_pytest(2, ["tests/mpi/cases/case_hang.py"], timeout=60, per_test_timeout=3)
    assert run.returncode != 0 and not run.timed_out
    assert "Timeout" in run.output


def test_hang_is_ended_by_the_driver_timeout():
    run = run_mpi_pytest(2, ["tests/mpi/cases/case_hang.py"], timeout=8, per_test_timeout=None)
    assert run.timed_out
    assert "mpiexec -n 2: timed out" in run.failure_report()
