"""`distbn info` as a user runs it: one process and under mpiexec."""

import os
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


def test_info_names_the_mpi_library_file():
    out = subprocess.run([sys.executable, "-m", "distbn", "info"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("file:"))
    assert "libmpi" in line


def test_info_without_a_loadable_mpi_still_reports_the_rest():
    """Installed without MPI (here: MPI4PY_LIBMPI pointing nowhere), `distbn info` used to
    print a 33-line traceback."""
    env = dict(os.environ, MPI4PY_LIBMPI="/nonexistent/libmpi.so.12")
    out = subprocess.run([sys.executable, "-m", "distbn", "info"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert "numpy" in out.stdout and "BN kernels" in out.stdout
    assert "MPI library  not loadable (" in out.stdout and "/nonexistent/libmpi" in out.stdout
    assert "MPI4PY_LIBMPI" in out.stdout and "module load" in out.stdout
    assert "world size   1" in out.stdout


def test_blas_info_names_the_openblas_core_and_an_avx512_cpu_it_does_not_use(monkeypatch):
    from distbn import blas, info

    core = blas.openblas_core()
    if "openblas" in info.blas_info().split(",")[0]:
        assert core and core in info.blas_info()  # this numpy's own OpenBLAS answers
    monkeypatch.setattr(blas, "openblas_core", lambda: "Haswell")
    monkeypatch.setattr(blas, "cpu_has_avx512", lambda: True)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert info.blas_info().endswith(", core Haswell (OPENBLAS_CORETYPE=Haswell is set; the "
                                     "CPU has AVX-512, which OpenBLAS's SkylakeX kernels use)")
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert info.blas_info().endswith(
        ", core Haswell (the CPU has AVX-512, which OpenBLAS's SkylakeX kernels use)")
    monkeypatch.setattr(blas, "cpu_has_avx512", lambda: False)
    assert info.blas_info().endswith(", core Haswell")
    monkeypatch.setattr(blas, "openblas_core", lambda: "SkylakeX")
    monkeypatch.setattr(blas, "cpu_has_avx512", lambda: True)
    assert info.blas_info().endswith(", core SkylakeX")
