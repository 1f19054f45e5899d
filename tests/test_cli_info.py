"""`distbn info` as a user runs it: one process and under mpiexec."""

import subprocess
import sys

from mpi_driver import run_mpi

import distbn


def test_info_single_process():
    out = subprocess.run(
        [sys.executable, "-m", "distbn", "info"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"distbn       {distbn.__version__}" in out.stdout
    assert "MPI library" in out.stdout and "world size   1" in out.stdout


def test_info_two_ranks_printed_once():
    run = run_mpi(2, ["-m", "distbn", "info"], timeout=60)
    assert run.returncode == 0, run.failure_report()
    assert run.output.count("world size   2") == 1
    assert "rank   0" in run.output and "rank   1" in run.output
